"""`make demo` / `eprl demo`: train the embedded model with the quick-start config, then evaluate
the trained policy against the untrained one on the held-out split and print both, with the
entropy at the start and the end of training."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from agent.io import atomic_write_text
from trainer.config import load_config
from trainer.episodes import cut_at_cap, sampled_entropy
from trainer.logger import read_metrics
from trainer.loop import new_run_dir
from trainer.tasks import held_out_tasks, split_task_ids

HELD_OUT_SPLIT = "test"


def _evaluate(trainer, split: str, num_tasks: int, k: int) -> dict[str, float]:
    from trainer.evaluation.runner import evaluate_policy

    cfg = trainer.cfg
    tasks = held_out_tasks(split_task_ids(trainer.make_env, split), num_tasks)
    summary, episodes = evaluate_policy(
        trainer.policy,
        trainer.make_env,
        trainer.chat,
        tasks,
        k,
        temperature=cfg.eval.temperature,
        seed=cfg.seed + 424_242,
        progress=cfg.logging.progress,
        **cfg.rollout.budget(),
    )
    summary["entropy/sampled"] = sampled_entropy(episodes)
    summary["entropy/sampled_stopped"] = sampled_entropy(episodes, stopped_only=True)
    summary["stopped_frac"] = sum(not cut_at_cap(ep) for ep in episodes) / len(episodes)
    return summary


def run_demo(
    config: str, num_tasks: int = 40, k: int = 2, overrides: list[str] | None = None
) -> dict:
    from rich.console import Console
    from rich.table import Table

    from trainer.loop import Trainer

    console = Console()
    # the demo evaluates on the held-out split itself, before and after: no dev pass at the end
    cfg = load_config(config, ["eval.at_end=false", *(overrides or [])])
    if cfg.env.train_split == HELD_OUT_SPLIT or cfg.eval.split == HELD_OUT_SPLIT:
        raise ValueError(
            f"the demo evaluates on the held-out split {HELD_OUT_SPLIT!r}: train and dev must differ"
        )
    run_dir = new_run_dir(cfg)
    started = time.perf_counter()

    console.print(
        f"[bold]1/3[/] evaluating the untrained model on up to {num_tasks} held-out tasks x {k} samples"
    )
    trainer = Trainer(cfg, run_dir)
    trainer.setup()
    before = _evaluate(trainer, HELD_OUT_SPLIT, num_tasks, k)

    console.print(
        f"[bold]2/3[/] training ({cfg.steps} steps, objective {cfg.objective.advantage}"
        f" + REPO-{cfg.objective.repo.variant}) -> {run_dir}"
    )
    try:
        trainer.train()
    finally:
        trainer.cleanup()

    console.print("[bold]3/3[/] evaluating the trained model on the same held-out tasks")
    after = _evaluate(trainer, HELD_OUT_SPLIT, num_tasks, k)

    rows = read_metrics(run_dir)
    entropies = [r["entropy/mean"] for r in rows if "entropy/mean" in r]
    targets = [
        r["entropy/target"] for r in rows if math.isfinite(r.get("entropy/target", math.nan))
    ]
    measured = bool(cfg.objective.target_entropy_tasks) and bool(targets)
    # the start: the untrained policy's entropy measured over ~10 batches when the run measured
    # its controllers' target, else the first batch's (one batch: +-30 % noise)
    entropy_start = targets[0] if measured else entropies[0]
    entropy_end = sum(entropies[-3:]) / len(entropies[-3:])
    summary = {
        "before": before,
        "after": after,
        "entropy_start": entropy_start,
        "entropy_end": entropy_end,
        "entropy_change": entropy_end / entropy_start - 1.0,
        "entropy_start_from": "untrained policy (target)" if measured else "step 1",
        # the same held-out prompts before and after: the entropy comparison without batch noise
        "held_out_entropy_change": after["entropy/sampled"] / before["entropy/sampled"] - 1.0,
        # ... on the answers that stop before the cap: what an overlong-filtered run regulates
        # (a truncated ramble samples at several times the entropy of a finished answer, so the
        # all-answer figure moves with the share of rambles)
        "held_out_entropy_change_stopped": after["entropy/sampled_stopped"]
        / before["entropy/sampled_stopped"]
        - 1.0,
        "minutes": (time.perf_counter() - started) / 60,
        "run_dir": str(run_dir),
        "held_out_split": HELD_OUT_SPLIT,
        "num_tasks": int(before["tasks"]),  # fewer than asked when the split has fewer
        "k": k,
    }
    atomic_write_text(Path(run_dir) / "demo_summary.json", json.dumps(summary, indent=2))

    table = Table(
        title=f"held-out {HELD_OUT_SPLIT} split: {summary['num_tasks']} tasks x {k} samples (T={cfg.eval.temperature})"
    )
    for col in ("", "untrained", "trained"):
        table.add_column(col)
    for key, label in (
        ("pass@1", "pass@1"),
        (f"pass@{k}", f"pass@{k}"),
        ("reward/mean", "mean reward"),
        ("stopped_frac", "responses that stop before the cap"),
    ):
        table.add_row(label, f"{before[key]:.3f}", f"{after[key]:.3f}")
    table.add_row(
        "entropy of sampled tokens (held-out)",
        f"{before['entropy/sampled']:.3f}",
        f"{after['entropy/sampled']:.3f} ({summary['held_out_entropy_change']:+.1%})",
    )
    table.add_row(
        "entropy of sampled tokens, answers that stop (held-out)",
        f"{before['entropy/sampled_stopped']:.3f}",
        f"{after['entropy/sampled_stopped']:.3f} ({summary['held_out_entropy_change_stopped']:+.1%})",
    )
    table.add_row(
        "entropy of sampled tokens (train)",
        f"{entropy_start:.3f} ({'untrained' if measured else 'step 1'})",
        f"{entropy_end:.3f} (last 3 steps, {summary['entropy_change']:+.1%})",
    )
    console.print(table)
    console.print(f"report: {run_dir}/report.md   ({summary['minutes']:.1f} min)")
    return summary
