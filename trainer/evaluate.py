"""Evaluation: K samples per task -> pass@1, pass@k (unbiased), reward and success.

pass@k uses the unbiased estimator of Chen et al. (2021): with n samples of which c succeed,
``pass@k = 1 - C(n - c, k) / C(n, k)``, averaged over tasks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from math import comb

from agent.chat import ChatFormat
from agent.rollout import Episode, RolloutRunner


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task with n samples, c of them successful."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(episodes: Sequence[Episode], k: int) -> dict[str, float]:
    """Per-split summary of episodes grouped by task."""
    by_task: dict[str, list[Episode]] = defaultdict(list)
    for ep in episodes:
        by_task[ep.task_id].append(ep)
    if not by_task:
        raise ValueError("no episodes to summarize")
    p1 = [pass_at_k(len(eps), sum(e.success for e in eps), 1) for eps in by_task.values()]
    pk = [pass_at_k(len(eps), sum(e.success for e in eps), min(k, len(eps))) for eps in by_task.values()]
    return {
        "pass@1": sum(p1) / len(p1),
        f"pass@{k}": sum(pk) / len(pk),
        "reward/mean": sum(e.reward for e in episodes) / len(episodes),
        "success/rate": sum(e.success for e in episodes) / len(episodes),
        "tasks": float(len(by_task)),
        "episodes": float(len(episodes)),
    }


def evaluate_policy(
    policy,
    make_env: Callable[[], object],
    chat: ChatFormat,
    task_ids: Sequence[str],
    k: int,
    *,
    max_turns: int,
    max_new_tokens: int,
    max_context_tokens: int,
    stop: Sequence[str],
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, float], list[Episode]]:
    runner = RolloutRunner(
        policy, make_env, chat, group_size=k, max_turns=max_turns, max_new_tokens=max_new_tokens,
        max_context_tokens=max_context_tokens, stop=stop, progress=progress,
    )
    episodes = runner.run(task_ids, seed=seed)
    return summarize(episodes, k), episodes
