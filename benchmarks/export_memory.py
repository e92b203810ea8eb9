"""Peak extra memory of the DeepSpeed learner's weight export under ZeRO-3 (2 gloo ranks, CPU).

``DeepSpeedLearner.named_weights`` streams: it gathers one bucket of whole modules at a time,
copies it in the sampler's dtype, yields it and releases it before the next. Its peer in the
same run is the export this replaced: every ZeRO-3 parameter gathered at once and the model
cloned in fp32. For each, the peak resident memory above the level before the export is
sampled (every 5 ms, psutil) on every rank while a consumer drains the weights one tensor at a
time, the way the vLLM sampler loads them, for models of two depths. Target: the streamed
peak follows the largest bucket (the gathered bucket plus its copy), not the model.

    .venv/bin/python benchmarks/export_memory.py            # writes results/export_memory.md
    .venv/bin/python benchmarks/export_memory.py --layers 4 --repeats 1   # one size, quicker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MiB = 2**20


def worker(args: argparse.Namespace) -> None:
    """One rank: build a Llama under zero.Init, the learner, then measure both exports."""
    import deepspeed
    import torch
    from _bench_util import RssSampler
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.config import load_config
    from trainer.deepspeed_learner import (
        DeepSpeedLearner,
        _export_groups,
        deepspeed_config,
        init_distributed,
    )

    cfg = load_config(
        None,
        [
            "trainer.learner=deepspeed",
            "trainer.device=cpu",
            "trainer.deepspeed.zero_stage=3",
            f"trainer.deepspeed.export_bucket_numel={args.bucket_numel}",
            "policy.backend=vllm",  # (not started) ZeRO-3 on 2 ranks refuses the hf policy
        ],
    )
    init_distributed(torch.device("cpu"), 600)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=int(args.layers),
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg)):
        lm = LlamaForCausalLM(config)
    learner = DeepSpeedLearner(lm, cfg, torch.device("cpu"), total_updates=1)
    dtype = torch.bfloat16
    state = learner.lm.state_dict(keep_vars=True)
    buckets = _export_groups(learner.lm, args.bucket_numel)
    numel = [sum(int(getattr(state[k], "ds_numel", state[k].numel())) for k in b) for b in buckets]
    model_numel = sum(int(getattr(p, "ds_numel", p.numel())) for p in learner.lm.parameters())

    def streamed() -> int:
        count = 0
        for _, tensor in learner.named_weights(dtype=dtype):
            count += tensor.numel()
            del tensor
        return count

    def all_at_once() -> int:  # the export this replaced
        params = list(learner.lm.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            full = {k: t.detach().float().clone() for k, t in learner.lm.state_dict().items()}
        count = 0
        for name in list(full):
            count += full.pop(name).numel()
        return count

    results: dict[str, list[float]] = {"streamed": [], "all_at_once": []}
    for _ in range(args.repeats):
        for name, export in (("streamed", streamed), ("all_at_once", all_at_once)):
            torch.distributed.barrier()
            with RssSampler() as rss:
                base = rss.peak
                exported = export()
            results[name].append((rss.peak - base) / MiB)
            assert exported == model_numel, (exported, model_numel)
    rank = torch.distributed.get_rank()
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, results)
    if rank == 0:
        summary = {
            "ranks": every,
            "model_numel": model_numel,
            "buckets": len(buckets),
            "largest_bucket_numel": max(numel),
            "bucket_numel": args.bucket_numel,
            "config": vars(args),
        }
        Path(args.out).write_text(json.dumps(summary))


def report(summaries: list[dict], started: str, machine_line: str) -> Path:
    from _bench_util import write_result

    first = summaries[0]
    lines = [
        "Llama models (hidden size "
        f"{first['config']['hidden']}, vocabulary {first['config']['vocab']}, untied head), ZeRO-3 "
        "over 2 gloo ranks, exported in bf16, buckets of whole modules of at most "
        f"{first['bucket_numel']:,} elements unless one module is larger (the embedding and the "
        "head are). Bound = the largest bucket gathered in fp32 + its bf16 copy.",
        "",
        "Peak resident memory above the level before the export (MiB), per rank, median "
        "[min-max] of the repeats:",
        "",
        "| layers | params | fp32 model MiB | bound MiB | rank | streamed | all at once "
        "(gather all + fp32 clone) | streamed / bound | all at once / streamed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for summary in summaries:
        bound = summary["largest_bucket_numel"] * (4 + 2) / MiB
        model = summary["model_numel"] * 4 / MiB
        for rank, results in enumerate(summary["ranks"]):
            s, a = results["streamed"], results["all_at_once"]
            ms, ma = statistics.median(s), statistics.median(a)
            lines.append(
                f"| {summary['config']['layers']} | {summary['model_numel'] / 1e6:.1f}M | "
                f"{model:.0f} | {bound:.0f} | {rank} | {ms:.0f} [{min(s):.0f}-{max(s):.0f}] | "
                f"{ma:.0f} [{min(a):.0f}-{max(a):.0f}] | {ms / bound:.2f} | "
                f"{ma / max(ms, 1e-9):.1f}x |"
            )
    lines += [
        "",
        "The streamed peak follows the largest bucket, not the model: it stays put as layers "
        "are added while the all-at-once export grows with the model. Where it sits above "
        "the bound the extra was not traced (DeepSpeed's gather buffers on gloo and the "
        "allocator are candidates). RSS is sampled every 5 ms, so a peak shorter than that "
        "can be missed; the allocator may keep "
        "freed pages, which only raises the numbers.",
    ]
    return write_result(
        "export_memory",
        "Streamed weight export: peak memory",
        "\n".join(lines),
        started,
        machine_line,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", default="4,12", help="comma-separated model depths")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--bucket-numel", type=int, default=2**22)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="(internal) the worker's JSON output")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from _bench_util import machine, now

    started, machine_line = now(), machine()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    summaries = []
    for layers in [int(x) for x in str(args.layers).split(",")]:
        out = ROOT / "benchmarks" / "results" / f".export_memory_{layers}.json"
        forwarded = [
            f"--hidden={args.hidden}",
            f"--layers={layers}",
            f"--vocab={args.vocab}",
            f"--bucket-numel={args.bucket_numel}",
            f"--repeats={args.repeats}",
        ]
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                "2",
                "--master_port",
                str(33500 + (os.getpid() + layers) % 500),
                __file__,
                "--worker",
                f"--out={out}",
                *forwarded,
            ],
            cwd=ROOT,
            env=env,
            check=True,
        )
        summaries.append(json.loads(out.read_text()))
        out.unlink()
    path = report(summaries, started, machine_line)
    print(path.read_text())


if __name__ == "__main__":
    main()
