"""The AppWorld GPU configs start: their dry run (`python -m trainer.ds_dryrun CONFIG`) resolves
the config, prints the real model's memory arithmetic and builds the DeepSpeed engine on the
CPU for a tiny model of the same architecture family (ZeRO-3, bf16, offload, LoRA, gradient
checkpointing as configured), then runs one update."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.ds_dryrun import memory_lines

REPO = Path(__file__).resolve().parents[1]
GiB = 2**30


def test_memory_arithmetic_of_zero3_with_offload():
    """7e9 bf16 parameters on 8 GPUs, ZeRO-3, optimizer offloaded: 1.75e9 B of weights and of
    grads per GPU, (4 + 8) B x 7e9 / 8 of master weights and Adam moments per host rank."""
    cfg = load_config(
        None,
        [
            "trainer.learner=deepspeed",
            "model.dtype=bfloat16",
            "trainer.deepspeed.zero_stage=3",
            "trainer.deepspeed.offload_optimizer=true",
            "policy.backend=vllm",
            "policy.vllm.gpu_memory_utilization=0.5",
        ],
    )
    lines = memory_lines(cfg, numel=7 * 10**9, trainable=7 * 10**9, world=8, gpu_gib=80.0)
    text = "\n".join(lines)
    assert f"weights  {7e9 * 2 / 8 / GiB:7.1f} GiB/GPU" in text
    assert f"grads    {7e9 * 2 / 8 / GiB:7.1f} GiB/GPU" in text
    assert f"adam m,v {7e9 * 8 / 8 / GiB:7.1f} GiB/host rank" in text
    assert f"learner  {7e9 * 4 / 8 / GiB:7.1f} GiB/GPU" in text  # weights + grads only
    assert f"sampler  {40.0:7.1f} GiB/GPU" in text
    assert f"host {7e9 * 12 / GiB:.0f} GiB for 8 ranks" in text
    assert f"checkpoint {5e9 / GiB:5.1f} GiB of host RAM on rank 0" in text  # one 5 GB shard


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "config, extra, family",
    [
        ("appworld_qwen2.5_7b_repo_r.yaml", [], "qwen2"),
        ("appworld_qwen2.5_7b_repo_r.yaml", ["trainer.lora.enabled=true"], "qwen2"),
        ("appworld_qwen3_32b_rloo_fp32.yaml", ["--gpu-gib", "141"], "qwen3"),
    ],
    ids=["7b", "7b-lora", "32b-offload"],
)
def test_appworld_config_dry_run_builds_the_engine(config, extra, family):
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "trainer.ds_dryrun", str(REPO / "configs" / config), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    out = done.stdout
    assert "eprl dry run: Qwen/" in out and "GiB/GPU" in out and "total" in out
    assert f"engine on CPU for a tiny {family}: DeepSpeedEngine" in out
    assert "weights torch.bfloat16, gradient checkpointing on, one update done" in out
    if "lora" in " ".join(extra):
        assert "(LoRA r=64)" in out


def test_gpu_smoke_script_builds_a_valid_training_command():
    """benchmarks/gpu_smoke.py (run on a GPU machine): its `eprl train` overrides are a valid
    config of the scale path (DeepSpeed on CUDA, bf16, gradient checkpointing, vLLM with an
    fp32 head), and bad arguments are refused naming the value."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_smoke

    args = gpu_smoke.parse_args(["--steps", "3", "--sandbox", "rlimits-only"])
    command = gpu_smoke.train_command(args)
    assert command[command.index("--nproc_per_node") + 1] == "1"
    cfg = load_config(REPO / "configs" / "quickstart.yaml", gpu_smoke.overrides(args))
    assert cfg.trainer.learner == "deepspeed" and cfg.trainer.device == "cuda"
    assert cfg.model.dtype == "bfloat16" and cfg.trainer.gradient_checkpointing
    assert cfg.policy.backend == "vllm" and cfg.policy.vllm.fp32_head
    assert cfg.precision.loss == "fp32" and cfg.steps == 3
    assert cfg.env.kwargs["sandbox"] == {"mode": "rlimits-only"}
    with pytest.raises(SystemExit):
        gpu_smoke.parse_args(["--steps", "0"])
