"""The shared-prefix and packed forward under DeepSpeed ZeRO-2 and ZeRO-3 (parameters gathered
in every forward: the shared prompt's and each packed row's) with 2 gloo processes on CPU: the
step equals the torch learner's with the plain padded forward, row by row."""

import json
import sys
from pathlib import Path

import pytest
import torch
from ds_launch import run_ranks

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_zero_with_shared_prefix_matches_the_unshared_torch_learner(
    tiny_model_dir, tmp_path, stage
):
    from agent.models import load_model
    from trainer.config import load_config
    from trainer.learner import TorchLearner

    sys.path.insert(0, str(REPO / "tests"))
    from ds_packing_worker import K, packing_batch

    out = tmp_path / "ds.json"
    run_ranks(
        REPO / "tests" / "ds_packing_worker.py", tiny_model_dir, str(out), str(stage), timeout=600
    )
    ds = json.loads(out.read_text())
    assert ds["world"] == 2 and ds["layout"] == "packed"
    assert ds["shared_total"] > 0  # both ranks computed their group's prompt once

    cfg = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            "trainer.lr=1e-3",
            "trainer.micro_batch_size=1",  # every row alone: no sharing, no padding at all
            "trainer.shared_prefix=off",
            "trainer.packing=off",
        ],
    )
    learner = TorchLearner(load_model(tiny_model_dir), cfg, torch.device("cpu"), total_updates=1)
    batch = packing_batch(learner.lm.config.vocab_size)
    assert len(batch) == 2 * K
    batch.old_logprobs, _ = learner.logprobs(batch)
    before = {k: v.double().sum().item() for k, v in learner.named_weights()}
    metrics = learner.update(batch, zeta=0.0, eps_high=0.28)
    after = {k: v.double().sum().item() for k, v in learner.named_weights()}
    assert ds["loss"] == pytest.approx(metrics["loss/total"], rel=1e-5, abs=1e-7)
    assert ds["grad_norm"] == pytest.approx(metrics["grad/norm"], rel=1e-4)
    moved = [k for k in after if abs(after[k] - before[k]) > 1e-6]
    assert moved, "the torch learner's step changed nothing"
    for key in moved:
        assert ds["weights"][key] == pytest.approx(after[key], rel=1e-4, abs=1e-4), key
