"""Confidence intervals on the evaluation's scores, and paired differences of two evaluations.

The method is a two-level nonparametric percentile bootstrap (Efron & Tibshirani, 1993, ch. 13;
two-stage resampling, Davison & Hinkley, 1997, sec. 3.8). Each of ``resamples`` replicates draws
T tasks with replacement from the T scored ones and then, inside each drawn task, n_t samples
with replacement from its own n_t; the score is recomputed on the replicate, and the interval is
the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the replicates. SGC's unit
is the scenario: its replicates draw scenarios, then the samples of each of their tasks.
Resampling the samples as well as the tasks counts the within-task noise a second time (the
spread of the tasks' observed rates already holds it once), so with K > 1 the interval errs on
the wide side; with K = 1 it is the tasks-only bootstrap.

A paired difference (B - A over the tasks both evaluations hold) draws the same tasks for both
sides in each replicate and each side's samples independently, so the task-to-task spread that
both share cancels.

Replicates come from ``numpy.random.default_rng(seed)``: the same records and seed give the same
intervals, so results files are deterministic (a resumed evaluation writes what an uninterrupted
one does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from trainer.evaluation.metrics import pass_at_k, sampled_entropy, scenario_of, valid_episodes

# how many (replicate, task, sample) cells one chunk of replicates may hold
_CHUNK_CELLS = 4_000_000


@dataclass(frozen=True)
class Bootstrap:
    """The interval's settings: coverage, number of replicates, the RNG seed."""

    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.resamples < 100:
            raise ValueError(f"resamples must be >= 100, got {self.resamples}")


@dataclass(frozen=True)
class Samples:
    """Per-sample values of T tasks padded to ``[T, n_max]``: ``values[name][t, j]`` is sample
    j of task t for ``j < sizes[t]`` (0 beyond). Every task holds at least one sample."""

    task_ids: list[str]
    sizes: np.ndarray  # [T], int
    values: dict[str, np.ndarray]  # name -> [T, n_max], float

    @classmethod
    def of(cls, task_ids: Sequence[str], tasks: Sequence[dict[str, Sequence[float]]]) -> Samples:
        """From one ``{name: per-sample values}`` mapping per task (all names of equal length)."""
        sizes = np.array([len(next(iter(t.values()))) for t in tasks], dtype=np.int64)
        if not len(sizes) or sizes.min() < 1:
            raise ValueError(f"need at least one task with >= 1 sample each, got sizes {sizes}")
        values = {}
        for name in tasks[0]:
            table = np.zeros((len(tasks), int(sizes.max())))
            for row, task in enumerate(tasks):
                table[row, : len(task[name])] = task[name]
            values[name] = table
        return cls(list(task_ids), sizes, values)

    def rows(self, task_ids: Sequence[str]) -> Samples:
        """The tasks ``task_ids`` (held here) in that order."""
        index = {task: row for row, task in enumerate(self.task_ids)}
        picked = np.array([index[task] for task in task_ids], dtype=np.int64)
        n_max = int(self.sizes[picked].max())
        values = {name: table[picked, :n_max] for name, table in self.values.items()}
        return Samples(list(task_ids), self.sizes[picked], values)


@dataclass(frozen=True)
class Draw:
    """Replicates ``[R, T, n_max]`` of a :class:`Samples` (padding zeroed, ``mask`` the real
    samples, ``sizes`` [R, T]); a statistic maps a draw to one value per replicate, ``[R]``."""

    values: dict[str, np.ndarray]
    mask: np.ndarray
    sizes: np.ndarray


Statistic = Callable[[Draw], np.ndarray]


def _identity(samples: Samples) -> Draw:
    n_max = next(iter(samples.values.values())).shape[1]
    mask = (np.arange(n_max) < samples.sizes[:, None])[None]
    return Draw({k: v[None] for k, v in samples.values.items()}, mask, samples.sizes[None])


def _resample(samples: Samples, tasks: np.ndarray, rng: np.random.Generator) -> Draw:
    """The replicates whose drawn tasks are ``tasks`` [R, T], each task's samples drawn with
    replacement from its own."""
    sizes = samples.sizes[tasks]
    n_max = next(iter(samples.values.values())).shape[1]
    picks = (rng.random((*tasks.shape, n_max)) * sizes[..., None]).astype(np.int64)
    mask = np.arange(n_max) < sizes[..., None]
    values = {
        name: np.where(mask, table[tasks[..., None], picks], 0.0)
        for name, table in samples.values.items()
    }
    return Draw(values, mask, sizes)


def task_rate(draw: Draw) -> np.ndarray:
    """pass@1 (= TGC): the mean over tasks of each task's success rate."""
    return (draw.values["success"].sum(-1) / draw.sizes).mean(-1)


def pass_at(k: int, n_max: int) -> Statistic:
    """pass@k (Chen et al., 2021) by table look-up of each task's (n, c); tasks have n >= k."""
    table = np.zeros((n_max + 1, n_max + 1))
    for n in range(k, n_max + 1):
        for c in range(n + 1):
            table[n, c] = pass_at_k(n, c, k)

    def statistic(draw: Draw) -> np.ndarray:
        successes = np.rint(draw.values["success"].sum(-1)).astype(np.int64)
        return table[draw.sizes, successes].mean(-1)

    return statistic


def episode_mean(name: str) -> Statistic:
    """The mean of ``name`` over every sample of the replicate (episode-weighted)."""
    return lambda draw: draw.values[name].sum((-2, -1)) / draw.mask.sum((-2, -1))


def per_token(weight: str | None = None) -> Statistic:
    """Sum of ``nll`` over sum of ``tokens`` (the sampled-token entropy), over the samples whose
    ``weight`` is 1 (all when None); NaN for a replicate without such tokens."""

    def statistic(draw: Draw) -> np.ndarray:
        w = draw.values[weight] if weight else 1.0
        tokens = (draw.values["tokens"] * w).sum((-2, -1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return (draw.values["nll"] * w).sum((-2, -1)) / tokens

    return statistic


def _chunks(cells_per_replicate: int, resamples: int) -> list[int]:
    """Replicates per chunk, so that one chunk holds at most ``_CHUNK_CELLS`` cells."""
    size = max(1, _CHUNK_CELLS // max(1, cells_per_replicate))
    return [min(size, resamples - start) for start in range(0, resamples, size)]


def _cells(samples: Samples) -> int:
    return next(iter(samples.values.values())).size


def _quantiles(replicates: np.ndarray, confidence: float) -> list[float] | None:
    finite = replicates[np.isfinite(replicates)]
    if not finite.size:
        return None
    alpha = 1.0 - confidence
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return [float(low), float(high)]


def interval(samples: Samples, statistic: Statistic, boot: Bootstrap) -> list[float] | None:
    """The two-level percentile bootstrap interval ``[lo, hi]`` of ``statistic``."""
    rng = np.random.default_rng(boot.seed)
    replicates = []
    for size in _chunks(_cells(samples), boot.resamples):
        tasks = rng.integers(0, len(samples.sizes), size=(size, len(samples.sizes)))
        replicates.append(statistic(_resample(samples, tasks, rng)))
    return _quantiles(np.concatenate(replicates), boot.confidence)


def excludes_zero(bounds: list[float] | None) -> bool:
    """Whether an interval ``[lo, hi]`` of a difference lies wholly on one side of 0."""
    return bounds is not None and (bounds[0] > 0 or bounds[1] < 0)


def paired_difference(
    a: Samples, b: Samples, statistic: Statistic, boot: Bootstrap
) -> tuple[float, list[float] | None]:
    """``statistic(b) - statistic(a)`` over the same tasks in the same order, and its paired
    bootstrap interval: each replicate draws the same tasks on both sides."""
    if a.task_ids != b.task_ids:
        raise ValueError("a paired difference needs the same tasks in the same order on both sides")
    point = float(statistic(_identity(b))[0] - statistic(_identity(a))[0])
    rng = np.random.default_rng(boot.seed)
    replicates = []
    for size in _chunks(max(_cells(a), _cells(b)), boot.resamples):
        tasks = rng.integers(0, len(a.sizes), size=(size, len(a.sizes)))
        replicates.append(statistic(_resample(b, tasks, rng)) - statistic(_resample(a, tasks, rng)))
    return point, _quantiles(np.concatenate(replicates), boot.confidence)


def scenario_interval(
    successes: np.ndarray, sizes: np.ndarray, scenarios: Sequence[str], boot: Bootstrap
) -> list[float] | None:
    """SGC's interval: replicates draw scenarios with replacement, then each of their tasks'
    samples (a binomial draw of its successes: resampling binary outcomes with replacement);
    SGC is the mean over scenarios of the product of their tasks' success rates."""
    groups: dict[str, list[int]] = {}
    for row, scenario in enumerate(scenarios):
        groups.setdefault(scenario, []).append(row)
    width = max(len(rows) for rows in groups.values())
    members = np.full((len(groups), width), -1, dtype=np.int64)
    for g, rows in enumerate(groups.values()):
        members[g, : len(rows)] = rows
    rng = np.random.default_rng(boot.seed)
    replicates = []
    for size in _chunks(members.size, boot.resamples):
        tasks = members[rng.integers(0, len(groups), size=(size, len(groups)))]
        real = tasks >= 0
        rows = np.where(real, tasks, 0)
        n = sizes[rows]
        rates = rng.binomial(n, successes[rows] / n) / n
        replicates.append(np.where(real, rates, 1.0).prod(-1).mean(-1))
    return _quantiles(np.concatenate(replicates), boot.confidence)


def record_samples(records: Sequence[dict]) -> Samples | None:
    """:class:`Samples` of the error-free episodes of task records (``success``, ``reward``,
    ``tokens``, ``nll``, ``stopped``); tasks without one are left out; None if none remain."""
    ids, tasks = [], []
    for rec in records:
        eps = valid_episodes(rec)
        if eps:
            ids.append(rec["task_id"])
            tasks.append(
                {
                    "success": [float(ep["success"]) for ep in eps],
                    "reward": [float(ep["reward"]) for ep in eps],
                    "tokens": [float(ep["sampled_tokens"]) for ep in eps],
                    "nll": [ep["nll_sum"] or 0.0 for ep in eps],
                    "stopped": [float(ep["stopped"]) for ep in eps],
                }
            )
    return Samples.of(ids, tasks) if tasks else None


def score_intervals(
    records: Sequence[dict], k: int, boot: Bootstrap, vocab_size: int | None = None
) -> dict[str, Any]:
    """The bootstrap interval of every score :func:`summarize_tasks` reports, and the tasks and
    samples each rests on: ``{"bootstrap": settings, "intervals": {metric: [lo, hi] | None},
    "counts": {metric: {"tasks": T, "samples": S, ...}}}``. A score that cannot be computed
    (no task with n >= k, no log-probs) has interval None and its counts."""
    out: dict[str, Any] = {
        "bootstrap": {"method": "two-level percentile (tasks, then samples)", **asdict(boot)},
        "intervals": {},
        "counts": {},
    }
    samples = record_samples(records)
    if samples is None:
        return out
    intervals, counts = out["intervals"], out["counts"]
    scored = {"tasks": len(samples.sizes), "samples": int(samples.sizes.sum())}
    for key, statistic in (
        ("pass@1", task_rate),
        ("reward/mean", episode_mean("reward")),
        ("success/rate", episode_mean("success")),
        ("response/tokens_mean", episode_mean("tokens")),
        ("response/stopped_frac", episode_mean("stopped")),
    ):
        intervals[key], counts[key] = interval(samples, statistic, boot), dict(scored)
    eligible = [t for t, n in zip(samples.task_ids, samples.sizes, strict=True) if n >= k]
    counts[f"pass@{k}"] = {
        "tasks": len(eligible),
        "samples": int(sum(n for n in samples.sizes if n >= k)),
    }
    intervals[f"pass@{k}"] = (
        interval(samples.rows(eligible), pass_at(k, int(samples.sizes.max())), boot)
        if eligible
        else None
    )
    scored_records = [rec for rec in records if rec["task_id"] in set(samples.task_ids)]
    scenarios = scenario_of(scored_records)
    if scenarios:
        intervals["tgc"], counts["tgc"] = intervals["pass@1"], dict(scored)
        successes = samples.values["success"].sum(-1)
        intervals["sgc"] = scenario_interval(
            successes, samples.sizes, [scenarios[t] for t in samples.task_ids], boot
        )
        counts["sgc"] = {**scored, "scenarios": len(set(scenarios.values()))}
    for key, weight in (("entropy/sampled", None), ("entropy/sampled_stopped", "stopped")):
        per_task = [
            [
                ep
                for ep in valid_episodes(rec)
                if ep["sampled_tokens"] and (ep["stopped"] or not weight)
            ]
            for rec in scored_records
        ]
        episodes = [ep for eps in per_task for ep in eps]
        counts[key] = {
            "tasks": sum(bool(eps) for eps in per_task),
            "samples": len(episodes),
            "tokens": sum(ep["sampled_tokens"] for ep in episodes),
        }
        defined = sampled_entropy(episodes) is not None
        intervals[key] = interval(samples, per_token(weight), boot) if defined else None
    if vocab_size and intervals["entropy/sampled"] is not None:
        scale = float(np.log(vocab_size))
        intervals["entropy/normalised"] = [v / scale for v in intervals["entropy/sampled"]]
        counts["entropy/normalised"] = dict(counts["entropy/sampled"])
    return out
