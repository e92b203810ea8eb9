"""``eprl eval --compare``'s arithmetic: the paired difference of two result files.

Over the tasks both files scored (same task id, at least one error-free sample on each side), the
difference ``other - base`` of pass@1, pass@k (same k on both sides; tasks with n >= k on both),
success rate and mean reward, each with its paired bootstrap interval
(:func:`trainer.evaluation.intervals.paired_difference`), and whether that interval excludes 0.
What makes the pairing doubtful is said in ``notes``: task sets that differ (the difference is
then over the common tasks only) and settings that differ.
"""

from __future__ import annotations

from typing import Any

from trainer.evaluation.intervals import (
    Bootstrap,
    Samples,
    Statistic,
    episode_mean,
    excludes_zero,
    paired_difference,
    pass_at,
    task_rate,
)

# settings whose difference makes two files measure different things
_SAME = ("env", "split", "env_kwargs", "temperature", "top_p", "max_turns", "max_new_tokens")


def row_samples(result: dict[str, Any]) -> Samples | None:
    """:class:`Samples` (``success``, and ``reward`` where every row lists its rewards) of a result
    file's per-task rows with at least one error-free sample; None without such rows."""
    rows = [row for row in result.get("per_task", []) if row.get("n", 0) >= 1]
    if not rows:
        return None
    with_rewards = all(len(row.get("rewards", [])) == row["n"] for row in rows)
    tasks = []
    for row in rows:
        task = {"success": [1.0] * row["successes"] + [0.0] * (row["n"] - row["successes"])}
        if with_rewards:
            task["reward"] = [float(r) for r in row["rewards"]]
        tasks.append(task)
    return Samples.of([row["task_id"] for row in rows], tasks)


def _setting(result: dict[str, Any], key: str) -> Any:
    return result.get(key, result.get("settings", {}).get(key))


def paired_differences(
    base: dict[str, Any], other: dict[str, Any], boot: Bootstrap
) -> dict[str, Any]:
    """``{"tasks": {"base": N_a, "other": N_b, "common": N}, "notes": [...], "differences":
    {metric: {"difference", "interval", "excludes_zero", "tasks", "samples_base",
    "samples_other"}}}``; no differences when the files share no scored task."""
    notes = [
        f"{key} differs: {_setting(base, key)!r} vs {_setting(other, key)!r}"
        for key in _SAME
        if _setting(base, key) != _setting(other, key)
    ]
    a, b = row_samples(base), row_samples(other)
    ids_a = a.task_ids if a else []
    ids_b = set(b.task_ids) if b else set()
    common = [task for task in ids_a if task in ids_b]
    out: dict[str, Any] = {
        "tasks": {"base": len(ids_a), "other": len(ids_b), "common": len(common)},
        "notes": notes,
        "differences": {},
    }
    if a is None or b is None:
        notes.append("a file has no per-task rows with samples: no paired difference")
        return out
    if not common:
        notes.append("no scored task in common: no paired difference")
        return out
    if len(common) < max(len(ids_a), len(ids_b)):
        notes.append(
            f"task sets differ ({len(ids_a)} and {len(ids_b)} scored tasks): "
            f"differences are over the {len(common)} in both only"
        )
    a, b = a.rows(common), b.rows(common)
    statistics: list[tuple[str, Samples, Samples, Statistic]] = [
        ("pass@1", a, b, task_rate),
        ("success/rate", a, b, episode_mean("success")),
    ]
    if "reward" in a.values and "reward" in b.values:
        statistics.append(("reward/mean", a, b, episode_mean("reward")))
    if base.get("k") == other.get("k") and base.get("k", 1) > 1:
        k = int(base["k"])
        both = [t for t, n, m in zip(common, a.sizes, b.sizes, strict=True) if min(n, m) >= k]
        if both:
            n_max = int(max(a.sizes.max(), b.sizes.max()))
            statistics.append((f"pass@{k}", a.rows(both), b.rows(both), pass_at(k, n_max)))
        if len(both) < len(common):
            notes.append(f"pass@{k}: {len(common) - len(both)} common task(s) have n < {k}")
    for key, side_a, side_b, statistic in statistics:
        difference, interval = paired_difference(side_a, side_b, statistic, boot)
        out["differences"][key] = {
            "difference": difference,
            "interval": interval,
            "excludes_zero": excludes_zero(interval),
            "tasks": len(side_a.task_ids),
            "samples_base": int(side_a.sizes.sum()),
            "samples_other": int(side_b.sizes.sum()),
        }
    return out


def verdict(entry: dict[str, Any], confidence: float, base: str, other: str) -> str:
    """A plain statement of whether the difference is outside its interval's noise."""
    if entry["interval"] is None:
        return "no interval"
    if not entry["excludes_zero"]:
        return f"contains 0: no difference shown at {confidence:.0%}"
    return f"excludes 0: {other} is {'higher' if entry['interval'][0] > 0 else 'lower'} than {base}"
