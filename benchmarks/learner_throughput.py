"""Learner throughput: eprl's TorchLearner versus TRL's GRPOTrainer doing the same update.

The work timed, identical on both sides: one optimizer step of SmolLM2-135M-Instruct (fp32
weights, fp32 loss path, 2 CPU threads) on a fixed batch of B sequences of P prompt + C
completion tokens (default 4 x (64 + 192) = 1024 tokens): forward through the model, log-probs
and entropies of the completion tokens through each side's chunked ("fused") LM head, token-level
PPO-clip loss (eps 0.2 / 0.28) against given old log-probs, backward, gradient clipping at 1.0,
AdamW step. Generation is not timed on either side:

- ours: ``TorchLearner.update(batch, zeta=0, eps_high=0.28)`` with ``old_logprobs`` = the given
  sampler log-probs (``objective.old_logprobs: sampler``, ``aggregation: token_mean``).
- TRL: a ``GRPOTrainer`` (``loss_type="bnpo"``, the token mean; ``beta=0``; ``optim=adamw_torch``)
  is built normally, then each step calls its own ``compute_loss`` on a prepared batch (the dict
  its ``_generate_and_score_completions`` would produce: prompt/completion ids and masks,
  advantages, ``old_per_token_logps``), ``accelerator.backward``, ``clip_grad_norm_`` and its
  optimizer and scheduler. This is exactly ``training_step`` minus the generation it triggers.

Each side runs in its own process (so that peak memory is its own); both are loaded, then their
steps alternate (ours, TRL, ours, ...) so that both see the same machine load: 1 warm-up step
each, then ``--repeats`` timed steps each; the median is reported. tokens/s counts all B x (P + C) tokens of the
batch. Peak RSS: the process's maximum resident set (``ru_maxrss``, model load included) and the
peak sampled during the timed steps.

    python benchmarks/learner_throughput.py [--batch 4] [--prompt 64] [--completion 192] [--repeats 2]
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

from _bench_util import RssSampler, fixed_batch, fixed_train_batch, machine, now, write_result  # noqa: E402

MODEL = "smollm2-135m-instruct"
EPS_LOW, EPS_HIGH, LR = 0.2, 0.28, 3e-5


def ours(args):
    import torch

    from agent.models import load_model
    from trainer.config import load_config
    from trainer.learner import TorchLearner

    torch.set_num_threads(args.threads)
    cfg = load_config(
        None,
        [
            "precision.loss=fp32",
            f"trainer.micro_batch_size={args.batch}",
            f"trainer.lr={LR}",
            "objective.aggregation=token_mean",
            "objective.old_logprobs=sampler",
            f"objective.eps_low={EPS_LOW}",
            f"objective.eps_high={EPS_HIGH}",
            f"rollout.max_new_tokens={args.completion}",
        ],
    )
    lm = load_model(MODEL)
    learner = TorchLearner(lm, cfg, torch.device("cpu"), total_updates=100)
    batch = fixed_train_batch(args.batch, args.prompt, args.completion, lm.config.vocab_size)
    return lambda: learner.update(batch, 0.0, EPS_HIGH)


def trl(args):
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from agent.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    lm = load_model(MODEL)
    tokenizer = load_tokenizer(MODEL)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=args.batch,
        num_generations=args.batch,
        max_completion_length=args.completion,
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
        train_dataset=Dataset.from_dict({"prompt": ["x"] * args.batch}),
        processing_class=tokenizer,
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train() in a normal run
    model = trainer.model
    prompt, completion, sampler, advantages = fixed_batch(
        args.batch, args.prompt, args.completion, lm.config.vocab_size
    )
    inputs = {
        "prompt_ids": prompt,
        "prompt_mask": torch.ones_like(prompt),
        "completion_ids": completion,
        "completion_mask": torch.ones_like(completion),
        "advantages": advantages,
        "old_per_token_logps": sampler,
        "num_items_in_batch": torch.tensor(float(completion.numel())),
    }

    def step() -> None:
        model.train()
        loss = trainer.compute_loss(model, inputs)
        trainer.accelerator.backward(loss)
        trainer.accelerator.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def worker(args) -> int:
    """Build one side, then run one step per ``step`` line on stdin (answering ``TIME <s>``);
    on ``done``, print the peak RSS seen during the steps and the process's maximum RSS."""
    step = {"ours": ours, "trl": trl}[args.worker](args)
    print("READY", flush=True)
    peak = 0
    for line in sys.stdin:
        if line.strip() != "step":
            break
        with RssSampler() as rss:
            start = time.perf_counter()
            step()
            seconds = time.perf_counter() - start
        peak = max(peak, rss.peak)
        print(f"TIME {seconds}", flush=True)
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"peak_rss": peak, "max_rss": max_rss}), flush=True)
    return 0


class Side:
    """A worker process driven in lock step, so both sides share the machine's conditions."""

    def __init__(self, side: str, args) -> None:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            side,
            "--batch",
            str(args.batch),
            "--prompt",
            str(args.prompt),
            "--completion",
            str(args.completion),
            "--threads",
            str(args.threads),
        ]
        self.side = side
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
        return float(self._expect("TIME "))

    def finish(self) -> dict:
        self.process.stdin.write("done\n")
        self.process.stdin.flush()
        result = json.loads(self._expect("RESULT "))
        self.process.wait()
        return result


def measure(args) -> dict[str, dict]:
    """Both workers alive; steps alternate ours / TRL (warm-up steps first, not timed)."""
    sides = {}
    try:
        for name in ("ours", "trl"):
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
            }
        return out
    finally:
        for side in sides.values():
            if side.process.poll() is None:
                side.process.kill()
                side.process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--completion", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
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

    started, machine_line = now(), machine()
    tokens = args.batch * (args.prompt + args.completion)
    results = measure(args)
    rows = []
    for side, label in (
        ("ours", "eprl TorchLearner"),
        ("trl", f"TRL {trl_module.__version__} GRPOTrainer"),
    ):
        r = results[side]
        rows.append(
            (
                label,
                r["median_s"],
                tokens / r["median_s"],
                r["peak_rss"] / 2**30,
                r["max_rss"] / 2**30,
            )
        )
    speed_ratio = results["trl"]["median_s"] / results["ours"]["median_s"]
    mem_ratio = results["ours"]["peak_rss"] / results["trl"]["peak_rss"]
    table = [
        "| learner | s / step (median) | tokens/s | peak RSS in steps (GiB) | max RSS incl. load (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    table += [f"| {n} | {s:.2f} | {t:.0f} | {p:.2f} | {m:.2f} |" for n, s, t, p, m in rows]
    body = f"""
Work per step: one optimizer step on {args.batch} sequences x ({args.prompt} prompt + {args.completion}
completion) tokens = {tokens} tokens, SmolLM2-135M-Instruct, fp32 weights and fp32 loss path,
{args.threads} threads; each side in its own process, steps alternating between the two (ours,
TRL, ours, ...) so both see the same load; {args.warmup} warm-up step each, median of
{args.repeats} timed steps each.

{chr(10).join(table)}

**Throughput ratio (eprl / TRL tokens/s): {speed_ratio:.2f}x.** Peak-memory ratio in steps (eprl / TRL):
{mem_ratio:.2f}x. Step times: eprl {", ".join(f"{t:.2f}" for t in results["ours"]["times_s"])} s;
TRL {", ".join(f"{t:.2f}" for t in results["trl"]["times_s"])} s.

What was compared: both sides compute the log-probs and entropies of the {args.completion} completion
tokens through a chunked LM head without materialising the full logits (ours:
`trainer.precision`'s fused fp32 head; TRL: its `add_fused_lm_head` patch), a token-level
PPO-clip loss against the same given old log-probs with eps_low {EPS_LOW} / eps_high {EPS_HIGH}, one backward,
clipping at 1.0 and an AdamW step (torch's AdamW on both). TRL's trainer is constructed as a
user would; its step calls its own `compute_loss` on the batch its generation would have
produced (`training_step` without the generation). Differences that remain are the
implementations': our head projects every position of the sequence (the loss mask selects the
completion), TRL's only the completion positions; TRL adds its metric bookkeeping. The machine
is shared: absolute numbers move with its load, the ratio less.
"""
    path = write_result(
        "learner_throughput",
        "Learner throughput: eprl TorchLearner vs TRL GRPOTrainer",
        body,
        started,
        machine_line,
    )
    for label, s, t, p, m in rows:
        print(f"{label:32s} {s:7.2f} s/step  {t:7.0f} tokens/s  peak RSS {p:.2f} GiB (max {m:.2f})")
    print(
        f"throughput ratio eprl/TRL: {speed_ratio:.2f}x   peak-memory ratio eprl/TRL: {mem_ratio:.2f}x"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
