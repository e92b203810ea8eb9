"""`eprl train` on 2 gloo ranks with the DeepSpeed learner (ZeRO-2), on a task the tiny model
learns (a real gradient), REPO-R and ADAPO on: a run SIGKILLed after a checkpoint and resumed
equals the uninterrupted run bit for bit (loss, grad norm, zeta, eps_high, final weights);
the same resume without the engine's optimizer state does not."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ds_launch import free_port

REPO = Path(__file__).resolve().parents[1]
COMPARED = ("loss/total", "grad/norm", "repo/zeta", "adapo/eps_high", "reward/mean")


def command(args, port):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(REPO / "eprl.py"),
        "train",
        *args,
    ]


def environment():
    path = f"{REPO}{os.pathsep}{REPO / 'tests'}"
    return {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def overrides(model_dir, root):
    from ds_worker import DIGIT_ENV

    values = {
        "model.name": model_dir,
        "env.id": DIGIT_ENV,
        "env.kwargs": "{}",
        "steps": 3,
        "rollout.tasks_per_step": 2,
        "rollout.group_size": 2,
        "rollout.max_new_tokens": 6,
        "rollout.max_context_tokens": 512,
        "eval.at_start": False,
        "eval.at_end": False,
        "checkpoint.every": 1,
        "checkpoint.keep_last": 3,
        "logging.runs_root": str(root),
        "logging.run_name": "run",
        "logging.progress": False,
        "logging.tensorboard": False,
        "policy.backend": "hf",  # the tiny model's head_dim 16 has no vLLM CPU kernel
        "trainer.learner": "deepspeed",
        "trainer.device": "cpu",
        "trainer.deepspeed.zero_stage": 2,
        "trainer.micro_batch_size": 2,
        "trainer.lr": 3e-3,
        "trainer.skip_no_signal": False,
        "objective.overlong_filter": False,
        "objective.target_entropy_tasks": 0,
        "objective.repo.variant": "r",
        "objective.adapo.enabled": True,
    }
    return [str(REPO / "configs" / "quickstart.yaml"), *(f"{k}={v}" for k, v in values.items())]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "checkpoints" / "step_3" / "model.safetensors")


def run(args, port, timeout=420):
    done = subprocess.run(
        command(args, port),
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_rank_deepspeed_run_killed_and_resumed_equals_the_uninterrupted_run(
    tiny_model_dir, tmp_path
):
    from test_trainer_loop import peaked_copy

    from trainer.checkpoint import latest_checkpoint

    model = str(tmp_path / "peaked")
    peaked_copy(tiny_model_dir, model)
    run(overrides(model, tmp_path / "straight"), free_port())
    straight_dir = tmp_path / "straight" / "run"
    straight = rows(straight_dir)
    assert [r["step"] for r in straight] == [1, 2, 3]
    assert sorted(p.name for p in (straight_dir / "checkpoints").iterdir()) == [
        "step_1",
        "step_2",
        "step_3",
    ]
    for step in (1, 2, 3):  # every rank's RNG streams and the engine's partitioned state
        folder = straight_dir / "checkpoints" / f"step_{step}"
        assert {"rng_rank0.pt", "rng_rank1.pt", "deepspeed"} <= {p.name for p in folder.iterdir()}
    assert any(r["grad/norm"] > 0 for r in straight)  # a gradient to lose

    # killed (the launcher and both ranks, SIGKILL) once step 1's checkpoint is complete
    killed_dir = tmp_path / "killed" / "run"
    proc = subprocess.Popen(
        command(overrides(model, tmp_path / "killed"), free_port()),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 420
        while not (killed_dir / "checkpoints" / "step_1").is_dir():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint within 420 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed_from = latest_checkpoint(killed_dir)
    assert resumed_from.name in ("step_1", "step_2"), resumed_from
    lost_dir = tmp_path / "lost" / "run"
    shutil.copytree(killed_dir, lost_dir)

    run(["--resume", str(killed_dir)], free_port())
    resumed = rows(killed_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed, strict=True):
        for key in COMPARED:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    weights, again = final_weights(straight_dir), final_weights(killed_dir)
    assert set(weights) == set(again)
    assert all(torch.equal(weights[k], again[k]) for k in weights)

    # without the engine's optimizer state AdamW restarts its moments: the run diverges
    shutil.rmtree(lost_dir / "checkpoints" / resumed_from.name / "deepspeed")
    run(["--resume", str(lost_dir)], free_port())
    lost = final_weights(lost_dir)
    assert not all(torch.equal(weights[k], lost[k]) for k in weights)
