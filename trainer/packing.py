"""Shared-prefix and packed layouts for the learner's forward: no token computed twice, no
padding computed at all (issue 21).

A training batch is groups of K episodes that answer the same prompt, right-padded to the
longest row. Run as is, the body computes each prompt K times and every pad position. A
:class:`PackedLayout` rearranges the same tokens so that neither happens, and gives each
original position ``(b, t)`` the index of the packed position whose hidden state equals the one
the padded forward computes there:

* **Shared prefix.** Rows that start with the same tokens form a *segment*: the common prefix
  once, then each row's own continuation. A continuation token attends to the prefix and to its
  own earlier tokens (nothing else), with the position id it has in its own row, so its hidden
  state is the padded forward's: a causal transformer's state at t depends only on tokens
  0..t and their positions. The prefix's activations are used by K rows; autograd sums the K
  gradients into them (the gather's backward is an index-add), which is exactly what the K
  copies of the padded forward would receive between them. Multi-turn episodes share only their
  common first part (the prompt): the common prefix is found token by token, not assumed.
* **Packing.** Segments of different lengths are laid side by side in rows (first-fit
  decreasing into rows as long as the longest segment), with a block-diagonal attention mask so
  that segments never see each other; only the tail of a row is padding.

The mask is an explicit ``[R, 1, L, L]`` tensor handed to the model (transformers uses a 4D mask
as given), so it needs an attention implementation that takes arbitrary masks: ``sdpa`` (boolean
mask) or ``eager`` (additive float mask).

**Varlen kernels** (``model.attn_implementation: flash_attention_2`` / ``_3``, the GPU's choice)
take no mask: they read the sequences of one flat row from their cumulative lengths
(``cu_seqlens``) and compute only the causal pairs inside each. There every row is laid end to
end in a single ``[1, N]`` row (N = the real tokens, no padding at all; position ids restart at 0
per row) and transformers is handed ``cu_seq_lens_q/k`` and ``max_length_q/k``, which its flash
path passes to ``flash_attn_varlen_func``. A prefix cannot be shared there (a continuation would
attend to another sequence's keys, which cumulative lengths cannot say), so ``shared_prefix``
``auto`` does not share and ``on`` refuses.

Whether the layout pays is estimated in "token units": a position costs 1 (the body's matmuls,
~24 d^2 FLOPs per layer) and a query-key pair costs 1 / (6 d) (its ~4 d FLOPs), d the hidden
size. A dense mask computes every pair of a packed row, the padded forward every pair of a
padded row (half with no padding: the causal kernel skips the rest); varlen kernels compute the
causal pairs of each real sequence in both layouts (transformers unpads a padded batch for
them), so there packing saves exactly the padded positions' matmuls. ``auto`` takes the layout
when it costs under 90 % of the padded forward, and for a varlen kernel whenever a row is padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Mode = Literal["auto", "on", "off"]
MODES = ("auto", "on", "off")
# attention implementations that apply an explicit 4D mask as given
MASKED_ATTENTION = ("sdpa", "eager")


def is_varlen(attention: str) -> bool:
    """Whether ``attention`` (a model's ``_attn_implementation``) is a flash-attention kernel,
    which takes packed sequences as cumulative lengths and no mask (transformers' names:
    ``flash_attention_2/3/4`` or a hub kernel such as ``kernels-community/flash-attn2``)."""
    return attention.startswith("flash_attention") or "flash-attn" in attention


# auto uses the layout only when its estimated cost is below this share of the padded forward's
AUTO_THRESHOLD = 0.9


@dataclass
class PackedLayout:
    """The tokens of a ``[B, T]`` right-padded batch laid out as ``[R, L]`` packed rows.

    ``segment`` and ``member`` say what each packed position may attend to: keys of its own
    segment, at positions not after its own, that belong to the shared prefix (``member == -1``)
    or to its own row (``member == b``). Padding positions get a segment of their own.
    ``source[b, t]`` is the flat index (into ``R * L``) of the position whose hidden state
    predicts ``target_ids[b, t]``; -1 where the original row is padding.
    """

    input_ids: Tensor  # [R, L]
    position_ids: Tensor  # [R, L]
    segment: Tensor  # [R, L]
    member: Tensor  # [R, L]
    source: Tensor  # [B, T]
    shared_tokens: int  # positions the padded forward computes more than once, computed once here
    padded_positions: int  # B * T
    packed_positions: int  # R * L
    # one flat row of unshared sequences for a varlen kernel (cumulative lengths, no mask)
    varlen: bool = False

    def model_inputs(self, implementation: str) -> dict[str, Tensor | int]:
        """The keyword arguments of the transformer body's forward for this layout: the mask
        for ``sdpa`` / ``eager``, the cumulative sequence lengths for a varlen kernel."""
        inputs: dict[str, Tensor | int] = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
        }
        if not self.varlen:
            inputs["attention_mask"] = self.attention_mask(implementation)
            return inputs
        starts = (self.position_ids[0] == 0).nonzero().view(-1)
        end = torch.tensor([self.position_ids.shape[1]], device=starts.device)
        cumulative = torch.cat([starts, end]).to(torch.int32)
        longest = int(cumulative.diff().max())
        inputs.update(
            cu_seq_lens_q=cumulative,
            cu_seq_lens_k=cumulative,
            max_length_q=longest,
            max_length_k=longest,
        )
        return inputs

    def attention_mask(self, implementation: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``[R, 1, L, L]`` mask for ``implementation``: boolean (True = attend) for sdpa,
        additive (0 / the dtype's minimum) for eager."""
        seg, pos, mem = self.segment, self.position_ids, self.member
        allowed = (
            (seg[:, :, None] == seg[:, None, :])
            & (pos[:, None, :] <= pos[:, :, None])
            & ((mem[:, None, :] == -1) | (mem[:, None, :] == mem[:, :, None]))
        )[:, None]
        if implementation == "sdpa":
            return allowed
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)


def check_mode(name: str, value: str) -> None:
    if value not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {value!r}")


def _row_lengths(attention_mask: Tensor) -> Tensor | None:
    """Lengths of right-padded rows, or None when some row is not ``1...1 0...0``."""
    lengths = attention_mask.sum(dim=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    right_padded = (positions[None, :] < lengths[:, None]).to(attention_mask.dtype)
    return lengths if torch.equal(right_padded, attention_mask) else None


def common_prefix_lengths(input_ids: Tensor, lengths: Tensor) -> Tensor:
    """``[B, B]`` lengths of the common token prefix of each pair of rows (within both rows'
    lengths). One row against all at a time: O(B T) memory."""
    batch, width = input_ids.shape
    positions = torch.arange(width, device=input_ids.device)
    out = torch.empty((batch, batch), dtype=torch.long, device=input_ids.device)
    for row in range(batch):
        shortest = torch.minimum(lengths, lengths[row])
        agree = (input_ids == input_ids[row]) & (positions[None, :] < shortest[:, None])
        disagree = ~agree
        first = disagree.to(torch.int8).argmax(dim=1)
        out[row] = torch.where(disagree.any(dim=1), first, torch.full_like(first, width))
    return out


@dataclass
class _Segment:
    members: list[int]
    prefix: int  # tokens shared by all members (a single member: its whole row)
    tokens: int  # positions the segment occupies


def _cost(length: int, pair_weight: float, causal_half: bool = False) -> float:
    pairs = length * length * (0.5 if causal_half else 1.0)
    return length + pairs * pair_weight


def _segments(lengths: list[int], lcp: list[list[int]], share: bool, pair_weight: float):
    """Greedy grouping, rows in order: a row joins the segment whose estimated cost it lowers
    most (sharing p tokens with k rows saves k p positions, the longer segment costs more
    pairs), else it starts its own."""
    segments: list[_Segment] = []
    for row, n in enumerate(lengths):
        if n == 0:
            continue
        best, best_gain, best_prefix = None, 0.0, 0
        if share:
            for seg in segments:
                prefix = min(seg.prefix, lcp[row][seg.members[0]])
                if prefix < 1:
                    continue
                total = sum(lengths[m] for m in seg.members) + n
                tokens = total - len(seg.members) * prefix
                gain = (
                    _cost(seg.tokens, pair_weight)
                    + _cost(n, pair_weight)
                    - _cost(tokens, pair_weight)
                )
                if gain > best_gain:
                    best, best_gain, best_prefix = seg, gain, prefix
        if best is None:
            segments.append(_Segment([row], n, n))
        else:
            best.members.append(row)
            best.prefix = best_prefix
            best.tokens = sum(lengths[m] for m in best.members) - (len(best.members) - 1) * (
                best_prefix
            )
    return segments


def _bins(segments: list[_Segment], pack: bool) -> list[list[_Segment]]:
    """First-fit decreasing into rows as long as the longest segment (or one row each)."""
    if not pack:
        return [[seg] for seg in segments]
    capacity = max(seg.tokens for seg in segments)
    bins: list[list[_Segment]] = []
    room: list[int] = []
    for seg in sorted(segments, key=lambda s: -s.tokens):
        for i, free in enumerate(room):
            if seg.tokens <= free:
                bins[i].append(seg)
                room[i] -= seg.tokens
                break
        else:
            bins.append([seg])
            room.append(capacity - seg.tokens)
    return bins


def plan_layout(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    shared_prefix: Mode = "auto",
    packing: Mode = "auto",
    attention: str = "sdpa",
    hidden_size: int = 1024,
) -> PackedLayout | None:
    """The packed layout for this batch, or None for the plain padded forward.

    ``shared_prefix`` / ``packing``: ``off`` never, ``on`` always (a ValueError naming the value
    where it cannot be exact: an attention implementation without arbitrary masks, rows that are
    not right-padded), ``auto`` where it is exact and estimated cheaper (module docstring).
    """
    check_mode("trainer.shared_prefix", shared_prefix)
    check_mode("trainer.packing", packing)
    if shared_prefix == "off" and packing == "off":
        return None
    modes = (("shared_prefix", shared_prefix), ("packing", packing))
    forced = [f"trainer.{name}=on" for name, value in modes if value == "on"]
    varlen = is_varlen(attention)
    if varlen and shared_prefix == "on":
        raise ValueError(
            f"trainer.shared_prefix=on needs an attention implementation that takes an explicit "
            f"mask ({', '.join(MASKED_ATTENTION)}); the model uses {attention!r}, whose varlen "
            "kernels pack sequences but cannot share a prefix: set trainer.shared_prefix to "
            "auto or off (packing still applies)"
        )
    if attention not in MASKED_ATTENTION and not varlen:
        if forced:
            raise ValueError(
                f"{' and '.join(forced)} needs an attention implementation that takes an "
                f"explicit mask ({', '.join(MASKED_ATTENTION)}); the model uses {attention!r}: "
                "load it with attn_implementation='sdpa' or set them to auto/off"
            )
        return None
    lengths_t = _row_lengths(attention_mask)
    if lengths_t is None:
        if forced:
            raise ValueError(
                f"{' and '.join(forced)} needs right-padded rows (attention_mask 1...1 0...0); "
                "this batch has a row that is not"
            )
        return None
    lengths = lengths_t.tolist()
    if sum(lengths) == 0:
        return None
    batch, width = input_ids.shape
    pair_weight = 1.0 / (6.0 * hidden_size)
    if varlen:
        return _plan_varlen(input_ids, lengths, packing)
    share = shared_prefix != "off"
    lcp = common_prefix_lengths(input_ids, lengths_t).tolist() if share else []
    segments = _segments(lengths, lcp, share, pair_weight)
    bins = _bins(segments, packing != "off")
    rows, length = len(bins), max(seg.tokens for seg in segments)
    if not forced:
        padded = batch * _cost(width, pair_weight, causal_half=min(lengths) == width)
        packed = rows * _cost(length, pair_weight)
        if packed >= AUTO_THRESHOLD * padded:
            return None
    return _build(input_ids, lengths, bins, rows, length, batch, width)


def _plan_varlen(input_ids: Tensor, lengths: list[int], packing: Mode) -> PackedLayout | None:
    """Every row end to end in one flat row, for a varlen kernel (module docstring)."""
    if packing == "off":
        return None
    batch, width = input_ids.shape
    total = sum(lengths)
    # both layouts run the same attention pairs, so the flat row is cheaper by exactly the
    # padded positions' matmuls: auto takes it whenever there is padding
    if packing == "auto" and total == batch * width:
        return None
    segments = [_Segment([row], n, n) for row, n in enumerate(lengths) if n > 0]
    layout = _build(input_ids, lengths, [segments], 1, total, batch, width)
    layout.varlen = True
    return layout


def _build(input_ids, lengths, bins, rows, length, batch, width) -> PackedLayout:
    device = input_ids.device
    ids = torch.zeros((rows, length), dtype=input_ids.dtype, device=device)
    position = torch.zeros((rows, length), dtype=torch.long, device=device)
    member = torch.full((rows, length), -1, dtype=torch.long, device=device)
    # padding: a segment of its own per position (it attends only to itself)
    segment = -1 - torch.arange(rows * length, device=device).view(rows, length)
    source = torch.full((batch, width), -1, dtype=torch.long, device=device)
    shared = 0
    segment_id = 0
    for r, row_segments in enumerate(bins):
        cursor = 0
        for seg in row_segments:
            first, prefix = seg.members[0], seg.prefix
            span = slice(cursor, cursor + prefix)
            ids[r, span] = input_ids[first, :prefix]
            position[r, span] = torch.arange(prefix, device=device)
            segment[r, span] = segment_id
            slots = r * length + cursor + torch.arange(prefix, device=device)
            for m in seg.members:
                source[m, :prefix] = slots
            shared += (len(seg.members) - 1) * prefix
            cursor += prefix
            for m in seg.members:
                own = lengths[m] - prefix
                if own == 0:
                    continue
                span = slice(cursor, cursor + own)
                ids[r, span] = input_ids[m, prefix : lengths[m]]
                position[r, span] = torch.arange(prefix, lengths[m], device=device)
                segment[r, span] = segment_id
                member[r, span] = m
                source[m, prefix : lengths[m]] = (
                    r * length + cursor + torch.arange(own, device=device)
                )
                cursor += own
            segment_id += 1
    return PackedLayout(
        input_ids=ids,
        position_ids=position,
        segment=segment,
        member=member,
        source=source,
        shared_tokens=shared,
        padded_positions=batch * width,
        packed_positions=rows * length,
    )
