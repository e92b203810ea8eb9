"""End-of-run report: ``report.md`` with PNG plots of reward, success, entropy (with its target)
and clip fractions against steps, read back from ``metrics.jsonl``."""

from __future__ import annotations

import json
import math
from pathlib import Path

PLOTS = {
    "reward.png": ("reward", ["reward/mean"]),
    "success.png": ("success rate", ["success/rate"]),
    "entropy.png": ("entropy of sampled tokens (nats)", ["entropy/mean", "entropy/target"]),
    "clip.png": ("clipped token fraction", ["clip/low_frac", "clip/high_frac"]),
    "eval.png": ("held-out evaluation", None),  # every eval/*/pass@* series
}


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [
        (r["step"], r[key])
        for r in rows
        if key in r and r[key] is not None and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def write_report(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and "/pass@" in k})
    lines = [f"# Run report: {run_dir.name}", ""]
    for filename, (title, keys) in PLOTS.items():
        keys = eval_keys if keys is None else keys
        drawn = False
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            steps, values = _series(rows, key)
            if steps:
                style = "--" if key.endswith("target") else "-"
                ax.plot(
                    steps,
                    values,
                    style,
                    marker="o" if len(steps) < 30 else None,
                    label=key,
                    markersize=3,
                )
                drawn = True
        if drawn:
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(run_dir / filename, dpi=110)
            lines += [f"![{title}]({filename})", ""]
        plt.close(fig)

    summary = ["| metric | first | last |", "|---|---|---|"]
    for key in [
        "reward/mean",
        "success/rate",
        "entropy/mean",
        "clip/low_frac",
        "clip/high_frac",
        "mismatch/kl",
        "repo/zeta",
        "adapo/eps_high",
        *eval_keys,
    ]:
        steps, values = _series(rows, key)
        if values:
            summary.append(
                f"| {key} | {values[0]:.4f} (step {steps[0]}) | {values[-1]:.4f} (step {steps[-1]}) |"
            )
    lines = lines[:2] + summary + [""] + lines[2:]
    out = run_dir / "report.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return out
