"""RESULTS.md and sequential.png of the sequential-learning benchmark (:mod:`run`).

Per phase-2 start (base, GRPO's phase-1 model, REPO-R's): held-out pass@1 on the new task set at
phase 2's start and end, per seed and their median, the end's 95% bootstrap interval (the
trainer's ``eval/test/pass@1_lo/_hi``), and the phase-1 model's entropy change (the mean of
its first 3 training steps to its last 3); then each pair of starts compared seed by seed
(final pass@1 and the mean over phase 2's evaluations). The figure: held-out pass@1 against
phase-2 steps, the median across seeds with a band from the lowest to the highest seed.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from trainer.demo import median  # noqa: E402
from trainer.logger import read_metrics  # noqa: E402

STARTS = {"base": "base model", "grpo": "after GRPO (phase 1)", "repo_r": "after REPO-R (phase 1)"}
KEY = "eval/test/pass@1"
DONE = "sequential_done.json"  # run.py's marker of a finished run


def _runs(runs_root: Path, prefix: str) -> dict[int, list[dict]]:
    out = {}
    for run_dir in sorted(runs_root.glob(f"{prefix}_s*")):
        seed = run_dir.name.rsplit("_s", 1)[1]
        if seed.isdigit() and (rows := read_metrics(run_dir)):
            out[int(seed)] = rows
    return out


def curve(rows: list[dict]) -> list[tuple[int, float, float, float]]:
    """(step, pass@1, low, high) of every held-out evaluation of a run."""
    return [
        (r["step"], r[KEY], r.get(f"{KEY}_lo", float("nan")), r.get(f"{KEY}_hi", float("nan")))
        for r in rows
        if KEY in r
    ]


def entropy_change(rows: list[dict]) -> float | None:
    entropy = [r["entropy/mean"] for r in rows if "entropy/mean" in r]
    if len(entropy) < 2:
        return None
    start, end = entropy[:3], entropy[-3:]
    return (sum(end) / len(end)) / (sum(start) / len(start)) - 1.0


def summarize(runs_root: Path) -> dict[str, dict]:
    """Per start: {seed: {"curve", "phase1_entropy_change"}}."""
    out = {}
    for start in STARTS:
        phase2 = _runs(runs_root, f"p2_{start}")
        phase1 = _runs(runs_root, f"p1_{start}") if start != "base" else {}
        out[start] = {
            seed: {
                "curve": curve(rows),
                "phase1_entropy_change": entropy_change(phase1[seed]) if seed in phase1 else None,
                "done": (runs_root / f"p2_{start}_s{seed}" / DONE).exists(),
            }
            for seed, rows in phase2.items()
            if curve(rows)
        }
    return out


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.0%}" if percent else f"{value:.3f}"


def table(summary: dict[str, dict]) -> str:
    lines = [
        "| phase-2 start | seeds | phase-1 entropy change | held-out pass@1 at phase-2 start | "
        "at phase-2 end [95%] per seed | end, median over seeds |",
        "|---|---|---:|---|---|---:|",
    ]
    for start, label in STARTS.items():
        seeds = summary.get(start) or {}
        if not seeds:
            lines.append(f"| {label} | - | - | - | not run yet | - |")
            continue
        order = sorted(seeds)
        firsts = [seeds[s]["curve"][0][1] for s in order]
        ends = [seeds[s]["curve"][-1] for s in order]
        changes = [seeds[s]["phase1_entropy_change"] for s in order]
        done = [seeds[s]["done"] for s in order]
        per_seed = ", ".join(
            f"{e[1]:.3f} [{e[2]:.3f}, {e[3]:.3f}] (step {e[0]}{'' if d else ', running'})"
            for e, d in zip(ends, done, strict=True)
        )
        finished = [e[1] for e, d in zip(ends, done, strict=True) if d]
        lines.append(
            f"| {label} | {', '.join(map(str, order))} | "
            f"{', '.join(_fmt(c, True) for c in changes) if start != 'base' else '-'} | "
            f"{', '.join(_fmt(v) for v in firsts)} | {per_seed} | "
            f"**{_fmt(median(finished) if finished else None)}** ({len(finished)} finished) |"
        )
    return "\n".join(lines)


def _curve_mean(points: list[tuple[int, float, float, float]]) -> float:
    return sum(p[1] for p in points) / len(points)


def compare(summary: dict[str, dict], a: str, b: str) -> list[tuple[int, float, float]]:
    """(seed, end difference, curve-mean difference) of start ``a`` minus start ``b``, on the
    seeds where both finished, evaluated at the same phase-2 steps."""
    out = []
    first, second = summary.get(a) or {}, summary.get(b) or {}
    for seed in sorted(set(first) & set(second)):
        if not (first[seed]["done"] and second[seed]["done"]):
            continue
        ca, cb = first[seed]["curve"], second[seed]["curve"]
        if [p[0] for p in ca] != [p[0] for p in cb]:
            continue
        out.append((seed, ca[-1][1] - cb[-1][1], _curve_mean(ca) - _curve_mean(cb)))
    return out


def verdict(summary: dict[str, dict]) -> str:
    """Each pair of starts, seed by seed: the end's and the whole curve's difference."""
    lines = []
    for a, b in (("repo_r", "grpo"), ("repo_r", "base"), ("grpo", "base")):
        rows = compare(summary, a, b)
        name = f"{STARTS[a]} minus {STARTS[b]}"
        if not rows:
            lines.append(f"- {name}: no seed where both have finished")
            continue
        ends, means = [r[1] for r in rows], [r[2] for r in rows]
        if all(e > 0 for e in ends):
            word = "higher in every seed"
        elif all(e < 0 for e in ends):
            word = "lower in every seed"
        else:
            word = "mixed across seeds"
        lines.append(
            f"- {name}, seed{'s' if len(rows) > 1 else ''} "
            f"{', '.join(str(r[0]) for r in rows)}: final pass@1 "
            f"{', '.join(f'{e:+.3f}' for e in ends)} (median {median(ends):+.3f}; {word}); "
            f"mean over the phase-2 evaluations {', '.join(f'{m:+.3f}' for m in means)} "
            f"(median {median(means):+.3f})"
        )
    return "\n".join(lines)


def plot(summary: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for start, label in STARTS.items():
        seeds = summary.get(start) or {}
        if not seeds:
            continue
        by_step: dict[int, list[float]] = {}
        for data in seeds.values():
            for step, value, _, _ in data["curve"]:
                by_step.setdefault(step, []).append(value)
        steps = sorted(s for s, v in by_step.items() if len(v) == len(seeds))
        mid = [median(by_step[s]) for s in steps]
        (line,) = ax.plot(steps, mid, marker="o", label=f"{label} ({len(seeds)} seeds)")
        if len(seeds) > 1:
            ax.fill_between(
                steps,
                [min(by_step[s]) for s in steps],
                [max(by_step[s]) for s in steps],
                color=line.get_color(),
                alpha=0.2,
            )
    ax.set_xlabel("phase-2 step")
    ax.set_ylabel("held-out pass@1 (new task set)")
    ax.set_title("Sequential learning: median across seeds, band = lowest..highest seed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(runs_root: Path, out_dir: Path, settings: dict) -> Path:
    from _bench_util import machine

    from agent.io import atomic_write_text

    summary = summarize(runs_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = out_dir / "sequential.png"
    if any(summary.values()):
        plot(summary, figure)
    text = f"""# Sequential learning: results

Phase 1: {settings.get("phase1_family")} levels {settings.get("phase1_levels")},
{settings.get("phase1_steps")} steps of GRPO or REPO-R; phase 2: every phase-1 model and the base
model on {settings.get("phase2_family")} levels {settings.get("phase2_levels")}, {settings.get("phase2_steps")}
steps of plain RLOO (`benchmarks/sequential/config.yaml`). Held-out pass@1 on phase 2's `test`
split; [95% bootstrap interval over tasks and samples].
Written by `analyze.py` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from `{runs_root}`;
machine: {machine()}.

{table(summary)}

![held-out pass@1 against phase-2 steps](sequential.png)

Seed by seed (the same seed's phase-2 tasks and sampling, so differences are paired; the mean
over the phase-2 evaluations, step 0 included, measures how fast a start learns):

{verdict(summary)}

How to read this: the claim under test is that a phase-1 objective which keeps entropy (REPO-R)
leaves a model that learns the next task set faster than one whose entropy collapsed (GRPO).
It holds here only where REPO-R's median end is above GRPO's and the seeds agree; and it is
only tested where phase 1 did what the claim assumes (the phase-1 entropy column: REPO-R held,
GRPO fell). An end interval of +-0.2 on 20 tasks x 4 samples means single-seed differences
under ~0.2 are noise.
"""
    return atomic_write_text(out_dir / "RESULTS.md", text)
