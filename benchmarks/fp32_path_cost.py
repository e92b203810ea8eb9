"""FP32 path cost: learner step time with the FP32 LM head versus a bf16 head, as a ratio.

``precision.loss: fp32`` (the default) runs the LM-head projection, log-softmax, entropy, ratio
and loss in float32; ``precision.loss: bf16`` runs the head in bfloat16 (it exists to reproduce
the failure of methods.md). Everything else is the same: fp32 weights and transformer body,
SmolLM2-135M-Instruct, the same fixed batch (default 2 x (32 + 96) tokens: bf16 matmuls are
slow on this CPU, see the result), 2 threads.

Two measurements, interleaved fp32 / bf16 repetition by repetition (the machine is shared):

- the full learner step: ``TorchLearner.update`` (forward, loss, backward, clip, AdamW), with
  the one learner switched between the two head dtypes;
- the loss path alone: ``token_logprobs_and_entropy`` forward + backward on the batch's final
  hidden states and the tied head weight [49152, 576], i.e. the part the switch changes.

    python benchmarks/fp32_path_cost.py [--batch 2] [--prompt 32] [--completion 96] [--repeats 2]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--completion", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2, help="timed full steps per head dtype")
    parser.add_argument(
        "--head-repeats", type=int, default=1, help="timed loss-path runs per dtype"
    )
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
    steps = {name: [] for name in dtypes}
    heads = {name: [] for name in dtypes}
    for _ in range(args.repeats):
        for name, dtype in dtypes.items():
            steps[name].append(full_step(dtype))
    for _ in range(args.head_repeats):
        for name, dtype in dtypes.items():
            heads[name].append(head_only(dtype))

    step_med = {n: statistics.median(v) for n, v in steps.items()}
    head_med = {n: statistics.median(v) for n, v in heads.items()}
    tokens = args.batch * width
    step_ratio = step_med["fp32"] / step_med["bf16"]
    head_ratio = head_med["fp32"] / head_med["bf16"]
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
    body = f"""
Batch: {args.batch} sequences x {width + 1} tokens ({args.prompt} prompt + {args.completion} completion),
SmolLM2-135M-Instruct (fp32 weights and body; only the head's dtype changes), {args.threads} threads,
chunk {cfg.precision.chunk_size} tokens. One warm-up step each, then fp32 and bf16 interleaved; medians.

| measurement | fp32 head | bf16 head | ratio fp32 / bf16 |
|---|---:|---:|---:|
| full learner step (s) | {step_med["fp32"]:.2f} | {step_med["bf16"]:.2f} | {step_ratio:.2f} |
| full learner step (tokens/s) | {tokens / step_med["fp32"]:.0f} | {tokens / step_med["bf16"]:.0f} | {1 / step_ratio:.2f} |
| loss path alone, fwd + bwd (s) | {head_med["fp32"]:.3f} | {head_med["bf16"]:.3f} | {head_ratio:.2f} |

{verdict}
Raw step times: fp32 {", ".join(f"{t:.2f}" for t in steps["fp32"])} s; bf16
{", ".join(f"{t:.2f}" for t in steps["bf16"])} s.

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
        f"full step: fp32 {step_med['fp32']:.2f} s, bf16 {step_med['bf16']:.2f} s, ratio {step_ratio:.2f}"
    )
    print(
        f"loss path: fp32 {head_med['fp32']:.3f} s, bf16 {head_med['bf16']:.3f} s, ratio {head_ratio:.2f}"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
