"""ZeRO-1, 2 and 3 for real (2 gloo processes on CPU): the DeepSpeed learner's full gradients,
reduced over the ranks and read before the step, equal the single-process torch learner's on
the same global batch, per tensor and for every tensor, whether the ranks hold the batch evenly,
unevenly (3 rows against 1) or one rank holds nothing; then the weights after three plain-SGD
steps and the streamed export equal the torch learner's too."""

from pathlib import Path

import pytest
import torch
from ds_launch import run_ranks

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5


def run_worker(model_dir, out, zero_stage, options=""):
    """``tests/ds_worker.py grads`` on 2 ranks: what rank 0 saved to ``out``."""
    script = REPO / "tests" / "ds_worker.py"
    run_ranks(script, "grads", model_dir, str(out), str(zero_stage), options, timeout=540)
    return torch.load(out, weights_only=False)


def torch_reference(model_dir, options=""):
    """The torch learner, one process, the whole 4-row batch, the same three steps (SGD, or
    what ``options`` asks: :func:`ds_worker.learner_overrides`): per step (loss, full gradients
    of the trainable tensors before clipping), then the exported weights and the learner's
    log-probs of the batch after the steps."""
    from ds_worker import SCENARIOS, fixed_batch, learner_overrides

    from agent.models import load_model
    from trainer.config import load_config
    from trainer.learner import TorchLearner, apply_lora

    flags = set(filter(None, options.split(",")))
    cfg = load_config(None, [f"model.name={model_dir}", *learner_overrides(flags)])
    lm = load_model(model_dir)
    if "lora" in flags:
        torch.manual_seed(0)  # the adapters' initialisation, as the worker's
        lm = apply_lora(lm, cfg.trainer.lora)
    learner = TorchLearner(lm, cfg, torch.device("cpu"), len(SCENARIOS))
    batch = fixed_batch(learner.lm.config.vocab_size, uneven=True)
    steps = []
    for _ in SCENARIOS:
        batch.old_logprobs, _ = learner.logprobs(batch)
        out = learner.accumulate(batch, zeta=0.0, eps_high=0.28)
        grads = {
            k: p.grad.detach().clone() for k, p in learner.lm.named_parameters() if p.requires_grad
        }
        learner.finish(out)
        steps.append((out["loss/total"], grads))
    weights = {k: v.clone() for k, v in learner.named_weights()}
    return steps, weights, learner.logprobs(batch)[0]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """``reference(options)``: :func:`torch_reference` for the learner flags among ``options``
    (``lora``, ``adamw``), computed once per module."""
    cache: dict[str, tuple] = {}

    def get(options=""):
        key = ",".join(sorted(f for f in options.split(",") if f in ("lora", "adamw")))
        if key not in cache:
            cache[key] = torch_reference(tiny_model_dir, key)
        return cache[key]

    return get


def assert_matches_reference(ds, reference, model_dir, atol=ATOL):
    """The worker's three steps against the torch learner's: per scenario the loss and every
    trainable tensor's full gradient (before the step), then every exported weight, all to
    ``atol``; the exported (LoRA: merged) weights in a plain model give the learner's
    log-probs."""
    from ds_worker import fixed_batch

    from agent.models import load_model
    from trainer.learner import LogprobModel

    steps, weights, _ = reference
    assert ds["world"] == 2
    for (name, got), (loss, grads) in zip(ds["scenarios"].items(), steps, strict=True):
        assert got["nonfinite"] == 0.0, name
        assert got["same_keys_on_every_rank"], name  # the reduce of metrics needs equal keys
        assert got["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7), name
        assert set(got["grads"]) == set(grads), name
        assert max(g.abs().max().item() for g in grads.values()) > 1e-3  # a gradient to check
        for key, grad in grads.items():
            torch.testing.assert_close(
                got["grads"][key],
                grad,
                atol=atol,
                rtol=0,
                msg=lambda m, n=name, k=key: f"{n} {k}: {m}",
            )
    # the streamed export (many small buckets) gives every weight of the torch learner
    assert set(ds["weights"]) == set(weights)
    for key, weight in weights.items():
        torch.testing.assert_close(
            ds["weights"][key], weight, atol=atol, rtol=0, msg=lambda m, k=key: f"{k}: {m}"
        )
    plain = load_model(model_dir)
    assert set(ds["weights"]) == set(plain.state_dict())  # base names only, adapters merged
    plain.load_state_dict(ds["weights"])
    batch = fixed_batch(plain.config.vocab_size, uneven=True)
    with torch.no_grad():
        exported, _ = LogprobModel(plain)(
            batch.input_ids, batch.attention_mask, batch.target_ids, batch.loss_mask
        )
    assert exported.abs().sum() > 0
    torch.testing.assert_close(ds["logprobs"], exported, atol=atol, rtol=0)


@pytest.mark.slow
@pytest.mark.timeout(600)  # a rank waiting for a forward or backward the other never runs hangs
@pytest.mark.parametrize(
    "zero_stage, options",
    [(1, ""), (2, ""), (3, "init,offload"), (3, "init,lora")],
    ids=["zero1", "zero2", "zero3-partitioned-offload", "zero3-partitioned-lora"],
)
def test_zero_gradients_match_the_torch_learner_per_tensor_on_even_uneven_and_empty_ranks(
    tiny_model_dir, tmp_path, reference, zero_stage, options
):
    """LoRA on ZeRO-3: adapters added to the model built partitioned under zero.Init (as the
    loop does), their gradients and the merged exported weights equal the torch learner's."""
    ds = run_worker(tiny_model_dir, tmp_path / "grads.pt", zero_stage, options)
    assert_matches_reference(ds, reference(options), tiny_model_dir)
    if "lora" in options:
        assert ds["scenarios"]["even"]["grads"]  # adapters only: the base weights are frozen
        assert all("lora_" in key for key in ds["scenarios"]["even"]["grads"])
    if "init" in options:
        # built under zero.Init: each rank allocated about half of every tensor, not all of it
        built = ds["built"]
        assert built["partitioned"] and sum(built["partitioned"]) <= sum(built["full"]) / 2 + 64


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_built_partitioned_in_bf16_keeps_fp32_master_weights_and_offloads(
    tiny_model_dir, tmp_path
):
    """transformers' ZeRO-3 integration builds the model under zero.Init in the engine's dtype:
    each rank allocates half of the bf16 weights, never a full fp32 copy; the optimizer's
    master weights are fp32 (offloaded to the CPU here) and the updates run on every
    scenario, gradients reduced in fp32."""
    ds = run_worker(tiny_model_dir, tmp_path / "bf16.pt", 3, "init,offload,bf16")
    built = ds["built"]
    assert built["dtype"] == "torch.bfloat16"
    assert built["partitioned"] and sum(built["partitioned"]) <= sum(built["full"]) / 2 + 64
    assert ds["param_dtype"] == "torch.bfloat16" and ds["master_dtype"] == "torch.float32"
    for name, got in ds["scenarios"].items():
        assert got["nonfinite"] == 0.0 and got["grad_norm"] > 0, name
        assert got["same_keys_on_every_rank"], name
        assert all(g.dtype == torch.float32 for g in got["grads"].values()), name
    assert all(w.dtype == torch.bfloat16 for w in ds["weights"].values())
