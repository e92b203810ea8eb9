"""Shared-prefix and packed forwards (trainer/packing.py) are exact: the learner's loss and
gradients equal the plain padded forward's, on groups of multi-turn episodes of different
lengths, with the FP32 head's chunking, gradient checkpointing, LoRA, eager attention and a
reference model; and the layout really shares (a test that silently fell back would pass
vacuously, so each asserts what the forward did)."""

from __future__ import annotations

import pytest
import torch

from agent.rollout import Episode
from trainer.learner import LogprobModel, TorchLearner, apply_lora, collate
from trainer.packing import plan_layout

OBSERVATION = [11, 12, 13]  # the same environment reply in every episode (after they diverge)


def group_episodes(vocab: int, groups: int = 2, k: int = 3, seed: int = 0) -> list[Episode]:
    """``groups`` prompts x ``k`` two-turn episodes: prompt, sampled answer, an observation
    whose tokens are identical across the group, sampled answer. Lengths differ per row; only
    the prompt (and, by chance, a common start of the first answers) is shared."""
    g = torch.Generator().manual_seed(seed)

    def tokens(low: int, high: int) -> list[int]:
        n = int(torch.randint(low, high, (1,), generator=g))
        return torch.randint(20, vocab, (n,), generator=g).tolist()

    episodes = []
    for group in range(groups):
        prompt = tokens(6, 12)
        for _ in range(k):
            ep = Episode(task_id=f"t{group}", group_id=group, seed=0)
            ep.append(prompt, sampled=False)
            for ids in (tokens(2, 7), None, tokens(1, 6)):
                if ids is None:
                    ep.append(OBSERVATION, sampled=False)
                else:
                    logprobs = (-torch.rand(len(ids), generator=g) * 3).tolist()
                    ep.append(ids, sampled=True, logprobs=logprobs)
            ep.prompt_len = len(prompt)
            episodes.append(ep)
    return episodes


def batch_of(episodes, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    advantages = torch.randn(len(episodes), generator=g)
    return collate(episodes, advantages, pad_id=0)


def learner_for(model_dir: str, overrides: list[str], lora: bool = False, reference=None):
    from agent.models import load_model
    from trainer.config import load_config

    cfg = load_config(
        None,
        [
            f"model.name={model_dir}",
            "trainer.micro_batch_size=8",
            "precision.chunk_size=5",  # several chunks of the FP32 head per micro-batch
            "objective.old_logprobs=sampler",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    lm = load_model(model_dir)
    if lora:
        lm = apply_lora(lm, cfg.trainer.lora)
        with torch.no_grad():  # nonzero B, so that the LoRA path carries a gradient to A
            for name, p in lm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    return TorchLearner(lm, cfg, torch.device("cpu"), total_updates=1, reference=reference)


def gradients(learner: TorchLearner, batch) -> tuple[float, dict[str, torch.Tensor]]:
    metrics = learner.accumulate(batch, zeta=0.05, eps_high=0.28)
    grads = {
        n: p.grad.detach().clone() for n, p in learner.lm.named_parameters() if p.grad is not None
    }
    return metrics["loss/total"], grads


def assert_same_gradients(a: dict, b: dict) -> None:
    assert set(a) == set(b) and a
    for name in a:
        scale = max(float(a[name].abs().max()), 1e-6)
        error = float((a[name] - b[name]).abs().max())
        assert error <= 2e-5 * scale + 1e-9, f"{name}: max error {error:.3g}, scale {scale:.3g}"


VARIANTS = {
    "fp32-head-chunked": [],
    "gradient-checkpointing": ["trainer.gradient_checkpointing=true"],
    "seq-mean-entropy-bonus": [
        "objective.aggregation=seq_mean_token_mean",
        "objective.entropy_coef=0.01",
        "objective.repo.variant=r",
    ],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_shared_and_packed_forward_gives_the_padded_loss_and_gradients(tiny_model_dir, variant):
    episodes = group_episodes(49152)
    batch = batch_of(episodes)
    off = learner_for(
        tiny_model_dir, ["trainer.shared_prefix=off", "trainer.packing=off", *VARIANTS[variant]]
    )
    loss_off, grads_off = gradients(off, batch)
    assert off.module.last_layout["layout"] == "padded"
    on = learner_for(
        tiny_model_dir, ["trainer.shared_prefix=on", "trainer.packing=on", *VARIANTS[variant]]
    )
    loss_on, grads_on = gradients(on, batch)
    layout = on.module.last_layout
    prompts = {ep.group_id: ep.prompt_len for ep in episodes}
    assert layout["layout"] == "packed"
    # every prompt computed once instead of 3 times (at least; first answers may start alike)
    assert layout["shared"] >= sum(2 * p for p in prompts.values())
    assert layout["positions"] < batch.input_ids.numel()
    assert loss_on == pytest.approx(loss_off, rel=1e-5, abs=1e-7)
    assert_same_gradients(grads_off, grads_on)


def test_lora_gradients_match_through_the_shared_prefix(tiny_model_dir):
    batch = batch_of(group_episodes(49152, seed=3), seed=3)
    overrides = ["trainer.lora.enabled=true", "trainer.lora.r=4", "trainer.lora.alpha=8"]
    off = learner_for(tiny_model_dir, ["trainer.shared_prefix=off", *overrides], lora=True)
    loss_off, grads_off = gradients(off, batch)
    on = learner_for(tiny_model_dir, ["trainer.shared_prefix=on", *overrides], lora=True)
    loss_on, grads_on = gradients(on, batch)
    assert on.module.last_layout["shared"] > 0
    assert all("lora_" in name for name in grads_on)  # only the adapters train
    assert loss_on == pytest.approx(loss_off, rel=1e-5, abs=1e-7)
    assert_same_gradients(grads_off, grads_on)


def test_reference_model_and_old_logprobs_pass_use_the_layout_exactly(tiny_model_dir):
    from agent.models import load_model

    batch = batch_of(group_episodes(49152, seed=5), seed=5)
    common = ["objective.kl_coef=0.1", "objective.old_logprobs=learner"]
    results = {}
    for mode in ("off", "on"):
        learner = learner_for(
            tiny_model_dir,
            [f"trainer.shared_prefix={mode}", f"trainer.packing={mode}", *common],
            reference=load_model(tiny_model_dir),
        )
        batch.old_logprobs, entropy = learner.logprobs(batch)
        assert learner.reference is not None
        results[mode] = (batch.old_logprobs, entropy, *gradients(learner, batch))
        assert learner.reference.last_layout["layout"] == ("packed" if mode == "on" else "padded")
    mask = batch.loss_mask.bool()
    for index in (0, 1):
        assert torch.allclose(results["on"][index][mask], results["off"][index][mask], atol=1e-5)
        assert not results["on"][index][~mask].any()  # no head work where no loss reads
    assert results["on"][2] == pytest.approx(results["off"][2], rel=1e-5, abs=1e-7)
    assert_same_gradients(results["off"][3], results["on"][3])


def test_eager_attention_takes_the_additive_mask_and_matches(tiny_model_dir):
    from agent.models import load_model

    batch = batch_of(group_episodes(49152, seed=7), seed=7)
    lm = load_model(tiny_model_dir)
    lm.config._attn_implementation = "eager"
    outs = {}
    for mode in ("off", "on"):
        model = LogprobModel(lm, chunk_size=5, shared_prefix=mode, packing=mode)
        lm.zero_grad()
        logprobs, entropy = model(batch.input_ids, batch.attention_mask, batch.target_ids)
        (logprobs.sum() + entropy.sum()).backward()
        outs[mode] = (logprobs.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()})
        assert model.last_layout["layout"] == ("packed" if mode == "on" else "padded")
    assert torch.allclose(outs["on"][0], outs["off"][0], atol=1e-5)
    assert_same_gradients(outs["off"][1], outs["on"][1])


def test_layout_shares_only_the_common_first_prompt_of_multi_turn_episodes():
    episodes = group_episodes(500, groups=2, k=3, seed=1)
    batch = batch_of(episodes)
    layout = plan_layout(
        batch.input_ids, batch.attention_mask, shared_prefix="on", packing="on", hidden_size=64
    )
    valid = batch.attention_mask.bool()
    packed = layout.input_ids.reshape(-1)[layout.source[valid]]
    positions = layout.position_ids.reshape(-1)[layout.source[valid]]
    assert torch.equal(packed, batch.input_ids[valid])  # every token at its place...
    columns = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids)
    assert torch.equal(positions, columns[valid])  # ...with its own row's position id
    assert bool((layout.source[~valid] == -1).all())
    for group in range(2):
        rows = [i for i, ep in enumerate(episodes) if ep.group_id == group]
        common = min(
            next(
                (
                    t
                    for t, (x, y) in enumerate(
                        zip(episodes[r].token_ids, episodes[rows[0]].token_ids, strict=False)
                    )
                    if x != y
                ),
                len(episodes[r].token_ids),
            )
            for r in rows[1:]
        )
        # the common prefix is one set of packed positions; the identical observation after
        # the answers diverged is not (its states depend on different answers)
        shared = layout.source[rows, :common]
        assert bool((shared == shared[0]).all())
        obs = [episodes[r].token_ids.index(OBSERVATION[0], common) for r in rows]
        slots = {int(layout.source[r, t]) for r, t in zip(rows, obs, strict=True)}
        assert len(slots) == len(rows)
    # padding positions of packed rows attend to nothing but themselves
    mask = layout.attention_mask("sdpa")[:, 0]
    pad = layout.segment < 0
    assert bool((mask.sum(-1)[pad] == 1).all())


def test_auto_keeps_the_padded_forward_where_nothing_is_saved():
    ids = torch.randint(20, 500, (4, 16), generator=torch.Generator().manual_seed(0))
    full = torch.ones(4, 16, dtype=torch.long)
    assert plan_layout(ids, full, hidden_size=64) is None  # unrelated, equal lengths
    shared = ids.clone()
    shared[:, :12] = ids[0, :12]
    layout = plan_layout(shared, full, hidden_size=64)
    assert layout is not None and layout.shared_tokens == 3 * 12


def test_on_refuses_what_it_cannot_do_exactly_and_auto_falls_back():
    ids = torch.randint(20, 500, (2, 6))
    left_padded = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="trainer.packing=on needs right-padded"):
        plan_layout(ids, left_padded, shared_prefix="off", packing="on")
    assert plan_layout(ids, left_padded) is None
    full = torch.ones(2, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="trainer.shared_prefix=on .*'flash_attention_2'"):
        plan_layout(ids, full, shared_prefix="on", attention="flash_attention_2")
    assert plan_layout(ids, full, attention="flash_attention_2") is None
    with pytest.raises(ValueError, match="trainer.packing must be one of .*'yes'"):
        plan_layout(ids, full, packing="yes")


def test_config_switch_defaults_to_auto_and_names_a_bad_value():
    from trainer.config import load_config

    cfg = load_config(None, [])
    assert (cfg.trainer.shared_prefix, cfg.trainer.packing) == ("auto", "auto")
    with pytest.raises(Exception, match="shared_prefix"):
        load_config(None, ["trainer.shared_prefix=always"])


class VarlenReference:
    """A CPU analogue of flash-attention's varlen kernel (the GPU's, which cannot run here),
    installed under transformers' ``flash_attention_2`` name: causal SDPA inside each sequence
    of the flat row that ``cu_seq_lens_q`` delimits, nothing across. It records what it was
    handed, so a test can tell that the learner really took the varlen path."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        cumulative = kwargs["cu_seq_lens_q"]
        self.calls.append(
            {
                "mask": attention_mask,
                "cumulative": cumulative.tolist(),
                "dtype": cumulative.dtype,
                "max_length": kwargs["max_length_q"],
                "shape": tuple(query.shape),
            }
        )
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = torch.empty_like(query)
        bounds = cumulative.tolist()
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            out[:, :, start:end] = torch.nn.functional.scaled_dot_product_attention(
                query[:, :, start:end],
                key[:, :, start:end],
                value[:, :, start:end],
                is_causal=True,
                scale=scaling,
            )
        return out.transpose(1, 2), None  # flash's layout: [batch, sequence, heads, dim]


def test_varlen_kernels_get_one_flat_row_and_match_the_padded_forward(tiny_model_dir, monkeypatch):
    """model.attn_implementation=flash_attention_2 (GPU): every row end to end in one row with
    cumulative lengths and no mask; log-probs and gradients equal sdpa's padded forward."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from agent.models import load_model

    kernel = VarlenReference()
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", kernel)
    episodes = group_episodes(49152, seed=9)
    batch = batch_of(episodes, seed=9)
    lm = load_model(tiny_model_dir)
    outs = {}
    for attention in ("sdpa", "flash_attention_2"):
        lm.config._attn_implementation = attention
        mode = "off" if attention == "sdpa" else "auto"
        model = LogprobModel(lm, chunk_size=5, shared_prefix=mode, packing=mode)
        lm.zero_grad()
        logprobs, entropy = model(batch.input_ids, batch.attention_mask, batch.target_ids)
        (logprobs.sum() + entropy.sum()).backward()
        outs[attention] = (
            logprobs.detach(),
            entropy.detach(),
            {n: p.grad.clone() for n, p in lm.named_parameters()},
        )
        assert model.last_layout["layout"] == ("padded" if attention == "sdpa" else "varlen")
    lengths = batch.attention_mask.sum(1).tolist()
    layers = lm.config.num_hidden_layers
    assert len(kernel.calls) == layers  # one forward, every layer through the varlen kernel
    call = kernel.calls[0]
    assert call["mask"] is None and call["dtype"] == torch.int32
    assert call["cumulative"] == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert call["max_length"] == max(lengths)
    assert call["shape"][2] == sum(lengths) < batch.input_ids.numel()  # no padding computed
    for index in (0, 1):
        assert torch.allclose(outs["flash_attention_2"][index], outs["sdpa"][index], atol=1e-5)
    assert_same_gradients(outs["sdpa"][2], outs["flash_attention_2"][2])


def test_flash_attention_needs_a_16_bit_body_and_loads_by_name(tiny_model_dir):
    from agent.models import load_model
    from trainer.config import load_config

    with pytest.raises(Exception, match="flash_attention_2.*model.dtype=bfloat16"):
        load_config(None, ["model.attn_implementation=flash_attention_2"])
    cfg = load_config(None, ["model.attn_implementation=flash_attention_2", "model.dtype=bfloat16"])
    assert cfg.model.attn_implementation == "flash_attention_2"
    assert load_model(tiny_model_dir, attn_implementation="eager").config._attn_implementation == (
        "eager"
    )
