"""Analyse the entropy study: RESULTS.md (per method: entropy change, train reward, held-out
pass@1 / pass@k, wall time; the paper's claims against ours) and entropy_study.png (entropy and
held-out pass@1 / pass@k against steps, all methods on one figure).

    python benchmarks/entropy_study/analyze.py [--runs-root RUNS] [--out-dir DIR]

Definitions: entropy = ``entropy/mean`` of the training batches (mean full-distribution entropy
of the sampled tokens' next-token distributions, nats); start = the mean of the first 3 steps,
end = the mean of the last 3 steps; change = end / start - 1. Train reward = ``reward/mean``
averaged over the first and the last 3 steps. Held-out = ``eval/test/pass@1`` and ``pass@k`` (unbiased) on the stratified test
tasks; step 0 is the untrained model (``baseline.json``). Wall time = the sum of the run's
attempts (a resumed run adds its pieces). With several seeds, means are shown with the range.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import yaml

STUDY = Path(__file__).resolve().parent
ROOT = STUDY.parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from trainer.evaluation.compare import paired_differences  # noqa: E402
from trainer.evaluation.intervals import Bootstrap, score_intervals  # noqa: E402
from trainer.evaluation.metrics import per_task_rows  # noqa: E402
from trainer.logger import read_metrics  # noqa: E402

ORDER = [
    "grpo",
    "dapo",
    "rloo_fp32",
    "rloo_bf16",
    "rloo_fp16",
    "repo_r_arxiv",
    "repo_r_submitted",
    "repo_r",
    "repo_d",
    "repo_d_dh",
    "adapo",
]
LABELS = {
    "grpo": "GRPO",
    "dapo": "DAPO (clip-higher)",
    "rloo_fp32": "RLOO, FP32 path",
    "rloo_bf16": "RLOO, bf16 path",
    "rloo_fp16": "RLOO, fp16 path (loss scaling)",
    "repo_r_arxiv": "REPO-R (arXiv)",
    "repo_r_submitted": "REPO-R (submitted)",
    "repo_r": "REPO-R",  # runs from before the two versions were told apart (the submitted form)
    "repo_d": "REPO, constant beta",
    "repo_d_dh": "REPO-D (beta = zeta dH)",
    "adapo": "ADAPO",
}
# Qwen3-32B on AppWorld (methods.md): entropy change over training, TGC test-normal / test-challenge
REPO_R = ("repo_r_arxiv", "repo_r_submitted", "repo_r")
PAPER_ENTROPY = {
    "grpo": -57,
    "dapo": 298,
    "rloo_fp32": -36,
    "adapo": 102,
    **dict.fromkeys(REPO_R, 7),
}
PAPER_TGC = {
    "rloo_fp32": (79, 71),
    "rloo_fp16": (79, 71),  # the headline row may be an FP16 fix, not FP32 (methods.md)
    "adapo": (78, 58),
    "dapo": (73, 52),
    **dict.fromkeys(REPO_R, (73, 54)),
    "grpo": (67, 46),
}
_RUN = re.compile(r"^(?P<method>[a-z0-9_]+)_s(?P<seed>\d+)$")


def _rows(path: Path) -> list[dict]:
    """The study's own attempt log (one JSON object per line)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wall_seconds(run_dir: Path) -> float:
    """Sum of the run's attempts; an attempt killed without an end record ends at the last write
    of its metrics (bounded by the next attempt's start)."""
    rows = _rows(run_dir / "study_attempts.jsonl")
    starts = {r["attempt"]: r["start"] for r in rows if "start" in r}
    ends = {r["attempt"]: r["end"] for r in rows if "end" in r}
    order = sorted(starts.items(), key=lambda item: item[1])
    metrics = run_dir / "metrics.jsonl"
    last_write = metrics.stat().st_mtime if metrics.exists() else None
    total = 0.0
    for i, (attempt, start) in enumerate(order):
        end = ends.get(attempt)
        if end is None:
            bound = order[i + 1][1] if i + 1 < len(order) else math.inf
            end = min(last_write, bound) if last_write else start
        total += max(0.0, end - start)
    return total


def load_run(run_dir: Path, baseline: dict | None) -> dict | None:
    match = _RUN.match(run_dir.name)
    rows = read_metrics(run_dir)
    if not match or not rows or not (run_dir / "config.yaml").exists():
        return None
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    split, k = cfg["eval"]["split"], cfg["eval"]["k"]
    train = [r for r in rows if "entropy/mean" in r]
    evals = (
        [(0, baseline["metrics"]["pass@1"], baseline["metrics"][f"pass@{k}"])] if baseline else []
    )
    evals += [
        (r["step"], r[f"eval/{split}/pass@1"], r[f"eval/{split}/pass@k"])
        for r in rows
        if f"eval/{split}/pass@1" in r and r["step"] > 0
    ]
    if not train:
        return None
    entropy = [r["entropy/mean"] for r in train]
    reward = [r["reward/mean"] for r in train]
    end = entropy[-3:]
    return {
        "method": match["method"],
        "seed": int(match["seed"]),
        "dir": run_dir,
        "k": k,
        "steps_planned": cfg["steps"],
        "steps": train[-1]["step"],
        "done": (run_dir / "study_done.json").exists(),
        "entropy_steps": [r["step"] for r in train],
        "entropy": entropy,
        # the mean of the first and of the last 3 steps: one batch's entropy swings by tens of
        # percent with its tasks (3-4 tasks per step)
        "entropy_start": sum(entropy[:3]) / len(entropy[:3]),
        "entropy_end": sum(end) / len(end),
        "reward_first": _mean(reward[:3]),
        "reward_last": _mean(reward[-3:]),
        "clip_low": _mean(r.get("clip/low_frac", 0.0) for r in train),
        "clip_high": _mean(r.get("clip/high_frac", 0.0) for r in train),
        "evals": evals,
        "wall_s": wall_seconds(run_dir),
        "eval_tasks": _eval_tasks(run_dir, baseline),
        "final_records": final_records(run_dir, split),
        "tasks": ", ".join(f"{key}={value}" for key, value in cfg["env"]["kwargs"].items()),
        "tasks_per_step": cfg["rollout"]["tasks_per_step"],
        "budget": (
            f"{cfg['steps']} steps of {cfg['rollout']['tasks_per_step']} tasks x "
            f"K={cfg['rollout']['group_size']} samples ({cfg['rollout']['max_new_tokens']} new tokens), "
            f"AdamW lr {cfg['trainer']['lr']:g}, {cfg['trainer']['mini_batches']} mini-batch update(s) per step"
        ),
    }


def final_records(run_dir: Path, split: str) -> dict | None:
    """The per-task records of the run's last evaluation on ``split`` (``evals/<split>_step
    <N>.json``, written by the trainer since 2026-12-01), or None for runs from before."""
    files = sorted((run_dir / "evals").glob(f"{split}_step*.json"))
    return json.loads(files[-1].read_text()) if files else None


def pooled_records(runs: list[dict]) -> tuple[int, list[dict]] | None:
    """(k, task records) of a method's final held-out evaluation over its seeds: each task's
    samples from every seed together (the tasks are the same for every seed), or None when a
    run has no per-task records."""
    if not runs or any(r.get("final_records") is None for r in runs):
        return None
    by_task: dict[str, dict] = {}
    for run in runs:
        for record in run["final_records"]["records"]:
            merged = by_task.setdefault(record["task_id"], {**record, "episodes": []})
            merged["episodes"] = merged["episodes"] + record["episodes"]
    return runs[0]["final_records"]["k"], list(by_task.values())


def pooled_side(runs: list[dict]) -> dict | None:
    """:func:`pooled_records` as one ``--compare`` side."""
    pooled = pooled_records(runs)
    if pooled is None:
        return None
    k, records = pooled
    return {"k": k, "per_task": per_task_rows(records, k)}


def end_interval(runs: list[dict], key: str) -> str:
    """`` [lo, hi]``: the 95% bootstrap interval of the final held-out ``key`` (pass@1 or
    pass@k) over the pooled records, or "" for runs from before the per-task records."""
    pooled = pooled_records(runs)
    if pooled is None:
        return ""
    k, records = pooled
    bounds = score_intervals(records, k, Bootstrap())["intervals"].get(key.format(k=k))
    return "" if bounds is None else f" [{bounds[0]:.3f}, {bounds[1]:.3f}]"


def paired_pass_at_1(base: list[dict], other: list[dict]) -> dict | None:
    """other - base of held-out pass@1 over the tasks both evaluated, with its 95% paired
    bootstrap interval (over tasks and the samples within them), or None without records."""
    a, b = pooled_side(base), pooled_side(other)
    if a is None or b is None:
        return None
    return paired_differences(a, b, Bootstrap())["differences"].get("pass@1")


def _eval_tasks(run_dir: Path, baseline: dict | None) -> int | None:
    done = run_dir / "study_done.json"
    if done.exists():
        return len(json.loads(done.read_text()).get("eval_tasks", [])) or None
    return int(baseline["metrics"]["tasks"]) if baseline else None


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _agg(runs: list[dict], key) -> tuple[float, float, float]:
    values = [key(r) for r in runs]
    return _mean(values), min(values), max(values)


def _fmt(triple: tuple[float, float, float], fmt: str = "{:.3f}", pct: bool = False) -> str:
    mean, low, high = triple
    f = (lambda v: f"{v * 100:+.0f}%") if pct else fmt.format
    return f(mean) if math.isclose(low, high) else f"{f(mean)} ({f(low)}..{f(high)})"


def _se(p: float, n: int | None) -> float:
    """A rough standard error of a pass rate over n tasks (binomial over tasks)."""
    return math.sqrt(max(p * (1 - p), 1e-4) / n) if n else float("nan")


def claims(by_method: dict[str, list[dict]]) -> list[tuple[str, str, str, str]]:
    """(claim, paper, ours, verdict) rows: the paper's claims that this study can test."""
    out = []

    def change(method: str) -> float | None:
        runs = by_method.get(method)
        return _mean(r["entropy_end"] / r["entropy_start"] - 1 for r in runs) if runs else None

    def unfinished(method: str) -> str:
        runs = by_method.get(method) or []
        return "" if all(r["done"] for r in runs) else " (so far: run unfinished)"

    for method, paper in PAPER_ENTROPY.items():
        ours = change(method)
        if ours is None:
            continue
        if method in REPO_R:
            claim, ok = f"{LABELS[method]} keeps entropy near its start", abs(ours) <= 0.15
        elif paper < 0:
            claim, ok = f"{LABELS[method]} lowers entropy", ours < -0.05
        else:
            claim, ok = f"{LABELS[method]} raises entropy", ours > 0.05
        verdict = (
            "agrees" if ok else ("flat (|change| <= 5%)" if abs(ours) <= 0.05 else "disagrees")
        )
        out.append((claim, f"{paper:+d}%", f"{ours * 100:+.0f}%", verdict + unfinished(method)))
    fp32, bf16 = change("rloo_fp32"), change("rloo_bf16")
    if fp32 is not None and bf16 is not None:
        ok = bf16 < fp32 - 0.05
        out.append(
            (
                "the bf16 loss path ends at lower entropy than the FP32 path (Theorem 3)",
                "collapse vs -36%",
                f"{bf16 * 100:+.0f}% vs {fp32 * 100:+.0f}%",
                "agrees"
                if ok
                else ("within 5 points" if abs(bf16 - fp32) <= 0.05 else "disagrees"),
            )
        )
    base = by_method.get("grpo")
    if base:
        p_base = _mean(r["evals"][-1][1] for r in base)
        n = base[0]["eval_tasks"]
        for method in ("rloo_fp32", "rloo_fp16", "adapo", "dapo", *REPO_R):
            runs = by_method.get(method)
            if not runs:
                continue
            p = _mean(r["evals"][-1][1] for r in runs)
            paired = paired_pass_at_1(base, runs)
            if paired is not None and paired["interval"] is not None:
                # the paired bootstrap over the same held-out tasks, all seeds' samples pooled
                low, high = paired["interval"]
                ours = (
                    f"pass@1 {p:.3f} vs {p_base:.3f}, difference {paired['difference']:+.3f} "
                    f"[{low:+.3f}, {high:+.3f}] (95% paired, {paired['tasks']} tasks)"
                )
                noise_free = paired["excludes_zero"]
                diff = paired["difference"]
            else:  # runs from before the per-task records: the binomial approximation
                noise = 2 * math.hypot(_se(p, n), _se(p_base, n))
                ours = f"pass@1 {p:.3f} vs {p_base:.3f} (2 SE ~ {noise:.3f})"
                diff = p - p_base
                noise_free = abs(diff) >= noise
            verdict = "within noise" if not noise_free else "agrees" if diff > 0 else "disagrees"
            paper = f"{PAPER_TGC[method][0]} vs {PAPER_TGC['grpo'][0]} TGC (T-N)"
            out.append(
                (
                    f"{LABELS[method]} beats GRPO on held-out tasks",
                    paper,
                    ours,
                    verdict + unfinished(method),
                )
            )
    return out


def seed_band(
    series: list[tuple[list[int], list[float]]],
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Across seeds' ``(steps, values)`` series: the steps every seed has, and at each the mean,
    the lowest and the highest value."""
    by_step = [dict(zip(steps, values, strict=True)) for steps, values in series]
    common = sorted(set.intersection(*(set(points) for points in by_step)))
    columns = [[points[step] for points in by_step] for step in common]
    return (
        common,
        [sum(c) / len(c) for c in columns],
        [min(c) for c in columns],
        [max(c) for c in columns],
    )


def plot(by_method: dict[str, list[dict]], path: Path) -> None:
    """Entropy and held-out pass@1 / pass@k against steps; a method with several seeds is drawn
    as the mean across seeds with a band from the lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colours = dict(zip(ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    k = None
    for method in [m for m in ORDER if m in by_method]:
        runs = by_method[method]
        colour = colours.get(method)
        panels = [
            [(r["entropy_steps"], r["entropy"]) for r in runs],
            [([e[0] for e in r["evals"]], [e[1] for e in r["evals"]]) for r in runs],
            [([e[0] for e in r["evals"]], [e[2] for e in r["evals"]]) for r in runs],
        ]
        for i, (ax, series) in enumerate(zip(axes, panels, strict=True)):
            marker = None if i == 0 else "o"
            if len(runs) == 1:
                ax.plot(*series[0], marker=marker, color=colour, label=LABELS[method])
                continue
            steps, mean, low, high = seed_band(series)
            label = f"{LABELS[method]} (mean of {len(runs)} seeds; band: lowest to highest)"
            ax.plot(steps, mean, marker=marker, color=colour, label=label)
            ax.fill_between(steps, low, high, color=colour, alpha=0.2)
        k = runs[0]["k"]
    # log scale: a diverging run (REPO-D at 6+ nats) would flatten the others' 0.5-1.2 nats
    axes[0].set(
        title="entropy of the sampled tokens (training batches)",
        xlabel="step",
        ylabel="nats (log scale)",
        yscale="log",
    )
    axes[1].set(title="held-out pass@1 (test split)", xlabel="step", ylabel="pass@1")
    axes[2].set(title=f"held-out pass@{k} (test split)", xlabel="step", ylabel=f"pass@{k}")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Entropy study: SmolLM2-135M-Instruct on CodeExec procedural tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    by_method: dict[str, list[dict]], baseline: dict | None, runs_root: Path, figure: Path
) -> str:
    from _bench_util import machine

    any_run = next(iter(by_method.values()))[0]
    k = any_run["k"]
    rows = [
        "| method | seeds | steps | entropy first 3 -> last 3 steps | entropy change | train reward first 3 -> last 3 "
        f"| held-out pass@1 (step 0 -> end) | held-out pass@{k} (step 0 -> end) | clip low / high | wall time (min) |",
        "|---|---|---:|---|---:|---|---|---|---|---:|",
    ]
    for method in [m for m in ORDER if m in by_method]:
        runs = by_method[method]
        b1 = f"{baseline['metrics']['pass@1']:.3f} -> " if baseline else ""
        bk = f"{baseline['metrics'][f'pass@{k}']:.3f} -> " if baseline else ""
        unfinished = "" if all(r["done"] for r in runs) else " (unfinished)"
        rows.append(
            f"| {LABELS[method]}{unfinished} | {','.join(str(r['seed']) for r in runs)} "
            f"| {_fmt(_agg(runs, lambda r: r['steps']), '{:.0f}')} "
            f"| {_fmt(_agg(runs, lambda r: r['entropy_start']))} -> {_fmt(_agg(runs, lambda r: r['entropy_end']))} "
            f"| {_fmt(_agg(runs, lambda r: r['entropy_end'] / r['entropy_start'] - 1), pct=True)} "
            f"| {_fmt(_agg(runs, lambda r: r['reward_first']))} -> {_fmt(_agg(runs, lambda r: r['reward_last']))} "
            f"| {b1}{_fmt(_agg(runs, lambda r: r['evals'][-1][1]))}{end_interval(runs, 'pass@1')} "
            f"| {bk}{_fmt(_agg(runs, lambda r: r['evals'][-1][2]))}{end_interval(runs, 'pass@{k}')} "
            f"| {_mean(r['clip_low'] for r in runs):.4f} / {_mean(r['clip_high'] for r in runs):.4f} "
            f"| {_fmt(_agg(runs, lambda r: r['wall_s'] / 60), '{:.1f}')} |"
        )
    all_runs = [r for runs in by_method.values() for r in runs]
    total_min = sum(r["wall_s"] for r in all_runs) / 60
    n_tasks = any_run["eval_tasks"]
    verdicts = [
        "| paper's claim | paper (Qwen3-32B, AppWorld) | ours | verdict |",
        "|---|---|---|---|",
    ]
    verdicts += [f"| {c} | {p} | {o} | {v} |" for c, p, o, v in claims(by_method)]
    baseline_min = baseline.get("wall_s_this_run", 0.0) / 60 if baseline else 0.0
    return f"""# Entropy study: results

SmolLM2-135M-Instruct on `eprl/CodeExec-v0` ({any_run["tasks"]}), the same seeds, tasks
and budget for every method: {any_run["budget"]}; held-out pass@1 / pass@{k} on {n_tasks} test
tasks (an equal share of each family and level trained on) x K={k} at temperature 1.0. Configs: `benchmarks/entropy_study/configs/`.
Written by `analyze.py` on {datetime.now(UTC):%Y-%m-%d %H:%M UTC}; runs in `{runs_root}`;
machine: {machine()}.

Wall time: {total_min:.0f} min for the {len(all_runs)} runs, plus {baseline_min:.0f} min for the
baseline evaluation (the untrained model, step 0 of every curve).

{chr(10).join(rows)}

![entropy and held-out pass@k against steps]({figure.name})

## The paper's claims at this scale

{chr(10).join(verdicts)}

How to read this: one seed per method unless listed, {n_tasks} held-out tasks. A held-out
difference is noise unless its 95% paired bootstrap interval (over the same tasks, every seed's
samples pooled) excludes 0; runs from before the trainer kept per-task records show two
binomial standard errors instead. Entropy is measured on the
training batches, which differ in content from step to step ({any_run["tasks_per_step"]} tasks per step), so
"start" and "end" are the means of the first and the last 3 steps: look at the trend over the
figure rather than single steps. The paper's numbers are for Qwen3-32B on
AppWorld with hundreds of steps; ours are for a 135M model on short code tasks with
{any_run["steps_planned"]} steps, so agreement in direction is what can be checked, not size.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-root", default=str(STUDY / "runs"))
    parser.add_argument(
        "--out-dir", help="default: this folder for the default runs root, else the runs root"
    )
    args = parser.parse_args(argv)
    runs_root = Path(args.runs_root).resolve()
    default_root = (STUDY / "runs").resolve()
    out_dir = (
        Path(args.out_dir) if args.out_dir else (STUDY if runs_root == default_root else runs_root)
    )
    baseline_path = runs_root / "baseline.json"
    baseline = json.loads(baseline_path.read_text()) if baseline_path.exists() else None
    by_method: dict[str, list[dict]] = {}
    for run_dir in (
        sorted(p for p in runs_root.iterdir() if p.is_dir()) if runs_root.is_dir() else []
    ):
        run = load_run(run_dir, baseline)
        if run is not None:
            by_method.setdefault(run["method"], []).append(run)
    if not by_method:
        print(f"no study runs with metrics under {runs_root}", file=sys.stderr)
        return 1
    for runs in by_method.values():
        runs.sort(key=lambda r: r["seed"])
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = out_dir / "entropy_study.png"
    plot(by_method, figure)
    results = out_dir / "RESULTS.md"
    results.write_text(report(by_method, baseline, runs_root, figure))
    print(f"wrote {results} and {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
