"""Peak memory and time of the loss path (forward + backward), chunked versus unchunked.

One 4096-token sequence, SmolLM2's hidden size (576) and vocabulary (49,152), float32 weights
(the learner's default ``model.dtype``). Variants:

- ``chunked``: :func:`trainer.precision.token_logprobs_and_entropy` with ``--chunk-size`` (the
  one held to ``--limit-mb``), and again with ``precision.chunk_size``'s default if it differs;
- ``one chunk``: the same fused function with a single chunk of all tokens;
- ``unchunked``: plain autograd (:func:`trainer.precision.reference_logprobs_and_entropy`).

Memory: each variant runs in a fresh Python process. After imports, a small warm-up and the
allocation of the inputs, the process reads its current resident set (``/proc/self/statm``);
after one forward + backward it reads its peak resident set (``getrusage(RUSAGE_SELF).ru_maxrss``,
the kernel's high-water mark). Their difference is the extra memory of the loss path, gradients
included. It can only over-estimate (if an earlier moment had been the peak), never miss a
transient allocation, and it needs no allocator hooks (torch has no CPU allocator statistics).
Time: the measured pass itself, or with ``--repeats N`` the median of N further forward +
backward passes in the same process (each pass of the default shapes takes about a minute on 2
cores, so ``make bench`` times the measured pass only).

    python benchmarks/loss_path_memory.py            # writes benchmarks/results/loss_path_memory.md

Exits 1 if the chunked path's extra memory is not under ``--limit-mb`` (256).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _worker(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from trainer.precision import reference_logprobs_and_entropy, token_logprobs_and_entropy

    def loss_path(hidden, weight, targets, tokens_per_chunk):
        if args.worker == "unchunked":
            logprobs, entropy = reference_logprobs_and_entropy(hidden, weight, targets)
        else:
            logprobs, entropy = token_logprobs_and_entropy(
                hidden, weight, targets, chunk_size=tokens_per_chunk
            )
        # a loss that needs both outputs' gradients, like policy loss + entropy terms
        (-logprobs.mean() - 0.01 * entropy.mean()).backward()

    chunk = args.chunk_size if args.worker == "fused" else args.tokens
    # warm-up on small shapes: loads the kernels without raising the high-water mark
    small = [
        torch.randn(1, 64, args.dim, requires_grad=True),
        torch.randn(512, args.dim, requires_grad=True),
    ]
    loss_path(small[0], small[1], torch.randint(0, 512, (1, 64)), 16)

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, args.tokens, args.dim, generator=generator).requires_grad_()
    # scaled in place: a temporary copy would raise the high-water mark before the measurement
    weight = (
        torch.randn(args.vocab, args.dim, generator=generator).div_(args.dim**0.5).requires_grad_()
    )
    targets = torch.randint(0, args.vocab, (1, args.tokens), generator=generator)
    before = _current_rss_mb()
    peak_before = _peak_rss_mb()
    start = time.perf_counter()
    loss_path(hidden, weight, targets, chunk)
    first_s = time.perf_counter() - start
    peak = _peak_rss_mb()
    times = []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        start = time.perf_counter()
        loss_path(hidden, weight, targets, chunk)
        times.append(time.perf_counter() - start)
    return {
        "chunk_size": chunk,
        "rss_before_mb": before,
        "peak_rss_before_mb": peak_before,
        "peak_rss_mb": peak,
        "extra_mb": peak - before,
        "first_s": first_s,
        "median_s": statistics.median(times) if times else first_s,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in lscpu.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} logical CPUs, {mem_gib:.0f} GiB RAM, {platform.platform()}"


def _run_variant(worker: str, chunk_size: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--worker", worker,
        "--tokens", str(args.tokens), "--dim", str(args.dim), "--vocab", str(args.vocab),
        "--chunk-size", str(chunk_size), "--repeats", str(args.repeats),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--limit-mb", type=float, default=256.0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "loss_path_memory.md"
    )
    parser.add_argument("--worker", choices=("fused", "unchunked"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0

    sys.path.insert(0, str(ROOT))
    from trainer.config import PrecisionConfig

    default_chunk = PrecisionConfig().chunk_size
    variants = {"chunked": ("fused", args.chunk_size)}
    if default_chunk != args.chunk_size:
        variants[f"chunked (precision.chunk_size default {default_chunk})"] = (
            "fused",
            default_chunk,
        )
    variants["one chunk (fused, no chunking)"] = ("fused", args.tokens)
    variants["unchunked (plain autograd)"] = ("unchunked", args.tokens)
    results = {}
    for name, (worker, chunk_size) in variants.items():
        results[name] = r = _run_variant(worker, chunk_size, args)
        print(
            f"{name:45s} chunk {r['chunk_size']:5d}: extra {r['extra_mb']:8.1f} MB, {r['median_s']:.2f} s"
        )
    chunked, unchunked = results["chunked"], results["unchunked (plain autograd)"]
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    weight_grad_mb = args.vocab * args.dim * 4 / 2**20
    passed = chunked["extra_mb"] < args.limit_mb
    verdict = f"{'PASS' if passed else 'FAIL'}: chunked extra {chunked['extra_mb']:.1f} MB < {args.limit_mb:.0f} MB"
    print(verdict)
    print(f"memory ratio chunked/unchunked {chunked['extra_mb'] / unchunked['extra_mb']:.3f}, "
          f"time ratio {chunked['median_s'] / unchunked['median_s']:.2f}")  # fmt: skip

    rows = "\n".join(
        f"| {name} | {r['chunk_size']} | {r['extra_mb']:.1f} | {r['extra_mb'] / unchunked['extra_mb']:.3f} "
        f"| {r['median_s']:.2f} | {r['median_s'] / unchunked['median_s']:.2f} |"
        for name, r in results.items()
    )
    baseline_slack = max(r["peak_rss_before_mb"] - r["rss_before_mb"] for r in results.values())
    command = "python " + " ".join(
        shlex.quote(a) for a in [str(Path(__file__).relative_to(ROOT)), *(argv or sys.argv[1:])]
    )
    timing = f"median of {args.repeats}" if args.repeats else "the measured pass"
    report = f"""# Loss path memory: chunked vs unchunked

- Date: {dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
- Machine: {_machine()}
- torch {chunked["torch"]}, {chunked["threads"]} threads; the machine was shared with other jobs, so
  times are indicative, memory is not affected.
- Command: `{command}`
- MB here means 2^20 bytes.
- Shapes: one sequence of {args.tokens} tokens, hidden {args.dim}, vocabulary {args.vocab}, float32
  hidden states and LM-head weight, float32 loss path; forward + backward of
  `-mean(logprobs) - 0.01 mean(entropy)` (gradients to hidden states and weight).

| variant | tokens per chunk | extra peak memory (MB) | vs unchunked | time fwd+bwd (s, {timing}) | vs unchunked |
|---|---|---|---|---|---|
{rows}

**{verdict}.** For scale: the full float32 logits alone are {logits_mb:.0f} MB; the weight's
gradient, which every variant must allocate and which is included above, is {weight_grad_mb:.0f} MB.
The chunked path holds two `[chunk, V]` float32 tensors at a time
({2 * args.chunk_size * args.vocab * 4 / 2**20:.0f} MB at chunk {args.chunk_size}).

How memory is measured: each variant runs in a fresh process; after the imports, a warm-up on
small shapes and the allocation of the inputs it reads its current resident set size
(`/proc/self/statm`); after one forward + backward it reads the kernel's high-water mark of the
resident set (`getrusage(RUSAGE_SELF).ru_maxrss`). The difference is the loss path's extra peak
memory. It cannot miss a transient allocation (the kernel tracks the peak) and can only
over-estimate (if an earlier moment had been the peak); torch offers no CPU allocator statistics.
In this run the high-water mark before the loss path exceeded the resident set by at most
{max(baseline_slack, 0.0):.1f} MB, so no earlier peak hides in the numbers.
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
