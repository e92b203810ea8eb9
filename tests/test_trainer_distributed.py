"""The loop's collectives (trainer.distributed) on a real process group (gloo here, NCCL on a
GPU machine), and a whole `eprl train` under 2 gloo ranks with the DeepSpeed learner."""

import json
import math
from pathlib import Path

import pytest
import torch
from ds_launch import run_ranks

from trainer.config import load_config
from trainer.distributed import (
    all_reduce,
    any_rank,
    collective_device,
    gather_objects,
    reduce_metrics,
)
from trainer.loop import Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def process_group(tmp_path, request):
    backend = getattr(request, "param", "gloo")
    torch.distributed.init_process_group(
        backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield backend
    torch.distributed.destroy_process_group()


def test_collectives_run_on_the_groups_device_and_reduce(process_group):
    assert collective_device() == torch.device("cpu")
    assert all_reduce(torch.tensor([1.5, -2.0]), "max").tolist() == [1.5, -2.0]
    assert any_rank(True) and not any_rank(False)
    metrics = {"reward/mean": 0.25, "ratio/max": 3.0}
    assert reduce_metrics(metrics) == metrics
    assert gather_objects({"task": "a"}) == [{"task": "a"}]
    with pytest.raises(ValueError, match="op must be 'sum' or 'max', got 'mean'"):
        all_reduce(torch.ones(1), "mean")


def _weighted_reduce_rank(rank, store, out):
    """One of 2 gloo ranks: rank 0 learned on 3 tokens, rank 1 on none (NaN means, -inf
    maxima), then both on some tokens."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2
    )
    try:
        first = [
            ({"entropy/mean": 1.0, "ratio/max": 2.0}, 3.0),
            ({"entropy/mean": float("nan"), "ratio/max": float("-inf")}, 0.0),
        ][rank]
        second = [
            ({"entropy/mean": 1.0, "ratio/max": 2.0}, 3.0),
            ({"entropy/mean": 3.0, "ratio/max": 5.0}, 1.0),
        ][rank]
        results = [
            reduce_metrics(first[0], weight=first[1]),
            reduce_metrics(second[0], weight=second[1]),
            reduce_metrics({"reward/mean": float(rank)}),
            # a rank without episodes lacks the key: the others' value, and no collective hangs
            reduce_metrics({"episodes/kept": 4.0} if rank == 0 else {}),
        ]
        if rank == 0:
            torch.save(results, out)
    finally:
        torch.distributed.destroy_process_group()


def test_weighted_metrics_cover_every_ranks_tokens_and_leave_out_a_rank_without_any(tmp_path):
    torch.multiprocessing.spawn(
        _weighted_reduce_rank, args=(tmp_path / "store", tmp_path / "out.pt"), nprocs=2
    )
    no_tokens, both, plain, missing = torch.load(tmp_path / "out.pt")
    assert no_tokens == {"entropy/mean": 1.0, "ratio/max": 2.0}  # rank 1's NaN and -inf ignored
    assert both == {"entropy/mean": (1.0 * 3 + 3.0 * 1) / 4, "ratio/max": 5.0}  # token-weighted
    assert plain == {"reward/mean": 0.5}  # unweighted: the mean of the ranks
    assert missing == {"episodes/kept": 4.0}


@pytest.mark.gpu
@pytest.mark.parametrize("process_group", ["nccl"], indirect=True)
def test_nccl_collectives_take_gpu_tensors(process_group):
    torch.cuda.set_device(0)
    assert collective_device().type == "cuda"
    assert all_reduce(torch.tensor([2.0]), "sum").tolist() == [2.0]  # CPU in, CPU out
    assert any_rank(True)


def test_fewer_tasks_per_step_than_ranks_is_refused_before_anything_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, ["rollout.tasks_per_step=1", "model.name=/no/such/model"])
    with pytest.raises(ValueError, match=r"tasks_per_step=1 is less than the 2 ranks"):
        Trainer(cfg, tmp_path / "run").setup()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_eprl_train_on_two_deepspeed_ranks_writes_one_run(tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node 2 eprl.py train` with ZeRO-2 on gloo: both ranks roll out their
    share of the tasks and of the evaluation (3 eval tasks: rank 0 gets 2, rank 1 gets 1), the
    metrics are averaged, rank 0 alone writes metrics, checkpoints and the report."""
    overrides = {
        "model.name": tiny_model_dir,
        "policy.backend": "hf",  # the learner's own module on each rank
        "steps": 2,
        "rollout.tasks_per_step": 2,
        "rollout.group_size": 2,
        "rollout.max_new_tokens": 8,
        "rollout.max_context_tokens": 512,
        "eval.num_tasks": 3,
        "eval.k": 2,
        "eval.at_start": True,
        "eval.at_end": True,
        "checkpoint.every": 1,
        "checkpoint.keep_last": 2,
        "logging.runs_root": str(tmp_path),
        "logging.run_name": "run",
        "logging.progress": False,
        "logging.tensorboard": False,
        "trainer.learner": "deepspeed",
        "trainer.device": "cpu",
        "trainer.deepspeed.zero_stage": 2,
        "trainer.micro_batch_size": 2,
        "trainer.skip_no_signal": False,
        "objective.overlong_filter": False,
        "objective.target_entropy_tasks": 0,
    }
    run_ranks(
        REPO / "eprl.py",
        "train",
        str(REPO / "configs" / "quickstart.yaml"),
        *(f"{key}={value}" for key, value in overrides.items()),
        timeout=560,
    )
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]  # one writer: no row twice
    assert {"eval/dev/pass@1", "eval/dev/pass@k"} <= set(rows[0]) & set(rows[2])
    assert "loss/total" in rows[1] and "loss/total" in rows[2]
    assert all(0.0 <= row["eval/dev/pass@1"] <= 1.0 for row in rows if "eval/dev/pass@1" in row)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1", "step_2"]
    assert (run_dir / "checkpoints" / "step_2" / "deepspeed").is_dir()
    assert (run_dir / "report.md").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)  # a rank left waiting in a collective the other never joins would hang
def test_eprl_train_steps_every_rank_when_one_keeps_no_episode(tiny_model_dir, tmp_path):
    """`eprl train` on 2 DeepSpeed ranks (ZeRO-2) where, in every step, one rank's whole group is
    dropped by the LOOP |A| filter (a task the tiny model always fails: all rewards 0) and the
    other rank has a learning signal: the empty rank joins the learner's passes (old log-probs,
    two mini-batch steps) with no rows, the run completes, the metrics of every step have the
    same keys and count the empty rank, and the other rank's signal moves the weights,
    identically on both ranks and in the checkpoint."""
    from ds_worker import HALF_LEARNABLE_ENV
    from safetensors.torch import load_file

    group = 4
    overrides = {
        "model.name": tiny_model_dir,
        "env.id": HALF_LEARNABLE_ENV,
        "env.kwargs": "{}",
        "policy.backend": "hf",
        "steps": 2,
        "rollout.tasks_per_step": 2,  # one task per rank: `learnable` on one, `impossible` on the other
        "rollout.group_size": group,
        "rollout.max_new_tokens": 6,
        "rollout.max_context_tokens": 512,
        "eval.at_start": False,
        "eval.at_end": False,
        "checkpoint.every": 2,
        "checkpoint.keep_last": 1,
        "logging.runs_root": str(tmp_path),
        "logging.run_name": "run",
        "logging.progress": False,
        "logging.tensorboard": False,
        "trainer.learner": "deepspeed",
        "trainer.device": "cpu",
        "trainer.deepspeed.zero_stage": 2,
        "trainer.micro_batch_size": 2,
        "trainer.mini_batches": 2,  # the empty rank steps twice on empty parts
        "trainer.lr": 1e-3,
        "objective.old_logprobs": "learner",  # and runs the old log-probs' forwards with no rows
        "objective.adv_filter_threshold": 0.01,
        "objective.overlong_filter": False,  # every 6-token reply is cut at the cap
        "objective.target_entropy_tasks": 0,
        "objective.repo.variant": "none",
    }
    run_ranks(
        REPO / "tests" / "ds_worker.py",
        "train",
        str(tmp_path),
        str(REPO / "configs" / "quickstart.yaml"),
        *(f"{key}={value}" for key, value in overrides.items()),
        timeout=280,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    kept = list(zip(ranks[0]["kept"], ranks[1]["kept"], strict=True))
    assert len(kept) == 2
    for counts in kept:  # one rank kept nothing, the other its group (a signal)
        assert min(counts) == 0 and 0 < max(counts) <= group, kept

    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(set(row) == set(rows[0]) for row in rows)  # the empty rank's keys too
    for row, counts in zip(rows, kept, strict=True):
        assert row["episodes/kept"] == sum(counts) / 2  # the mean over ranks, the empty one in
        assert row["train/no_signal"] == 0.0 and row["nonfinite/total"] == 0.0
        assert row["grad/norm"] > 0 and math.isfinite(row["loss/total"])

    initial = load_file(Path(tiny_model_dir) / "model.safetensors")
    first, second = ranks[0]["weights"], ranks[1]["weights"]
    saved = load_file(run_dir / "checkpoints" / "step_2" / "model.safetensors")
    assert set(first) == set(second) and set(saved) <= set(first)
    assert all(torch.equal(first[k], second[k]) for k in first)  # one model on both ranks
    assert all(torch.equal(saved[k], first[k]) for k in saved)
    moved = [k for k in initial if not torch.equal(initial[k], first[k])]
    assert moved, "the rank with a signal did not move the weights"
