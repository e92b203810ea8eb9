"""GPU smoke run (one GPU, under 10 minutes): the scale path end to end, measured.

A short ``eprl train`` of the embedded model (SmolLM2-135M-Instruct) on CodeExec under the
DeepSpeed learner (NCCL, world size 1, ZeRO-3 by default), bf16 weights with fp32 master
weights, the FP32 loss path and an fp32 LM head in the sampler, gradient checkpointing, and the
in-process vLLM backend receiving the streamed weights after every step. Then the weight export
alone is timed on the last checkpoint. Prints and writes ``benchmarks/results/gpu_smoke.md``:
step time (rollout + learn), peak GPU memory (nvidia-smi, every 0.5 s), mismatch KL per step,
weight-export time.

    .venv/bin/python benchmarks/gpu_smoke.py                 # needs a CUDA GPU and vLLM
    .venv/bin/python benchmarks/gpu_smoke.py --print-only    # the commands, anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--zero-stage", type=int, default=3, choices=[1, 2, 3])
    parser.add_argument("--runs-root", default=str(ROOT / "runs" / "gpu_smoke"))
    parser.add_argument("--timeout-s", type=int, default=480, help="limit for the training run")
    parser.add_argument(
        "--sandbox", default="bwrap", choices=["bwrap", "rlimits-only"], help="CodeExec sandbox"
    )
    parser.add_argument("--print-only", action="store_true", help="print the commands, run none")
    parser.add_argument("--export-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.timeout_s < 1:
        parser.error(f"--steps and --timeout-s must be >= 1, got {args.steps}, {args.timeout_s}")
    return args


def overrides(args: argparse.Namespace) -> list[str]:
    values = {
        "model.name": args.model,
        "model.dtype": "bfloat16",
        "steps": args.steps,
        "trainer.learner": "deepspeed",
        "trainer.device": "cuda",
        "trainer.deepspeed.zero_stage": args.zero_stage,
        "trainer.gradient_checkpointing": "true",
        "trainer.micro_batch_size": 4,
        "precision.loss": "fp32",
        "policy.backend": "vllm",
        "policy.vllm.dtype": "bfloat16",
        "policy.vllm.fp32_head": "true",
        "policy.vllm.gpu_memory_utilization": 0.3,
        "policy.vllm.enforce_eager": "true",
        "rollout.tasks_per_step": 8,
        "rollout.group_size": 8,
        "objective.target_entropy_tasks": 0,
        "eval.at_start": "false",
        "eval.at_end": "false",
        "checkpoint.every": args.steps,
        "checkpoint.keep_last": 1,
        "logging.runs_root": args.runs_root,
        "logging.run_name": "run",
        "logging.progress": "false",
        "env.kwargs": json.dumps(
            {
                "task_set": "procedural",
                "max_turns": 1,
                "families": ["arithmetic"],
                "levels": [1],
                "sandbox": {"mode": args.sandbox},
            }
        ),
    }
    return [f"{k}={v}" for k, v in values.items()]


def launcher(script: list[str], port: int) -> list[str]:
    """torchrun with one process: a real NCCL process group of world size 1."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_port",
        str(port),
        *script,
    ]


def train_command(args: argparse.Namespace) -> list[str]:
    script = [str(ROOT / "eprl.py"), "train", str(ROOT / "configs" / "quickstart.yaml")]
    return launcher([*script, *overrides(args)], 29650)


def export_command(args: argparse.Namespace, checkpoint: Path) -> list[str]:
    return launcher(
        [
            __file__,
            f"--export-worker={checkpoint}",
            f"--zero-stage={args.zero_stage}",
            f"--model={args.model}",
        ],
        29651,
    )


class GpuMemory:
    """Peak used GPU memory (MiB, all processes: learner and vLLM), from nvidia-smi."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
        while not self._stop.is_set():
            out = subprocess.run(query, capture_output=True, text=True).stdout.split()
            if out:
                self.peak = max(self.peak, int(out[0]))
            self._stop.wait(0.5)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def export_worker(args: argparse.Namespace) -> None:
    """Time the streamed export (bf16) of the checkpoint's weights, drained to the CPU."""
    import torch

    from agent.models import load_model
    from trainer.config import load_config
    from trainer.deepspeed_learner import DeepSpeedLearner, init_distributed, zero3_construction

    cfg = load_config(
        None,
        [
            f"model.name={args.export_worker}",
            "model.dtype=bfloat16",
            "trainer.learner=deepspeed",
            "trainer.device=cuda",
            f"trainer.deepspeed.zero_stage={args.zero_stage}",
            "policy.backend=vllm",
        ],
    )
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    init_distributed(device, 600)
    keep = zero3_construction(cfg)
    learner = DeepSpeedLearner(load_model(args.export_worker), cfg, device, total_updates=1)
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        numel = sum(t.numel() for _, t in learner.named_weights(dtype=torch.bfloat16))
        times.append(time.perf_counter() - start)
    print("EXPORT " + json.dumps({"seconds": times, "numel": numel}))
    del keep


def flash_varlen_check(model: str) -> str:
    """The learner's forward on flash-attention's varlen kernel (rows packed into one, bf16 body)
    against sdpa's padded forward in bf16, both measured against sdpa in float32: the result's
    line. The CPU test of the same path runs a reference kernel (tests/test_trainer_packing.py)."""
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None:
        return "- flash-attention varlen packing: not checked (flash-attn is not installed)"
    import torch
    from transformers import AutoConfig

    from agent.models import load_model, resolve_model
    from trainer.learner import LogprobModel

    lengths = [37, 64, 90, 128]
    width = max(lengths)
    vocab = AutoConfig.from_pretrained(resolve_model(model)).vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(200, vocab, (len(lengths), width), generator=gen).cuda()
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long().cuda()
    logprobs, layouts = {}, {}
    for name, attention, autocast in (
        ("sdpa fp32", "sdpa", None),
        ("sdpa bf16", "sdpa", torch.bfloat16),
        ("flash bf16", "flash_attention_2", torch.bfloat16),
    ):
        lm = load_model(model, device="cuda", attn_implementation=attention)
        mode = "off" if attention == "sdpa" else "auto"
        forward = LogprobModel(lm, autocast_dtype=autocast, shared_prefix=mode, packing=mode)
        with torch.no_grad():
            logprobs[name], _ = forward(ids, mask, torch.roll(ids, -1, 1))
        layouts[name] = forward.last_layout["layout"]
        del lm, forward
        torch.cuda.empty_cache()
    used = mask.bool()

    def gap(name: str) -> float:
        return float((logprobs[name] - logprobs["sdpa fp32"])[used].abs().mean())

    verdict = "ok" if gap("flash bf16") <= 2 * gap("sdpa bf16") + 1e-6 else "TOO LARGE"
    return (
        f"- flash-attention varlen packing ({layouts['flash bf16']} layout, rows of "
        f"{lengths} tokens): mean |log-prob gap| to sdpa fp32 {gap('flash bf16'):.2e}, "
        f"sdpa bf16 padded {gap('sdpa bf16'):.2e} ({verdict}: within 2x)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.export_worker:
        export_worker(args)
        return 0
    train = train_command(args)
    checkpoint = Path(args.runs_root) / "run" / "checkpoints" / f"step_{args.steps}"
    export = export_command(args, checkpoint)
    if args.print_only:
        print(shlex.join(train))
        print(shlex.join(export))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device here (use --print-only to see the commands)")
        return 2
    from _bench_util import machine, now, write_result

    started, machine_line = now(), machine()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    run_dir = Path(args.runs_root) / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    wall = time.perf_counter()
    with GpuMemory() as gpu:
        subprocess.run(train, cwd=ROOT, env=env, check=True, timeout=args.timeout_s)
    wall = time.perf_counter() - wall
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["step"] > 0]
    step_s = [r["perf/rollout_s"] + r["perf/learn_s"] for r in steps]
    done = subprocess.run(export, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("EXPORT "))
    exported = json.loads(line.removeprefix("EXPORT "))
    body = "\n".join(
        [
            f"`eprl train` {args.steps} steps of {args.model}, DeepSpeed ZeRO-{args.zero_stage} "
            "(NCCL, world 1), bf16 weights + fp32 master, FP32 loss path and vLLM fp32 head, "
            f"gradient checkpointing, vLLM in process; wall {wall:.0f} s including start-up.",
            "",
            "| step | rollout s | learn s | mismatch/kl | grad/norm |",
            "|---|---|---|---|---|",
            *(
                f"| {r['step']} | {r['perf/rollout_s']:.1f} | {r['perf/learn_s']:.1f} | "
                f"{r.get('mismatch/kl', float('nan')):.2e} | {r.get('grad/norm', float('nan')):.3f} |"
                for r in steps
            ),
            "",
            f"- step time: median {statistics.median(step_s):.1f} s "
            f"[{min(step_s):.1f}-{max(step_s):.1f}]",
            f"- peak GPU memory (nvidia-smi, learner + vLLM): {gpu.peak} MiB",
            f"- weight export ({exported['numel'] / 1e6:.0f}M parameters, bf16, streamed): "
            + ", ".join(f"{s:.2f}" for s in exported["seconds"])
            + " s",
            flash_varlen_check(args.model),
        ]
    )
    path = write_result("gpu_smoke", "GPU smoke run", body, started, machine_line)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
