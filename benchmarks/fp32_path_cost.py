"""FP32 path cost: learner step time with the FP32 LM head versus a bf16 head, as a ratio.

``precision.loss: fp32`` (the default) runs the LM-head projection, log-softmax, entropy, ratio
and loss in float32; ``precision.loss: bf16`` runs the head in bfloat16 (it exists to reproduce
the failure of methods.md). Everything else is the same: fp32 weights and transformer body,
SmolLM2-135M-Instruct, the same fixed batch (default 2 x (32 + 96) tokens: bf16 matmuls are
slow on this CPU, see the result), 2 threads.

Two measurements, paired fp32 / bf16 in rounds (the machine is shared):

- the full learner step: ``TorchLearner.update`` (forward, loss, backward, clip, AdamW), with
  the one learner switched between the two head dtypes;
- the loss path alone: ``token_logprobs_and_entropy`` forward + backward on the batch's final
  hidden states and the tied head weight [49152, 576], i.e. the part the switch changes.

Each round times one fp32 and one bf16 step back to back (the order alternates between rounds)
and one of each loss-path run, and takes their ratios: a round's two steps see the same load,
which moves by 2.5x between rounds here. Rounds repeat until the ratios of the last ``--window``
rounds agree within ``--spread`` (max - min over median, default 10 %) or ``--budget-s`` runs
out; the result reports the ratio with its spread either way, and all rounds.

    python benchmarks/fp32_path_cost.py [--batch 2] [--prompt 32] [--completion 96] [--window 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _bench_util import fixed_train_batch, machine, now, write_result  # noqa: E402

MODEL = "smollm2-135m-instruct"


def spread(ratios: list[float]) -> float:
    """(max - min) / median: how far apart the rounds' ratios are."""
    return (max(ratios) - min(ratios)) / statistics.median(ratios)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--completion", type=int, default=96)
    parser.add_argument("--window", type=int, default=3, help="rounds whose ratios must agree")
    parser.add_argument("--spread", type=float, default=0.10, help="agreement wanted")
    parser.add_argument("--max-rounds", type=int, default=12)
    parser.add_argument("--budget-s", type=float, default=300.0, help="time for the rounds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch

    from agent.models import load_model
    from trainer.config import load_config
    from trainer.learner import TorchLearner
    from trainer.precision import token_logprobs_and_entropy

    started, machine_line = now(), machine()
    torch.set_num_threads(args.threads)
    cfg = load_config(
        None,
        [
            f"trainer.micro_batch_size={args.batch}",
            "objective.old_logprobs=sampler",
            f"rollout.max_new_tokens={args.completion}",
        ],
    )
    lm = load_model(MODEL)
    learner = TorchLearner(lm, cfg, torch.device("cpu"), total_updates=100)
    batch = fixed_train_batch(args.batch, args.prompt, args.completion, lm.config.vocab_size)
    width = batch.input_ids.shape[1]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}

    def full_step(dtype) -> float:
        learner.module.compute_dtype = dtype
        start = time.perf_counter()
        learner.update(batch, 0.0, cfg.objective.eps_high)
        return time.perf_counter() - start

    with torch.no_grad():
        hidden = lm.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
    head_weight = lm.get_output_embeddings().weight

    def head_only(dtype) -> float:
        h = hidden.detach().requires_grad_(True)
        w = head_weight.detach().requires_grad_(True)
        start = time.perf_counter()
        lp, ent = token_logprobs_and_entropy(
            h, w, batch.target_ids, chunk_size=cfg.precision.chunk_size, compute_dtype=dtype
        )
        ((lp * batch.loss_mask).sum() + (ent * batch.loss_mask).sum()).backward()
        return time.perf_counter() - start

    for dtype in dtypes.values():  # warm-up (the kernels of both measurements)
        full_step(dtype)
        head_only(dtype)
    steps = {name: [] for name in dtypes}
    heads = {name: [] for name in dtypes}
    step_ratios: list[float] = []
    head_ratios: list[float] = []
    deadline = time.monotonic() + args.budget_s
    while len(step_ratios) < args.max_rounds:
        order = list(dtypes.items())
        if len(step_ratios) % 2:
            order.reverse()
        for name, dtype in order:
            steps[name].append(full_step(dtype))
        for name, dtype in order:
            heads[name].append(head_only(dtype))
        step_ratios.append(steps["fp32"][-1] / steps["bf16"][-1])
        head_ratios.append(heads["fp32"][-1] / heads["bf16"][-1])
        window = step_ratios[-args.window :], head_ratios[-args.window :]
        if len(step_ratios) >= args.window and max(map(spread, window)) < args.spread:
            break
        if time.monotonic() > deadline:
            break
    rounds = len(step_ratios)
    last = min(args.window, rounds)
    step_ratio = statistics.median(step_ratios[-last:])
    head_ratio = statistics.median(head_ratios[-last:])
    step_spread, head_spread = spread(step_ratios[-last:]), spread(head_ratios[-last:])
    converged = rounds >= args.window and max(step_spread, head_spread) < args.spread
    step_med = {n: statistics.median(v[-last:]) for n, v in steps.items()}
    head_med = {n: statistics.median(v[-last:]) for n, v in heads.items()}
    tokens = args.batch * width
    if step_ratio <= 1.0:
        verdict = (
            f"**On this CPU the FP32 path is the cheaper one: a learner step with the FP32 head takes "
            f"{step_ratio:.2f}x the time of one with a bf16 head** (the loss path alone: {head_ratio:.2f}x). "
            "On CPU the bf16 head forms its matrix products as a bf16 GEMM does (fp32 sums of bf16 "
            "operands, one rounding: trainer.precision.bf16_matmul), so what it adds is the "
            "rounding, the bf16 softmax and entropy and the casts of the weight on every call: on "
            "this machine correctness costs nothing. On a GPU, where bf16 GEMMs run at several "
            "times the fp32 rate, rerun the script there."
        )
    else:
        verdict = (
            f"**The price of correctness: a learner step with the FP32 head takes {step_ratio:.2f}x the "
            f"time of one with a bf16 head** (+{(step_ratio - 1) * 100:.0f}%; the loss path alone: "
            f"{head_ratio:.2f}x)."
        )
    agreement = (
        f"the last {last} rounds' ratios agree within {max(step_spread, head_spread) * 100:.0f}% "
        f"(< {args.spread * 100:.0f}%: converged after {rounds} rounds)"
        if converged
        else f"**not converged**: after {rounds} rounds (budget {args.budget_s:.0f} s) the last "
        f"{last} rounds' ratios still spread by {step_spread * 100:.0f}% (step) and "
        f"{head_spread * 100:.0f}% (loss path); read the ratios with that spread"
    )
    body = f"""
Batch: {args.batch} sequences x {width + 1} tokens ({args.prompt} prompt + {args.completion} completion),
SmolLM2-135M-Instruct (fp32 weights and body; only the head's dtype changes), {args.threads} threads,
chunk {cfg.precision.chunk_size} tokens. One warm-up run each, then rounds of paired fp32 / bf16
runs; ratios are per round (same load), reported as the median of the last {last} rounds:
{agreement}. Spread = (max - min) / median of those rounds' ratios.

| measurement | fp32 head | bf16 head | ratio fp32 / bf16 |
|---|---:|---:|---:|
| full learner step (s) | {step_med["fp32"]:.2f} | {step_med["bf16"]:.2f} | {step_ratio:.2f} (spread {step_spread * 100:.0f}%) |
| full learner step (tokens/s) | {tokens / step_med["fp32"]:.0f} | {tokens / step_med["bf16"]:.0f} | {1 / step_ratio:.2f} |
| loss path alone, fwd + bwd (s) | {head_med["fp32"]:.3f} | {head_med["bf16"]:.3f} | {head_ratio:.2f} (spread {head_spread * 100:.0f}%) |

{verdict}
All rounds: step times fp32 {", ".join(f"{t:.2f}" for t in steps["fp32"])} s; bf16
{", ".join(f"{t:.2f}" for t in steps["bf16"])} s; step ratios
{", ".join(f"{r:.2f}" for r in step_ratios)}; loss-path ratios {", ".join(f"{r:.2f}" for r in head_ratios)}.

The full step adds the transformer body's forward and backward and the AdamW update, which do
not change with the switch; the loss-path row isolates the part that does. These numbers hold
for this machine's torch CPU build; on a GPU, where bf16 matmuls run faster than fp32 ones,
rerun the script there. The machine is shared: absolute numbers move with its load, ratios less.
"""
    path = write_result(
        "fp32_path_cost",
        "FP32 path cost: fp32 vs bf16 LM head in the learner step",
        body,
        started,
        machine_line,
    )
    print(
        f"full step: fp32 {step_med['fp32']:.2f} s, bf16 {step_med['bf16']:.2f} s, "
        f"ratio {step_ratio:.2f} (spread {step_spread * 100:.0f}%)"
    )
    print(
        f"loss path: fp32 {head_med['fp32']:.3f} s, bf16 {head_med['bf16']:.3f} s, "
        f"ratio {head_ratio:.2f} (spread {head_spread * 100:.0f}%); {rounds} rounds, "
        f"{'converged' if converged else 'NOT converged'}"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
