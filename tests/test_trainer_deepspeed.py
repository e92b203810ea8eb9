"""DeepSpeed for real: ZeRO-2 with 2 gloo processes on CPU against the torch learner."""

import json
import sys
from pathlib import Path

import pytest
import torch
from ds_launch import run_ranks

REPO = Path(__file__).resolve().parents[1]


def run_deepspeed(
    model_dir, out, zero_stage=2, dtype="float32", nproc=2, lora="none", shard="even"
):
    args = (model_dir, str(out), str(zero_stage), dtype, lora, shard)
    run_ranks(REPO / "tests" / "ds_worker.py", *args, nproc=nproc, timeout=600)
    return json.loads(Path(out).read_text())


def torch_learner_step(model_dir, uneven=False):
    """The single-process torch learner's step on the whole fixed batch: (loss, weight sums
    before, weight sums after)."""
    from agent.models import load_model
    from trainer.config import load_config
    from trainer.learner import TorchLearner

    sys.path.insert(0, str(REPO / "tests"))
    from ds_worker import fixed_batch

    cfg = load_config(
        None, [f"model.name={model_dir}", "trainer.lr=1e-3", "trainer.micro_batch_size=1"]
    )
    learner = TorchLearner(load_model(model_dir), cfg, torch.device("cpu"), total_updates=1)
    batch = fixed_batch(learner.lm.config.vocab_size, uneven=uneven)
    batch.old_logprobs, _ = learner.logprobs(batch)
    before = {k: v.double().sum().item() for k, v in learner.named_weights()}
    metrics = learner.update(batch, zeta=0.0, eps_high=0.28)
    after = {k: v.double().sum().item() for k, v in learner.named_weights()}
    return metrics["loss/total"], before, after


@pytest.mark.slow
@pytest.mark.timeout(300)  # a rank waiting for a backward the other never runs would hang
def test_uneven_ranks_complete_the_update_and_match_the_global_token_mean(tiny_model_dir, tmp_path):
    """Rank 0 holds 3 rows (18 tokens), rank 1 one row (2 tokens): the ranks agree on the number
    of backward passes and weigh their losses by their share of the batch's tokens, so the step
    equals the torch learner's on the whole batch (the mean of per-rank token means would weigh
    rank 1's 2 tokens like rank 0's 18)."""
    ds = run_deepspeed(tiny_model_dir, tmp_path / "uneven.json", shard="uneven")
    loss, before, after = torch_learner_step(tiny_model_dir, uneven=True)
    assert ds["loss"] == pytest.approx(loss, rel=1e-5, abs=1e-7)
    moved = [k for k in after if abs(after[k] - before[k]) > 1e-6]
    assert moved
    for key in moved:
        assert ds["weights"][key] == pytest.approx(after[key], rel=1e-4, abs=1e-4), key


@pytest.mark.slow
def test_zero2_two_processes_match_the_torch_learner(tiny_model_dir, tmp_path):
    from agent.models import load_model
    from trainer.config import load_config
    from trainer.learner import TorchLearner

    sys.path.insert(0, str(REPO / "tests"))
    from ds_worker import fixed_batch

    ds = run_deepspeed(tiny_model_dir, tmp_path / "ds.json")
    assert ds["world"] == 2

    cfg = load_config(
        None, [f"model.name={tiny_model_dir}", "trainer.lr=1e-3", "trainer.micro_batch_size=1"]
    )
    learner = TorchLearner(load_model(tiny_model_dir), cfg, torch.device("cpu"), total_updates=1)
    batch = fixed_batch(learner.lm.config.vocab_size)
    batch.old_logprobs, _ = learner.logprobs(batch)
    before = {k: v.double().sum().item() for k, v in learner.named_weights()}
    metrics = learner.update(batch, zeta=0.0, eps_high=0.28)
    after = {k: v.double().sum().item() for k, v in learner.named_weights()}

    # equal token counts per rank: the mean of the ranks' token means is the batch's token mean
    assert ds["loss"] == pytest.approx(metrics["loss/total"], rel=1e-5, abs=1e-7)
    moved = [k for k in after if abs(after[k] - before[k]) > 1e-6]
    assert moved, "the torch learner's step changed nothing"
    for key in moved:
        assert ds["weights"][key] == pytest.approx(after[key], rel=1e-4, abs=1e-4), key
    assert ds["fp32_error"] < 1e-5


@pytest.mark.slow
def test_lora_on_zero2_matches_the_torch_learner_and_exports_merged_weights(
    tiny_model_dir, tmp_path
):
    from agent.models import load_model
    from trainer.config import load_config
    from trainer.learner import TorchLearner

    sys.path.insert(0, str(REPO / "tests"))
    from ds_worker import LORA_OVERRIDES, fixed_batch, lora_model

    ds = run_deepspeed(tiny_model_dir, tmp_path / "lora.json", lora="lora")
    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            "trainer.lr=1e-3",
            "trainer.micro_batch_size=1",
            *LORA_OVERRIDES,
        ],
    )
    learner = TorchLearner(lora_model(tiny_model_dir, cfg), cfg, torch.device("cpu"), 1)
    batch = fixed_batch(learner.lm.config.vocab_size)
    batch.old_logprobs, _ = learner.logprobs(batch)
    before = {k: v.double().sum().item() for k, v in learner.named_weights()}
    learner.update(batch, zeta=0.0, eps_high=0.28)
    after = {k: v.double().sum().item() for k, v in learner.named_weights()}
    assert set(ds["weights"]) == set(after) == set(load_model(tiny_model_dir).state_dict())
    moved = [k for k in after if abs(after[k] - before[k]) > 1e-7]
    assert moved and all("proj" in k for k in moved), moved
    for key in after:
        assert ds["weights"][key] == pytest.approx(after[key], rel=1e-4, abs=1e-4), key


@pytest.mark.slow
def test_bf16_engine_keeps_the_fp32_loss_path(tiny_model_dir, tmp_path):
    ds = run_deepspeed(tiny_model_dir, tmp_path / "bf16.json", zero_stage=2, dtype="bfloat16")
    assert ds["param_dtype"] == "torch.bfloat16"  # DeepSpeed cast the weights...
    assert ds["logprob_dtype"] == "torch.float32"  # ...but not the logits
    # log-probs equal a float64 projection of the same bf16 hidden states and weights
    assert ds["fp32_error"] < 1e-5
