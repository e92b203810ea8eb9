"""Policy backends: generate token ids with per-token sampler log-probs, and take new weights.

Every backend implements the same two calls (a structural interface, see :class:`Policy`):

* ``generate(prompts, max_new_tokens, stop, temperature=None)``: ``prompts`` are token-id lists
  (token-in); each result holds the sampled ids, the log-prob of each under the distribution
  actually sampled from (after temperature and top-p), and why the turn ended (token-out).
  ``temperature`` overrides the policy's own for this call only (evaluation samples at its own
  temperature without touching the policy a training run keeps using).
* ``update_weights(named_tensors)``: load new weights in place, named as in the HF state dict.

This module holds the transformers backend (``hf``), the embedded default;
``agent.vllm_policy`` and ``agent.openai_policy`` hold the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Generation:
    """One sampled turn. ``logprobs[i]`` is log pi_sampler(token_ids[i] | context)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop string), "eos", or "length" (the token cap)


def finish_reason(engine_reason: str | None, stop_reason: object) -> str:
    """Our ``finish_reason`` from vLLM's pair (the same in its engine and OpenAI server output):
    a string ``stop_reason`` is the stop string that ended the turn; otherwise ``"length"`` is
    the token cap, and anything else (an EOS or stop token id) ends as ``"eos"``."""
    if isinstance(stop_reason, str):
        return "stop"
    return "length" if engine_reason == "length" else "eos"


class Policy(Protocol):
    tokenizer: object

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        *,
        temperature: float | None = None,
    ) -> list[Generation]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution sampled from: softmax(logits / T) restricted to the top-p
    nucleus and renormalised. Tokens outside the nucleus get -inf. T == 0 (greedy) reports the
    untempered log-softmax. Computed in float32.

    logits: [B, V] -> [B, V]
    """
    scores = logits.float()
    if temperature > 0:
        scores = scores / temperature
    logp = torch.log_softmax(scores, dim=-1)
    if top_p < 1.0 and temperature > 0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
        cumulative = sorted_logp.exp().cumsum(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logp.exp()) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


def _sample(logp: torch.Tensor) -> torch.Tensor:
    """One token per row from ``softmax(logp)`` by inverting its CDF at a uniform draw in
    ``(0, total]``: exact, one random number per row, and several times cheaper on CPU than
    ``torch.multinomial`` over a large vocabulary. Tokens of probability 0 (``-inf``, e.g. outside
    the top-p nucleus) are never picked: the CDF does not rise at them."""
    cdf = logp.float().exp().cumsum(dim=-1)
    draw = (1.0 - torch.rand(logp.shape[0], 1, device=logp.device)) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, draw).squeeze(1)
    return picked.clamp_(max=logp.shape[-1] - 1)


class _StopStrings:
    """Finds a stop string at the end of a row's generated text (a window of trailing tokens
    long enough to hold the longest one: a token has >= 1 character)."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.window = max((len(s) for s in self.stop), default=0) + 2

    def __call__(self, generated: list[int]) -> bool:
        if not self.stop:
            return False
        text = self.tokenizer.decode(generated[-self.window :], skip_special_tokens=False)
        return any(s in text for s in self.stop)


class HFPolicy:
    """transformers generation, batched across episodes (left padding), on CPU or GPU.

    ``model`` may be the learner's own module (single-process training): then a weight update
    is a no-op because the parameters are shared.
    """

    def __init__(
        self,
        model,
        tokenizer,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 32,
    ) -> None:
        """Sampling draws from torch's global RNG, which the callers seed (the training loop per
        step, the evaluation per task), so a resumed run samples what an uninterrupted one does."""
        _check_temperature(temperature)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = batch_size
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.eos_ids = _eos_ids(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        *,
        temperature: float | None = None,
    ) -> list[Generation]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        temperature = self.temperature if temperature is None else _check_temperature(temperature)
        results: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            results.extend(self._generate_batch(batch, max_new_tokens, stop, temperature))
        return results

    @torch.no_grad()
    def _generate_batch(
        self, prompts, max_new_tokens: int, stop: Sequence[str], temperature: float
    ) -> list[Generation]:
        """Our own decode loop over the model's KV cache, for three savings over ``generate``:
        identical prompts (the K episodes of a group) are prefilled once and their cache rows
        copied; a row leaves the batch (and the cache) as soon as its turn ends, so the batch
        does not run to the longest row's length; and sampling avoids ``torch.multinomial``.
        Each sampled token's log-prob is read from the very distribution it was drawn from
        (:func:`sampling_logprobs`: temperature, then top-p)."""
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        unique: dict[tuple[int, ...], int] = {}
        source = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        width = max(len(p) for p in unique)
        input_ids = torch.full((len(unique), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(unique), width), dtype=torch.long)
        for row, prompt in enumerate(unique):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention[row, width - len(prompt) :] = 1
        device = self.device
        input_ids, attention = input_ids.to(device), attention.to(device)

        was_training = self.model.training
        self.model.eval()
        try:
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            )
            cache, logits = out.past_key_values, out.logits[:, -1]
            rows = torch.tensor(source, device=device)
            if len(unique) != len(prompts):
                cache.reorder_cache(rows)
            attention, logits = attention[rows], logits[rows]
            positions = positions[rows, -1]

            stops = _StopStrings(self.tokenizer, stop)
            eos = set(self.eos_ids)
            tokens: list[list[int]] = [[] for _ in prompts]
            logprobs: list[list[float]] = [[] for _ in prompts]
            reasons: list[str] = ["length"] * len(prompts)
            live = list(range(len(prompts)))  # prompt index of each batch row
            for step in range(max_new_tokens):
                logp = sampling_logprobs(logits, temperature, self.top_p)
                picked = _sample(logp) if temperature > 0 else logp.argmax(dim=-1)
                picked_logp = logp.gather(1, picked[:, None]).squeeze(1)
                keep = []
                for row, (index, token, value) in enumerate(
                    zip(live, picked.tolist(), picked_logp.tolist(), strict=True)
                ):
                    tokens[index].append(token)
                    logprobs[index].append(value)
                    if token in eos:
                        reasons[index] = "eos"
                    elif stops(tokens[index]):
                        reasons[index] = "stop"
                    else:
                        keep.append(row)
                if not keep or step == max_new_tokens - 1:
                    break
                if len(keep) < len(live):
                    kept = torch.tensor(keep, device=device)
                    cache.reorder_cache(kept)
                    attention, picked, positions = attention[kept], picked[kept], positions[kept]
                    live = [live[row] for row in keep]
                attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
                positions = positions + 1
                out = self.model(
                    input_ids=picked[:, None],
                    attention_mask=attention,
                    position_ids=positions[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
                cache, logits = out.past_key_values, out.logits[:, -1]
        finally:
            self.model.train(was_training)
        return [Generation(tokens[i], logprobs[i], reasons[i]) for i in range(len(prompts))]

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # state_dict names every alias of a tied weight (lm_head.weight and embed_tokens.weight)
        params = self.model.state_dict(keep_vars=True)
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"update_weights: the policy model has no parameter {name!r}")
            target = params[name]
            if target.data_ptr() != tensor.data_ptr():
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def _check_temperature(temperature: float) -> float:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return temperature


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    if not ids:
        raise ValueError("the tokenizer defines no eos token; set tokenizer.eos_token")
    return sorted(ids)
