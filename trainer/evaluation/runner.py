"""Running an evaluation: K samples per task through the rollout runner, resumably.

:func:`run_evaluation` (``eprl eval``, the entropy study) logs every finished task to the sidecar
and writes the JSON and Markdown results atomically at the end; :func:`evaluate_policy` (the
training loop's evaluations and the demo) returns the summary and the episodes in memory. Both
summarise with :func:`trainer.evaluation.metrics.summarize_tasks`.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.chat import ChatFormat
from agent.config import DEFAULT_STOP
from agent.progress import ProgressBar
from agent.rollout import Episode, RolloutRunner
from trainer.evaluation.intervals import Bootstrap, score_intervals
from trainer.evaluation.metrics import (
    data_sources,
    per_task_rows,
    summarize_episodes,
    summarize_tasks,
    task_record,
    valid_episodes,
)
from trainer.evaluation.report import write_results
from trainer.evaluation.sidecar import SCHEMA, TaskLog, sidecar_path


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
    temperature: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[dict[str, float | None], list[Episode]]:
    """K episodes per task at ``temperature`` (None: the policy's own), summarised."""
    runner = RolloutRunner(
        policy,
        make_env,
        chat,
        group_size=k,
        max_turns=max_turns,
        max_new_tokens=max_new_tokens,
        max_context_tokens=max_context_tokens,
        stop=stop,
        temperature=temperature,
        progress=progress,
    )
    episodes = runner.run(task_ids, seed=seed)
    return summarize_episodes(episodes, k, chat.tokenizer), episodes


def run_evaluation(
    policy,
    make_env: Callable[[], object],
    chat: ChatFormat,
    task_ids: Sequence[str],
    k: int,
    out: str | os.PathLike[str],
    settings: dict[str, Any],
    *,
    max_turns: int,
    max_new_tokens: int,
    max_context_tokens: int,
    stop: Sequence[str] = DEFAULT_STOP,
    temperature: float | None = None,
    seed: int = 0,
    max_episodes: int = 32,
    progress: bool = True,
    bootstrap: Bootstrap = Bootstrap(),
) -> dict[str, Any]:
    """Evaluate ``task_ids`` x K samples, resumably; write ``out`` (JSON) and its ``.md``.

    Samples at ``temperature`` (None: the policy's own). At most ``max_episodes`` episodes run
    at once (one generation batch; an environment with a bounded pool, like AppWorld's servers,
    needs it no larger than the pool). Whole tasks are
    batched when K fits, and each task's record is appended to the sidecar as soon as its K
    episodes are done. Tasks already in ``OUT.tasks.jsonl`` (same ``settings``) are not run
    again. Episode j of task i always gets the seeds ``seed + i * K + j`` (sampling RNG and env),
    so a resumed evaluation samples what an uninterrupted one would have; the intervals
    (:func:`~trainer.evaluation.intervals.score_intervals`, ``bootstrap``) are seeded too.
    """
    import torch

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_episodes < 1:
        raise ValueError(f"max_episodes must be >= 1, got {max_episodes}")
    if len(set(task_ids)) != len(task_ids):
        raise ValueError("task_ids holds duplicates")
    out = Path(out)
    settings = {
        **settings,
        "k": k,
        "max_turns": max_turns,
        "max_new_tokens": max_new_tokens,
        "max_context_tokens": max_context_tokens,
        "seed": seed,
    }
    log = TaskLog(sidecar_path(out), settings)
    resumed = sum(task in log.records for task in task_ids)
    todo = [(i, task) for i, task in enumerate(task_ids) if task not in log.records]
    tasks_per_batch = max(1, max_episodes // k)
    runner = RolloutRunner(
        policy,
        make_env,
        chat,
        group_size=1,
        max_turns=max_turns,
        max_new_tokens=max_new_tokens,
        max_context_tokens=max_context_tokens,
        stop=stop,
        temperature=temperature,
        progress=False,
    )
    started = time.time()
    bar = ProgressBar(
        "eval",
        len(task_ids),
        completed=resumed,
        unit="tasks",
        fields={"pass@1": ".3f"},
        enabled=progress,
    )
    with bar:
        _show(bar, log)
        for start in range(0, len(todo), tasks_per_batch):
            chunk = todo[start : start + tasks_per_batch]
            samples = [(index, task, j) for index, task in chunk for j in range(k)]
            episodes: dict[str, list[Episode]] = defaultdict(list)
            for first in range(0, len(samples), max_episodes):
                part = samples[first : first + max_episodes]
                index, _, j = part[0]
                torch.manual_seed(seed + index * k + j)
                ran = runner.run([task for _, task, _ in part], seed=seed + index * k + j)
                for (_, task, _), episode in zip(part, ran, strict=True):
                    episodes[task].append(episode)
            for index, task in chunk:
                log.add(task_record(task, index, episodes[task], chat.tokenizer))
            _show(bar, log)
    records = [log.records[task] for task in task_ids]
    result = {
        "schema": SCHEMA,
        **{key: settings.get(key) for key in ("model", "env", "split", "backend", "env_kwargs")},
        "k": k,
        "data": data_sources(records),
        "settings": settings,
        "metrics": summarize_tasks(records, k, settings.get("vocab_size")),
        **score_intervals(records, k, bootstrap, settings.get("vocab_size")),
        "tasks_resumed": resumed,
        "wall_s_this_run": time.time() - started,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "per_task": per_task_rows(records, k),
    }
    write_results(result, out)
    return result


def _show(bar: ProgressBar, log: TaskLog) -> None:
    """Tasks done and the running pass@1 (the mean of the tasks' success rates, errors left out)."""
    scored = [eps for eps in map(valid_episodes, log.records.values()) if eps]
    if scored:
        rates = [sum(ep["success"] for ep in eps) / len(eps) for eps in scored]
        bar.update(len(log.records), **{"pass@1": sum(rates) / len(rates)})
