"""Learner throughput: eprl's TorchLearner versus TRL's GRPOTrainer doing the same update, on
three workloads.

The work timed, identical on every side: one optimizer step of SmolLM2-135M-Instruct (fp32
weights, fp32 loss path, 2 CPU threads) on a fixed batch: forward through the model, log-probs
and entropies of the completion tokens through each side's chunked ("fused") LM head,
token-level PPO-clip loss (eps 0.2 / 0.28) against given old log-probs, backward, gradient
clipping at 1.0, AdamW step. Generation is not timed. The workloads (``--workload``):

- ``unrelated``: B unrelated sequences of P prompt + C completion tokens (default
  4 x (64 + 192) = 1024 tokens): nothing to share, nothing padded.
- ``group``: the real shape of a batch, groups of K answers to one prompt: 2 prompts of 96
  tokens x K=8 answers of 48 tokens (16 rows, 2304 tokens).
- ``appworld``: LOOP's AppWorld shape, 1 prompt of 3,000 tokens x K=6 answers of 400,
  scaled by ``--appworld-scale`` (default 1/8: 375 x 6 x 50, 2550 tokens) so that a step fits
  the machine; the prompt/answer ratio, which sets what sharing saves, is kept.

Sides, each in its own process (so that peak memory is its own):

- ``eprl``: ``TorchLearner.update(batch, zeta=0, eps_high=0.28)`` with the default forward
  layout (``trainer.shared_prefix: auto``, ``trainer.packing: auto``: each group's prompt
  computed once, no padding), ``old_logprobs`` = the given sampler log-probs.
- ``eprl-off``: the same with ``trainer.shared_prefix=off trainer.packing=off`` (every row
  padded and computed in full).
- ``trl``: a ``GRPOTrainer`` (``loss_type="bnpo"``, the token mean; ``beta=0``;
  ``optim=adamw_torch``; ``num_generations`` = K) is built normally, then each step calls its
  own ``compute_loss`` on a prepared batch (the dict its ``_generate_and_score_completions``
  would produce: prompt/completion ids and masks, advantages, ``old_per_token_logps``),
  ``accelerator.backward``, ``clip_grad_norm_`` and its optimizer and scheduler: exactly
  ``training_step`` minus the generation it triggers.

All sides of a workload are loaded, then their steps alternate (eprl, eprl-off, TRL, eprl, ...)
so that all see the same machine load: ``--warmup`` untimed steps each, then ``--repeats``
timed steps each; the median is reported, with the spread (max/min) of the ratios per round.
tokens/s counts all B x (P + C) tokens of the batch. Peak RSS: the process's maximum resident
set (``ru_maxrss``, model load included) and the peak sampled during the timed steps. Each
workload writes ``benchmarks/results/learner_throughput[_<workload>].md``.

    python benchmarks/learner_throughput.py [--workload all|unrelated|group|appworld] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _bench_util import RssSampler, machine, now, write_result  # noqa: E402

MODEL = "smollm2-135m-instruct"
EPS_LOW, EPS_HIGH, LR = 0.2, 0.28, 3e-5
SIDES = ("eprl", "eprl-off", "trl")
# varlen compares packing with bucketing at its best (one row per micro-batch: no padding, no
# packing); TRL is left out there (its batch pads the same way eprl-off does)
VARLEN_SIDES = ("eprl", "eprl-off", "eprl-rows")
WORKLOADS = ("unrelated", "group", "appworld", "varlen")


def sides_of(workload: str) -> tuple[str, ...]:
    return VARLEN_SIDES if workload == "varlen" else SIDES


def completion_lengths(args) -> list[int]:
    """Each row's completion length: all ``C`` but in varlen (32..224 tokens, evenly spread)."""
    groups, k, _, c = shape(args)
    if args.workload != "varlen":
        return [c] * (groups * k)
    rows = groups * k
    return [32 + round(i * (c - 32) / (rows - 1)) for i in range(rows)]


def shape(args) -> tuple[int, int, int, int]:
    """(groups, K, prompt tokens, completion tokens) of ``args.workload``."""
    if args.workload == "unrelated":
        return args.batch, 1, args.prompt, args.completion
    if args.workload == "group":
        return 2, 8, 96, 48
    if args.workload == "varlen":
        return 8, 1, 32, 224
    scale = args.appworld_scale
    return 1, 6, round(3000 * scale), round(400 * scale)


def workload_batch(args, vocab: int):
    """Seeded (prompt [B, P], completion [B, C], sampler log-probs [B, C], advantages [B]); the K
    rows of a group share their prompt, the answers all differ. Token ids avoid SmolLM2's first
    200 (special tokens); only the shapes and what is shared matter for timing."""
    import torch

    groups, k, p, c = shape(args)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(200, vocab, (groups, p), generator=gen).repeat_interleave(k, dim=0)
    completion = torch.randint(200, vocab, (groups * k, c), generator=gen)
    sampler = -torch.rand(groups * k, c, generator=gen) * 3
    return prompt, completion, sampler, torch.linspace(-1, 1, groups * k)


def ours(args, layout: str, micro_batch: int | None = None):
    import torch

    from agent.models import load_model
    from trainer.config import load_config
    from trainer.learner import TorchLearner, TrainBatch

    torch.set_num_threads(args.threads)
    groups, k, p, c = shape(args)
    cfg = load_config(
        None,
        [
            "precision.loss=fp32",
            f"trainer.micro_batch_size={micro_batch or groups * k}",
            f"trainer.lr={LR}",
            "objective.aggregation=token_mean",
            "objective.old_logprobs=sampler",
            f"objective.eps_low={EPS_LOW}",
            f"objective.eps_high={EPS_HIGH}",
            f"rollout.max_new_tokens={c}",
            f"trainer.shared_prefix={layout}",
            f"trainer.packing={layout}",
        ],
    )
    lm = load_model(MODEL)
    learner = TorchLearner(lm, cfg, torch.device("cpu"), total_updates=100)
    prompt, completion, sampler, advantages = workload_batch(args, lm.config.vocab_size)
    rows = prompt.shape[0]
    sequence = torch.cat([prompt, completion], dim=1)
    width = sequence.shape[1] - 1
    attention = torch.zeros(rows, width, dtype=torch.long)
    loss_mask = torch.zeros(rows, width)
    for row, n in enumerate(completion_lengths(args)):  # right padding after each completion
        attention[row, : p - 1 + n] = 1
        loss_mask[row, p - 1 : p - 1 + n] = 1.0
    logprobs = torch.zeros(rows, width)
    logprobs[:, p - 1 :] = sampler
    batch = TrainBatch(
        input_ids=sequence[:, :-1],
        attention_mask=attention,
        target_ids=sequence[:, 1:],
        loss_mask=loss_mask,
        sampler_logprobs=logprobs,
        advantages=advantages,
        old_logprobs=logprobs,
    )

    def step() -> dict:
        learner.update(batch, 0.0, EPS_HIGH)
        return dict(learner.module.last_layout)

    return step


def trl(args):
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from agent.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    groups, k, _, c = shape(args)
    rows = groups * k
    lm = load_model(MODEL)
    tokenizer = load_tokenizer(MODEL)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=rows,
        num_generations=k if k > 1 else rows,
        max_completion_length=c,
        learning_rate=LR,
        max_grad_norm=1.0,
        optim="adamw_torch",
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        loss_type="bnpo",
        beta=0.0,
        epsilon=EPS_LOW,
        epsilon_high=EPS_HIGH,
        save_strategy="no",
        gradient_accumulation_steps=1,
        logging_steps=10_000,
        temperature=1.0,
    )
    trainer = GRPOTrainer(
        model=lm,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=config,
        train_dataset=Dataset.from_dict({"prompt": ["x"] * rows}),
        processing_class=tokenizer,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() in a normal run
    model = trainer.model
    prompt, completion, sampler, advantages = workload_batch(args, lm.config.vocab_size)
    inputs = {
        "prompt_ids": prompt,
        "prompt_mask": torch.ones_like(prompt),
        "completion_ids": completion,
        "completion_mask": torch.ones_like(completion),
        "advantages": advantages,
        "old_per_token_logps": sampler,
        "num_items_in_batch": torch.tensor(float(completion.numel())),
    }

    def step() -> dict:
        model.train()
        loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)
        trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return {}

    return step


def worker(args) -> int:
    """Build one side, then run one step per ``step`` line on stdin (answering ``TIME <s>
    <layout json>``); on ``done``, print the peak RSS seen during the steps and the process's
    maximum RSS."""
    if args.worker == "trl":
        step = trl(args)
    elif args.worker == "eprl-rows":
        step = ours(args, "off", micro_batch=1)
    else:
        step = ours(args, "auto" if args.worker == "eprl" else "off")
    print("READY", flush=True)
    peak = 0
    for line in sys.stdin:
        if line.strip() != "step":
            break
        with RssSampler() as rss:
            start = time.perf_counter()
            info = step()
            seconds = time.perf_counter() - start
        peak = max(peak, rss.peak)
        print(f"TIME {seconds} {json.dumps(info)}", flush=True)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"peak_rss": peak, "max_rss": max_rss}), flush=True)
    return 0


class Side:
    """A worker process driven in lock step, so all sides share the machine's conditions."""

    def __init__(self, side: str, args) -> None:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            side,
            "--workload",
            args.workload,
            "--batch",
            str(args.batch),
            "--prompt",
            str(args.prompt),
            "--completion",
            str(args.completion),
            "--appworld-scale",
            str(args.appworld_scale),
            "--threads",
            str(args.threads),
        ]
        self.side = side
        self.layout: dict = {}
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the worker)
        self.process = subprocess.Popen(
            cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True
        )
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.process.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        self.log.seek(0)
        raise RuntimeError(
            f"{self.side} worker failed (exit {self.process.wait()}):\n{self.log.read()[-3000:]}"
        )

    def step(self) -> float:
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        seconds, info = self._expect("TIME ").split(" ", 1)
        self.layout = json.loads(info)
        return float(seconds)

    def finish(self) -> dict:
        self.process.stdin.write("done\n")
        self.process.stdin.flush()
        result = json.loads(self._expect("RESULT "))
        self.process.wait()
        return result


def measure(args) -> dict[str, dict]:
    """All workers alive; steps alternate between the sides (warm-up steps first, not timed)."""
    sides = {}
    try:
        for name in sides_of(args.workload):
            sides[name] = Side(name, args)
        times: dict[str, list[float]] = {name: [] for name in sides}
        for i in range(args.warmup + args.repeats):
            for name, side in sides.items():
                seconds = side.step()
                if i >= args.warmup:
                    times[name].append(seconds)
        out = {}
        for name, side in sides.items():
            out[name] = {
                **side.finish(),
                "times_s": times[name],
                "median_s": statistics.median(times[name]),
                "layout": side.layout,
            }
        return out
    finally:
        for side in sides.values():
            if side.process.poll() is None:
                side.process.kill()
                side.process.wait()


def ratio_line(results: dict, fast: str, slow: str) -> tuple[float, str]:
    """Median-time ratio slow/fast and its per-round spread (rounds alternate, so round i's
    ratio compares steps taken under the same load)."""
    ratio = results[slow]["median_s"] / results[fast]["median_s"]
    rounds = [
        s / f for f, s in zip(results[fast]["times_s"], results[slow]["times_s"], strict=True)
    ]
    return ratio, f"{ratio:.2f}x (rounds {min(rounds):.2f}-{max(rounds):.2f}x)"


def report(args, results: dict, trl_version: str) -> str:
    groups, k, p, c = shape(args)
    rows = groups * k
    tokens = sum(p + n for n in completion_lengths(args))
    sides = sides_of(args.workload)
    labels = {
        "eprl": "eprl TorchLearner, sharing + packing (auto)",
        "eprl-off": "eprl TorchLearner, shared_prefix=off packing=off",
        "eprl-rows": "eprl TorchLearner, off, one row per micro-batch (bucketing at best)",
        "trl": f"TRL {trl_version} GRPOTrainer",
    }
    table = [
        "| learner | s / step (median) | tokens/s | positions computed | peak RSS in steps (GiB) | max RSS incl. load (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for side in sides:
        r = results[side]
        positions = r["layout"].get("positions", "-")
        if side == "eprl-rows":
            positions = tokens - rows
        table.append(
            f"| {labels[side]} | {r['median_s']:.2f} | {tokens / r['median_s']:.0f} | {positions} "
            f"| {r['peak_rss'] / 2**30:.2f} | {r['max_rss'] / 2**30:.2f} |"
        )
    peers = [s for s in sides if s != "eprl"]
    ratios = "; ".join(f"eprl / {s}: {ratio_line(results, 'eprl', s)[1]}" for s in peers)
    what = {
        "unrelated": f"{rows} unrelated sequences x ({p} prompt + {c} completion) tokens",
        "group": f"{groups} prompts of {p} tokens x K={k} answers of {c} tokens",
        "appworld": (
            f"AppWorld-shaped, scaled by {args.appworld_scale:g}: 1 prompt of {p} tokens x "
            f"K={k} answers of {c} tokens (full size 3000 x 6 x 400 does not fit a step here)"
        ),
        "varlen": (
            f"{rows} unrelated sequences of {p} prompt + 32..{c} completion tokens (evenly "
            f"spread), right-padded to {p + c}"
        ),
    }[args.workload]
    times = "; ".join(f"{s} " + ", ".join(f"{t:.2f}" for t in results[s]["times_s"]) for s in sides)
    layout = results["eprl"]["layout"]
    trl_note = (
        "TRL runs every row's prompt (no prefix sharing in its learner)."
        if "trl" in sides
        else "TRL is not run on this workload."
    )
    return f"""
Workload `{args.workload}`: {what} = {rows} rows, {tokens} tokens per step.
SmolLM2-135M-Instruct, fp32 weights and fp32 loss path, {args.threads} threads; each side in its
own process, steps alternating ({", ".join(sides)}, ...) so all see the same load;
{args.warmup} warm-up step each, median of {args.repeats} timed steps each.

{chr(10).join(table)}

**{ratios}** (ratios of median step times; in brackets the range of the per-round ratios).
The eprl forward's layout: {layout.get("layout")}, {layout.get("shared", 0)} positions computed
once instead of once per row. Step times (s): {times}.

What was compared: every side computes the log-probs and entropies of the completion tokens
through a chunked LM head without materialising the full logits (eprl: `trainer.precision`'s
fused fp32 head, on the loss-mask positions only; TRL: its `add_fused_lm_head` patch on the
completion positions), a token-level PPO-clip loss against the same given old log-probs with
eps_low {EPS_LOW} / eps_high {EPS_HIGH}, one backward, clipping at 1.0 and an AdamW step (torch's
AdamW everywhere). TRL's trainer is constructed as a user would; its step calls its own
`compute_loss` on the batch its generation would have produced. {trl_note} The machine is
shared with other jobs: absolute numbers move with its load, the ratios (same rounds) less; the
round ranges show by how much.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--batch", type=int, default=4, help="rows of the unrelated workload")
    parser.add_argument("--prompt", type=int, default=64, help="unrelated workload's prompt")
    parser.add_argument("--completion", type=int, default=192, help="its completion")
    parser.add_argument("--appworld-scale", type=float, default=0.125)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=[*SIDES, "eprl-rows"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        import trl  # noqa: F401
    except ImportError:
        print(
            "TRL is not installed: pip install -e '.[bench]' (the optional extra `bench`)",
            file=sys.stderr,
        )
        return 1
    import trl as trl_module

    for workload in WORKLOADS if args.workload == "all" else (args.workload,):
        args.workload = workload
        started, machine_line = now(), machine()
        results = measure(args)
        body = report(args, results, trl_module.__version__)
        name = "learner_throughput" + ("" if workload == "unrelated" else f"_{workload}")
        path = write_result(
            name,
            f"Learner throughput ({workload}): eprl with and without sharing/packing vs TRL",
            body,
            started,
            machine_line,
        )
        for side in sides_of(workload):
            print(f"{workload:9s} {side:9s} {results[side]['median_s']:7.2f} s/step")
            if side != "eprl":
                print(f"{workload}: eprl/{side} {ratio_line(results, 'eprl', side)[1]}")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
