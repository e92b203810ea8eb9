"""The evaluation's metrics, from per-task records of K episodes each; the one summariser
behind ``eprl eval``, the training loop's evaluations and the demo.

Errored episodes (an environment failure: ``record["error"]`` set) are left out of every score,
never counted as failures: n_t is the number of task t's episodes that ran without error, and a
task none of whose episodes did is left out (``tasks/errored``). The scores, for the N tasks with
n_t >= 1 samples of which c_t succeed (``info["success"]``: every hidden test passed):

- ``pass@k``: the unbiased estimator of Chen et al. (2021), ``1 - C(n - c, k) / C(n, k)`` per
  task, averaged over the tasks with n_t >= k only (a task with fewer samples has no pass@k;
  ``tasks/pass@k`` says how many count). ``pass@1`` is the mean of ``c_t / n_t``.
- ``reward/mean``, ``success/rate``: over all (error-free) episodes.
- ``tgc``, ``sgc`` (whenever the environment reports ``info["scenario_id"]``, as AppWorld does:
  the task id's prefix before the underscore): AppWorld's task goal completion (the share of
  tasks completed) and scenario goal completion (the share of scenarios whose every task is
  completed; Trivedi et al., 2024). With K samples per task both are the expectation of the
  one-sample-per-task numbers: ``tgc = mean_t c_t / n_t`` (equal to pass@1) and
  ``sgc = mean_s prod_{t in s} c_t / n_t``. Fractions; multiply by 100 for the papers' %.
- ``diversity/distinct_solutions``: for each task with at least one success, the number of
  distinct successful solutions, averaged over those tasks. A solution is the code of every
  turn's first Python block, normalised by an ``ast`` round trip (comments, blank lines, quotes
  and spacing do not count; code that does not parse is compared with whitespace collapsed).
  ``diversity/distinct_frac``: distinct / successful samples, averaged over the same tasks.
- ``entropy/sampled``: the mean of ``-log pi_sampler(token)`` over all sampled tokens, in nats:
  a Monte Carlo estimate of the per-token entropy of the distribution the samples were drawn
  from (after temperature and top-p), from the log-probs the sampler reported.
  ``entropy/normalised`` divides it by ``ln |V|`` (0: deterministic, 1: uniform over the
  vocabulary). Absent (null) when the backend reports no log-probs. ``entropy/sampled_stopped``:
  the same over the episodes whose last turn stopped before the token cap (a truncated ramble
  samples at several times the entropy of a finished answer).
- ``response/tokens_mean`` (sampled tokens per episode), ``response/stopped_frac`` (last turns
  that ended before the token cap); counts: ``tasks``, ``episodes`` (all that ran),
  ``episodes/errors`` (environment failures), ``tasks/errored``, ``tasks/pass@k``.

:mod:`trainer.evaluation.intervals` puts a bootstrap interval and the counts it rests on on every
score.
"""

from __future__ import annotations

import ast
import hashlib
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from math import comb
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task with n samples, c of them successful."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def goal_completion(
    task_rates: dict[str, float], scenario_of: dict[str, str]
) -> tuple[float, float, int]:
    """AppWorld's TGC and SGC from per-task success rates ``c_t / n_t`` (see the module
    docstring): ``(tgc, sgc, number of scenarios)``."""
    if not task_rates:
        raise ValueError("no tasks to compute goal completion over")
    by_scenario: dict[str, list[float]] = defaultdict(list)
    for task, rate in task_rates.items():
        by_scenario[scenario_of[task]].append(rate)
    tgc = sum(task_rates.values()) / len(task_rates)
    sgc = sum(math.prod(rates) for rates in by_scenario.values()) / len(by_scenario)
    return tgc, sgc, len(by_scenario)


def normalise_code(code: str) -> str:
    """Code text with formatting and comments removed: ``ast.unparse(ast.parse(code))``; code
    that does not parse is returned with runs of whitespace collapsed."""
    try:
        return ast.unparse(ast.parse(code))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return re.sub(r"\s+", " ", code).strip()


def episode_record(episode, tokenizer) -> dict[str, Any]:
    """What the sidecar keeps of one episode: outcome, token counts, the sampled tokens' summed
    negative log-prob, and a hash of the normalised solution (for the diversity metric)."""
    from envs.text import extract_code_block

    sampled = [lp for lp, m in zip(episode.sampler_logprobs, episode.loss_mask, strict=True) if m]
    finite = (
        bool(sampled)
        and all(math.isfinite(lp) for lp in sampled)
        and any(lp != 0.0 for lp in sampled)
    )
    codes = []
    for start, end in episode.turns:
        code = extract_code_block(
            tokenizer.decode(episode.token_ids[start:end], skip_special_tokens=True)
        )
        if code is not None:
            codes.append(normalise_code(code))
    solution = "\n# ---- next turn ----\n".join(codes)
    return {
        "reward": float(episode.reward),
        "success": bool(episode.success),
        "sampled_tokens": len(sampled),
        "nll_sum": -float(sum(sampled)) if finite else None,
        "turns": episode.num_turns,
        "stopped": bool(episode.finish_reasons) and episode.finish_reasons[-1] != "length",
        "truncation_reason": episode.truncation_reason,
        "error": episode.error,
        "scenario_id": episode.info.get("scenario_id"),
        # which data the episode ran on, where the env says (AppWorld: appworld-release or
        # appworld-generated), so every report can name it
        "data": episode.info.get("data"),
        "solution_sha1": hashlib.sha1(solution.encode()).hexdigest() if codes else None,
    }


def task_record(task_id: str, index: int, episodes: Sequence, tokenizer) -> dict[str, Any]:
    return {
        "kind": "task",
        "task_id": task_id,
        "index": index,
        "episodes": [episode_record(ep, tokenizer) for ep in episodes],
        "pid": os.getpid(),
        "finished_at": time.time(),
    }


def valid_episodes(record: dict) -> list[dict]:
    """The episodes of a task record that ran without an environment error: the ones scored."""
    return [ep for ep in record["episodes"] if ep["error"] is None]


def summarize_tasks(
    records: Sequence[dict], k: int, vocab_size: int | None = None
) -> dict[str, float | None]:
    """Every metric of the module docstring from per-task records (:func:`task_record`)."""
    if not records:
        raise ValueError("no task results to summarize")
    scored = [(rec, valid_episodes(rec)) for rec in records]
    scored = [(rec, eps) for rec, eps in scored if eps]
    episodes = [ep for _, eps in scored for ep in eps]
    rates: dict[str, float] = {}
    p1, pk, distinct, distinct_frac = [], [], [], []
    for rec, eps in scored:
        successes = [ep for ep in eps if ep["success"]]
        n, c = len(eps), len(successes)
        rates[rec["task_id"]] = c / n
        p1.append(pass_at_k(n, c, 1))
        if n >= k:
            pk.append(pass_at_k(n, c, k))
        if successes:
            unique = {ep["solution_sha1"] for ep in successes}
            distinct.append(len(unique))
            distinct_frac.append(len(unique) / c)
    metrics: dict[str, float | None] = {
        "pass@1": _mean_or_none(p1),
        f"pass@{k}": _mean_or_none(pk),
        "reward/mean": _mean_or_none([ep["reward"] for ep in episodes]),
        "success/rate": _mean_or_none([float(ep["success"]) for ep in episodes]),
    }
    scenarios = scenario_of([rec for rec, _ in scored])
    if scenarios:
        tgc, sgc, count = goal_completion(rates, scenarios)
        metrics.update({"tgc": tgc, "sgc": sgc, "scenarios": float(count)})
    metrics["diversity/distinct_solutions"] = _mean_or_none(distinct)
    metrics["diversity/distinct_frac"] = _mean_or_none(distinct_frac)
    entropy = sampled_entropy(episodes)
    metrics["entropy/sampled"] = entropy
    metrics["entropy/normalised"] = (
        entropy / math.log(vocab_size) if entropy is not None and vocab_size else None
    )
    metrics["entropy/sampled_stopped"] = sampled_entropy([ep for ep in episodes if ep["stopped"]])
    metrics.update(
        {
            "response/tokens_mean": _mean_or_none([ep["sampled_tokens"] for ep in episodes]),
            "response/stopped_frac": _mean_or_none([float(ep["stopped"]) for ep in episodes]),
            "episodes/errors": float(sum(len(rec["episodes"]) for rec in records) - len(episodes)),
            "tasks/errored": float(len(records) - len(scored)),
            f"tasks/pass@{k}": float(len(pk)),
            "tasks": float(len(records)),
            "episodes": float(sum(len(rec["episodes"]) for rec in records)),
        }
    )
    return metrics


def sampled_entropy(episodes: Sequence[dict]) -> float | None:
    """Sum of the sampled tokens' ``-log pi`` over their number, across ``episodes`` (records);
    None when there are no sampled tokens or an episode with tokens reported no log-probs."""
    with_tokens = [ep for ep in episodes if ep["sampled_tokens"]]
    if not with_tokens or any(ep["nll_sum"] is None for ep in with_tokens):
        return None
    return sum(ep["nll_sum"] for ep in with_tokens) / sum(
        ep["sampled_tokens"] for ep in with_tokens
    )


def scenario_of(records: Sequence[dict]) -> dict[str, str] | None:
    """Each task's scenario when the environment reports any (AppWorld), else None. A task whose
    episodes all failed before reporting one gets AppWorld's rule: the id's prefix before ``_``."""
    scenarios = {rec["task_id"]: _scenario(rec) for rec in records}
    if not any(scenarios.values()):
        return None
    return {t: s or t.rsplit("_", 1)[0] for t, s in scenarios.items()}


def _scenario(record: dict) -> str | None:
    return next((ep["scenario_id"] for ep in record["episodes"] if ep.get("scenario_id")), None)


def data_sources(records: Sequence[dict]) -> list[str]:
    """The data the records' episodes ran on, as their envs reported it (sorted; empty when no
    env said, e.g. CodeExec, whose tasks ship with eprl)."""
    return sorted({ep["data"] for rec in records for ep in rec["episodes"] if ep.get("data")})


def per_task_rows(records: Sequence[dict], k: int) -> list[dict[str, Any]]:
    """One row per task: its error-free samples ``n``, ``successes``, ``errors``, pass@1 and
    pass@k (None when n < 1, n < k), the rewards (for ``--compare``'s paired bootstrap)."""
    rows = []
    for rec in records:
        eps = valid_episodes(rec)
        n, c = len(eps), sum(ep["success"] for ep in eps)
        rows.append(
            {
                "task_id": rec["task_id"],
                "n": n,
                "successes": c,
                "errors": len(rec["episodes"]) - n,
                "pass@1": pass_at_k(n, c, 1) if n else None,
                f"pass@{k}": pass_at_k(n, c, k) if n >= k else None,
                "reward_mean": _mean_or_none([ep["reward"] for ep in eps]),
                "rewards": [ep["reward"] for ep in eps],
                "distinct_solutions": len({ep["solution_sha1"] for ep in eps if ep["success"]}),
                "scenario_id": _scenario(rec),
            }
        )
    return rows


def _mean_or_none(values: Sequence[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def records_of_episodes(episodes: Sequence, tokenizer) -> list[dict[str, Any]]:
    """Task records (:func:`task_record`) of in-memory episodes grouped by task, in order of
    first appearance."""
    by_task: dict[str, list] = defaultdict(list)
    for ep in episodes:
        by_task[ep.task_id].append(ep)
    if not by_task:
        raise ValueError("no episodes to summarize")
    return [
        task_record(task, index, eps, tokenizer)
        for index, (task, eps) in enumerate(by_task.items())
    ]


def summarize_episodes(
    episodes: Sequence, k: int, tokenizer, vocab_size: int | None = None
) -> dict[str, float | None]:
    """:func:`summarize_tasks` of episodes grouped by task (in order of first appearance)."""
    return summarize_tasks(records_of_episodes(episodes, tokenizer), k, vocab_size)
