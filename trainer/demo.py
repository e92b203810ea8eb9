"""`make demo` / `eprl demo`: train the embedded model with the quick-start config, then evaluate
the trained policy against the untrained one on the held-out split and print both, with the
entropy at the start and the end of training. Every held-out number carries its 95% bootstrap
interval (:mod:`trainer.evaluation.intervals`), and each trained - untrained difference its
paired interval over the same tasks, with whether it excludes zero."""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from pathlib import Path

from agent.io import atomic_write_text
from trainer.config import load_config
from trainer.evaluation.compare import paired_differences
from trainer.evaluation.intervals import (
    Bootstrap,
    episode_mean,
    excludes_zero,
    paired_difference,
    per_token,
    record_samples,
    score_intervals,
)
from trainer.evaluation.metrics import per_task_rows, records_of_episodes
from trainer.logger import read_metrics
from trainer.loop import new_run_dir
from trainer.tasks import held_out_tasks, split_task_ids

HELD_OUT_SPLIT = "test"


def _evaluate(trainer, split: str, num_tasks: int, k: int) -> dict:
    """Held-out pass@1 / pass@k, reward, stopped share and sampled-token entropy (all answers and
    those that stop before the cap), with their intervals and counts, and the per-task records."""
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
    records = records_of_episodes(episodes, trainer.chat.tokenizer)
    return {"metrics": summary, "records": records, **score_intervals(records, k, BOOTSTRAP)}


BOOTSTRAP = Bootstrap()
ROWS = (
    ("pass@1", "pass@1"),
    ("pass@{k}", "pass@{k}"),
    ("reward/mean", "mean reward"),
    ("response/stopped_frac", "responses that stop before the cap"),
    ("entropy/sampled", "entropy of sampled tokens (held-out)"),
    ("entropy/sampled_stopped", "entropy of sampled tokens, answers that stop (held-out)"),
)


def _with_interval(side: dict, key: str) -> str:
    value, bounds = side["metrics"].get(key), side["intervals"].get(key)
    if value is None:
        return "-"
    return f"{value:.3f}" + ("" if bounds is None else f" [{bounds[0]:.3f}, {bounds[1]:.3f}]")


def _differences(before: dict, after: dict, k: int) -> dict[str, dict]:
    """trainer - untrained of every held-out score with its paired bootstrap interval."""
    sides = [{"k": k, "per_task": per_task_rows(side["records"], k)} for side in (before, after)]
    out = paired_differences(*sides, BOOTSTRAP)["differences"]
    a, b = record_samples(before["records"]), record_samples(after["records"])
    common = [task for task in a.task_ids if task in set(b.task_ids)]
    a, b = a.rows(common), b.rows(common)
    for key, statistic in (
        ("response/stopped_frac", episode_mean("stopped")),
        ("entropy/sampled", per_token()),
        ("entropy/sampled_stopped", per_token("stopped")),
    ):
        if before["metrics"][key] is not None and after["metrics"][key] is not None:
            difference, bounds = paired_difference(a, b, statistic, BOOTSTRAP)
            out[key] = {
                "difference": difference,
                "interval": bounds,
                "excludes_zero": excludes_zero(bounds),
                "tasks": len(common),
            }
    return out


def _difference_text(entry: dict | None) -> str:
    if entry is None or entry["interval"] is None:
        return "-"
    low, high = entry["interval"]
    shown = "excludes 0" if entry["excludes_zero"] else "contains 0"
    return f"{entry['difference']:+.3f} [{low:+.3f}, {high:+.3f}] ({shown})"


def _relative_change(before: dict, after: dict, key: str) -> float | None:
    start, end = before["metrics"][key], after["metrics"][key]
    return end / start - 1.0 if start and end is not None else None


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
    last = entropies[-3:]
    entropy_end = sum(last) / len(last)
    differences = _differences(before, after, k)
    gain = differences["pass@1"]
    # the sampler/learner gap over the run's updates: 0 with hf (one module), kernels with vllm
    kls = [r["mismatch/kl"] for r in rows if math.isfinite(r.get("mismatch/kl", math.nan))]
    summary = {
        "before": before["metrics"],
        "after": after["metrics"],
        # [lo, hi] of each score (95% bootstrap over tasks and samples) and what it rests on
        "intervals": {"before": before["intervals"], "after": after["intervals"]},
        "counts": {"before": before["counts"], "after": after["counts"]},
        "bootstrap": before["bootstrap"],
        # trained - untrained over the same tasks, each with its paired bootstrap interval
        "differences": differences,
        "pass@1_gain_excludes_zero": gain["excludes_zero"],
        "policy_backend": cfg.policy.backend,
        "mismatch_kl": sum(kls) / len(kls) if kls else None,
        "entropy_start": entropy_start,
        "entropy_end": entropy_end,
        "entropy_end_range": [min(last), max(last)],
        "entropy_change": entropy_end / entropy_start - 1.0,
        "entropy_start_from": "untrained policy (target)" if measured else "step 1",
        # the same held-out prompts before and after: the entropy comparison without batch noise
        "held_out_entropy_change": _relative_change(before, after, "entropy/sampled"),
        # ... on the answers that stop before the cap: what an overlong-filtered run regulates
        # (a truncated ramble samples at several times the entropy of a finished answer, so the
        # all-answer figure moves with the share of rambles)
        "held_out_entropy_change_stopped": _relative_change(
            before, after, "entropy/sampled_stopped"
        ),
        "minutes": (time.perf_counter() - started) / 60,
        "run_dir": str(run_dir),
        "held_out_split": HELD_OUT_SPLIT,
        "num_tasks": int(before["metrics"]["tasks"]),  # fewer than asked when the split has fewer
        "k": k,
    }
    atomic_write_text(Path(run_dir) / "demo_summary.json", json.dumps(summary, indent=2))

    table = Table(
        title=f"held-out {HELD_OUT_SPLIT} split: {summary['num_tasks']} tasks x {k} samples "
        f"(T={cfg.eval.temperature}); [95% bootstrap interval]"
    )
    for col in ("", "untrained", "trained", "trained - untrained, paired [95%]"):
        table.add_column(col)
    relative = {
        "entropy/sampled": summary["held_out_entropy_change"],
        "entropy/sampled_stopped": summary["held_out_entropy_change_stopped"],
    }
    for key, label in ROWS:
        key, label = key.format(k=k), label.format(k=k)
        change = relative.get(key)
        table.add_row(
            label,
            _with_interval(before, key),
            _with_interval(after, key) + ("" if change is None else f" ({change:+.1%})"),
            _difference_text(differences.get(key)),
        )
    table.add_row(
        "entropy of sampled tokens (train)",
        f"{entropy_start:.3f} ({'untrained' if measured else 'step 1'})",
        f"{entropy_end:.3f} (last 3 steps: {min(last):.3f}..{max(last):.3f})",
        f"{summary['entropy_change']:+.1%}",
    )
    console.print(table)
    if kls:
        console.print(
            f"sampler/learner mismatch KL ({cfg.policy.backend} sampler, mean over {len(kls)} "
            f"steps): {summary['mismatch_kl']:.2e}"
        )
    low, high = gain["interval"]
    console.print(
        f"pass@1 gain {gain['difference']:+.3f}, 95% paired interval [{low:+.3f}, {high:+.3f}] "
        f"over {gain['tasks']} tasks: "
        + (
            "excludes 0, the gain is outside the evaluation's noise"
            if gain["excludes_zero"]
            else "contains 0, the gain is within the evaluation's noise"
        )
    )
    console.print(f"report: {run_dir}/report.md   ({summary['minutes']:.1f} min)")
    return summary


# the numbers a multi-seed demo reports per seed, with how each is read from a demo summary
SEED_NUMBERS = {
    "pass@1 untrained": lambda s: s["before"]["pass@1"],
    "pass@1 trained": lambda s: s["after"]["pass@1"],
    "pass@1 gain": lambda s: s["differences"]["pass@1"]["difference"],
    "pass@k untrained": lambda s: s["before"].get(f"pass@{s['k']}"),
    "pass@k trained": lambda s: s["after"].get(f"pass@{s['k']}"),
    "pass@k gain": lambda s: (s["differences"].get(f"pass@{s['k']}") or {}).get("difference"),
    "held-out entropy change": lambda s: s["held_out_entropy_change"],
    "held-out entropy change, stopped answers": lambda s: s["held_out_entropy_change_stopped"],
    "train entropy change": lambda s: s["entropy_change"],
    "minutes": lambda s: s["minutes"],
}


def median(values: list[float]) -> float | None:
    """The median of the finite values (the middle one, or the mean of the middle two)."""
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return None
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


def seed_digest(summary: dict) -> dict:
    """One seed's row of a multi-seed demo: the numbers of :data:`SEED_NUMBERS`, whether its
    pass@1 gain excludes zero, and where its run lies."""
    row = {name: read(summary) for name, read in SEED_NUMBERS.items()}
    row["pass@1 gain excludes 0"] = summary["pass@1_gain_excludes_zero"]
    row["run_dir"] = summary["run_dir"]
    return row


def seeds_report(per_seed: dict[int, dict]) -> dict:
    """Each seed's numbers and their median across seeds (never the best draw)."""
    seeds = sorted(per_seed)
    return {
        "seeds": seeds,
        "per_seed": {str(s): per_seed[s] for s in seeds},
        "median": {name: median([per_seed[s][name] for s in seeds]) for name in SEED_NUMBERS},
        "gains_excluding_0": sum(bool(per_seed[s]["pass@1 gain excludes 0"]) for s in seeds),
    }


def run_seeds(
    config: str,
    seeds: list[int],
    out: str | Path,
    num_tasks: int = 40,
    k: int = 2,
    overrides: list[str] | None = None,
) -> dict:
    """`eprl demo --seeds N`: the demo once per seed, then each seed's numbers and the median.

    ``out`` (JSON) is rewritten atomically after every seed, so a killed run keeps the seeds it
    finished and a rerun with the same ``out`` starts at the first seed it lacks. It records the
    config and overrides it ran with and refuses to continue under other ones."""
    from rich.console import Console
    from rich.table import Table

    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds needs distinct seeds, got {seeds}")
    out = Path(out)
    settings = {
        "config": str(config),
        "overrides": list(overrides or []),
        "k": k,
        "num_tasks": num_tasks,
    }
    per_seed: dict[int, dict] = {}
    if out.exists():
        done = json.loads(out.read_text())
        if done.get("settings") != settings:
            raise ValueError(
                f"{out} holds a multi-seed demo with other settings {done.get('settings')}; "
                f"this run has {settings}: pass another --out"
            )
        per_seed = {int(s): row for s, row in done["per_seed"].items()}
    base_name = load_config(config, settings["overrides"]).logging.run_name
    base_name = base_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    console = Console()
    for seed in seeds:
        if seed in per_seed:
            console.print(f"seed {seed}: done already ({per_seed[seed]['run_dir']})")
            continue
        console.print(f"[bold]seed {seed}[/] ({len(per_seed) + 1}/{len(seeds)})")
        # each seed its own run folder: <run_name or the start time>_s<seed>
        run_name = f"{base_name}_s{seed}"
        summary = run_demo(
            config,
            num_tasks,
            k,
            [*settings["overrides"], f"seed={seed}", f"logging.run_name={run_name}"],
        )
        per_seed[seed] = seed_digest(summary)
        report = {"settings": settings, **seeds_report(per_seed)}
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(report, indent=2))

    report = {"settings": settings, **seeds_report({s: per_seed[s] for s in seeds})}
    table = Table(title=f"{len(seeds)} seeds: each seed and the median ({out})")
    table.add_column("")
    for seed in seeds:
        table.add_column(f"seed {seed}")
    table.add_column("median")
    for name in SEED_NUMBERS:
        percent = "change" in name
        cells = [per_seed[s][name] for s in seeds] + [report["median"][name]]
        table.add_row(name, *(_number(v, percent) for v in cells))
    console.print(table)
    console.print(
        f"pass@1 gain outside the evaluation's 95% noise in {report['gains_excluding_0']} "
        f"of {len(seeds)} seeds"
    )
    return report


def _number(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{value:+.1%}" if percent else f"{value:.3f}"
