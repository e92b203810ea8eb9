"""End-of-run report: ``report.md`` with PNG plots of reward, success, entropy (the learner's
and the sampler's, with the controllers' target) and clip fractions against steps, read back
from ``metrics.jsonl``. The reward and the sampler's NLL are drawn with a band: the range of the
step's group means (lowest to highest group, :func:`trainer.episodes.group_spread`)."""

from __future__ import annotations

import math
from pathlib import Path

from agent.io import atomic_write_text
from trainer.logger import read_metrics

PLOTS = {
    "reward.png": ("reward", ["reward/mean"]),
    "success.png": ("success rate", ["success/rate"]),
    "entropy.png": (
        "entropy (nats per sampled token)",
        ["entropy/mean", "entropy/sampler_nll", "entropy/target"],
    ),
    "clip.png": ("clipped token fraction", ["clip/low_frac", "clip/high_frac"]),
    "eval.png": ("held-out evaluation", None),  # every eval/*/pass@* series
}
# the band drawn around a series: (lowest, highest) group mean of the step
BANDS = {
    "reward/mean": ("reward/group_min", "reward/group_max"),
    "entropy/sampler_nll": ("entropy/sampler_nll_group_min", "entropy/sampler_nll_group_max"),
}
# legend labels: the learner's entropy is of the full next-token distribution, the sampler's
# NLL is -log pi_sampler of the tokens it drew (its expectation is the sampler's entropy)
LABELS = {
    "entropy/mean": "learner entropy (full distribution)",
    "entropy/sampler_nll": "sampler NLL of sampled tokens",
    "entropy/target": "controller target",
}


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [
        (r["step"], r[key])
        for r in rows
        if key in r and r[key] is not None and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _band_keys(key: str) -> tuple[str, str] | None:
    """The (low, high) series drawn as a band around ``key``: the range across groups for the
    training curves, the 95% bootstrap interval (``_lo`` / ``_hi``) for evaluations."""
    if key in BANDS:
        return BANDS[key]
    if key.startswith("eval/"):
        return f"{key}_lo", f"{key}_hi"
    return None


def _band(rows: list[dict], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps with both ends of ``key``'s band finite, and the band's low and high values."""
    low_key, high_key = _band_keys(key)
    points = [
        (r["step"], r[low_key], r[high_key])
        for r in rows
        if all(r.get(k) is not None and math.isfinite(r[k]) for k in (low_key, high_key))
    ]
    return [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]


def write_report(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    eval_keys = sorted(
        {
            k
            for r in rows
            for k in r
            if k.startswith("eval/") and "/pass@" in k and not k.endswith(("_lo", "_hi", "_tasks"))
        }
    )
    lines = [f"# Run report: {run_dir.name}", ""]
    for filename, (title, keys) in PLOTS.items():
        keys = eval_keys if keys is None else keys
        drawn = False
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in keys:
            steps, values = _series(rows, key)
            if steps:
                style = "--" if key.endswith("target") else "-"
                (line,) = ax.plot(
                    steps,
                    values,
                    style,
                    marker="o" if len(steps) < 30 else None,
                    label=LABELS.get(key, key),
                    markersize=3,
                )
                band_steps, low, high = _band(rows, key) if _band_keys(key) else ([], [], [])
                if band_steps:
                    ax.fill_between(
                        band_steps,
                        low,
                        high,
                        color=line.get_color(),
                        alpha=0.2,
                        label="95% interval" if key.startswith("eval/") else "range across groups",
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
        "entropy/sampler_nll",
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
    return atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
