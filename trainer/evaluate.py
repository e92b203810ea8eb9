"""Evaluation (`eprl eval`): K samples per task -> pass@1, pass@k, reward, success, TGC/SGC,
diversity; resumable, with a JSON and a Markdown result.

Metrics, for N tasks with n_t samples of which c_t succeed (``info["success"]``: every hidden
test passed):

- ``pass@k``: the unbiased estimator of Chen et al. (2021), ``1 - C(n - c, k) / C(n, k)`` per
  task, averaged over tasks. ``pass@1`` is the mean of ``c_t / n_t``.
- ``reward/mean``, ``success/rate``: over all episodes.
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
  vocabulary). Absent (null) when the backend reports no log-probs.
- ``response/tokens_mean`` (sampled tokens per episode), ``response/stopped_frac`` (last turns
  that ended before the token cap), ``episodes/errors`` (environment failures).

Resumable: per-task results are appended (and fsync'd) to ``OUT.tasks.jsonl`` as soon as a
batch of tasks finishes; a rerun with the same settings reads it, skips the tasks it holds and
runs only the rest, so a task is never run to completion twice. A half-written last line (a
kill mid-write) is dropped. The final JSON and Markdown are written atomically at the end.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from math import comb
from pathlib import Path
from typing import Any

from agent.chat import ChatFormat
from agent.rollout import Episode, RolloutRunner

SCHEMA = 1
STOP = ("\n```\n",)
# the settings a resumed evaluation must share with the run that wrote the sidecar
_RESUME_KEYS = (
    "model",
    "env",
    "split",
    "k",
    "backend",
    "env_kwargs",
    "max_turns",
    "max_new_tokens",
    "max_context_tokens",
    "temperature",
    "top_p",
    "seed",
)


# ---------------------------------------------------------------------------------- estimators


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
    pk = [
        pass_at_k(len(eps), sum(e.success for e in eps), min(k, len(eps)))
        for eps in by_task.values()
    ]
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
        policy,
        make_env,
        chat,
        group_size=k,
        max_turns=max_turns,
        max_new_tokens=max_new_tokens,
        max_context_tokens=max_context_tokens,
        stop=stop,
        progress=progress,
    )
    episodes = runner.run(task_ids, seed=seed)
    return summarize(episodes, k), episodes


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


# ---------------------------------------------------------------------------------- records


def episode_record(episode: Episode, tokenizer) -> dict[str, Any]:
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
        "solution_sha1": hashlib.sha1(solution.encode()).hexdigest() if codes else None,
    }


def task_record(task_id: str, index: int, episodes: Sequence[Episode], tokenizer) -> dict[str, Any]:
    return {
        "kind": "task",
        "task_id": task_id,
        "index": index,
        "episodes": [episode_record(ep, tokenizer) for ep in episodes],
        "pid": os.getpid(),
        "finished_at": time.time(),
    }


def summarize_tasks(
    records: Sequence[dict], k: int, vocab_size: int | None = None
) -> dict[str, float | None]:
    """Every metric of the module docstring from per-task records (:func:`task_record`)."""
    if not records:
        raise ValueError("no task results to summarize")
    episodes = [ep for rec in records for ep in rec["episodes"]]
    rates: dict[str, float] = {}
    p1, pk, distinct, distinct_frac = [], [], [], []
    for rec in records:
        eps = rec["episodes"]
        successes = [ep for ep in eps if ep["success"]]
        n, c = len(eps), len(successes)
        rates[rec["task_id"]] = c / n
        p1.append(pass_at_k(n, c, 1))
        pk.append(pass_at_k(n, c, min(k, n)))
        if successes:
            unique = {ep["solution_sha1"] for ep in successes}
            distinct.append(len(unique))
            distinct_frac.append(len(unique) / c)
    metrics: dict[str, float | None] = {
        "pass@1": _mean(p1),
        f"pass@{k}": _mean(pk),
        "reward/mean": _mean(ep["reward"] for ep in episodes),
        "success/rate": _mean(float(ep["success"]) for ep in episodes),
    }
    scenarios = {rec["task_id"]: _scenario(rec) for rec in records}
    if any(scenarios.values()):
        # a task whose episodes all failed before reporting one: AppWorld's rule, the id's prefix
        scenarios = {t: s or t.rsplit("_", 1)[0] for t, s in scenarios.items()}
        tgc, sgc, count = goal_completion(rates, scenarios)
        metrics.update({"tgc": tgc, "sgc": sgc, "scenarios": float(count)})
    metrics["diversity/distinct_solutions"] = _mean(distinct) if distinct else None
    metrics["diversity/distinct_frac"] = _mean(distinct_frac) if distinct_frac else None
    with_logprobs = [ep for ep in episodes if ep["nll_sum"] is not None]
    tokens = sum(ep["sampled_tokens"] for ep in with_logprobs)
    if tokens and len(with_logprobs) == len([ep for ep in episodes if ep["sampled_tokens"]]):
        entropy = sum(ep["nll_sum"] for ep in with_logprobs) / tokens
        metrics["entropy/sampled"] = entropy
        metrics["entropy/normalised"] = entropy / math.log(vocab_size) if vocab_size else None
    else:
        metrics["entropy/sampled"] = metrics["entropy/normalised"] = None
    metrics.update(
        {
            "response/tokens_mean": _mean(ep["sampled_tokens"] for ep in episodes),
            "response/stopped_frac": _mean(float(ep["stopped"]) for ep in episodes),
            "episodes/errors": float(sum(ep["error"] is not None for ep in episodes)),
            "tasks": float(len(records)),
            "episodes": float(len(episodes)),
        }
    )
    return metrics


def _scenario(record: dict) -> str | None:
    return next((ep["scenario_id"] for ep in record["episodes"] if ep.get("scenario_id")), None)


def per_task_rows(records: Sequence[dict], k: int) -> list[dict[str, Any]]:
    rows = []
    for rec in records:
        eps = rec["episodes"]
        n, c = len(eps), sum(ep["success"] for ep in eps)
        rows.append(
            {
                "task_id": rec["task_id"],
                "n": n,
                "successes": c,
                "pass@1": pass_at_k(n, c, 1),
                f"pass@{k}": pass_at_k(n, c, min(k, n)),
                "reward_mean": _mean(ep["reward"] for ep in eps),
                "distinct_solutions": len({ep["solution_sha1"] for ep in eps if ep["success"]}),
                "scenario_id": _scenario(rec),
            }
        )
    return rows


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


# ---------------------------------------------------------------------------------- sidecar


class TaskLog:
    """The resumable sidecar ``OUT.tasks.jsonl``: a header line with the settings, then one line
    per finished task, each flushed and fsync'd before the next batch starts."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path = path
        self.settings = settings
        self.records: dict[str, dict] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"kind": "header", "schema": SCHEMA, "settings": settings})

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1]:  # a line cut by a kill mid-write: drop it, keep what is complete
            good = len(data) - len(lines[-1])
            with self.path.open("r+b") as handle:
                handle.truncate(good)
                handle.flush()
                os.fsync(handle.fileno())
        rows = []
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{self.path}: line {number} is not valid JSON ({exc}); "
                    "delete the file to start the evaluation over"
                ) from None
        if not rows:  # killed while the header itself was being written
            self._append({"kind": "header", "schema": SCHEMA, "settings": self.settings})
            return
        if rows[0].get("kind") != "header":
            raise ValueError(f"{self.path} has no header line: not an eprl evaluation sidecar")
        saved = rows[0]["settings"]
        differ = [key for key in _RESUME_KEYS if saved.get(key) != self.settings.get(key)]
        if differ:
            detail = ", ".join(
                f"{key}: {saved.get(key)!r} there, {self.settings.get(key)!r} now" for key in differ
            )
            raise ValueError(
                f"{self.path} holds results of a different evaluation ({detail}); "
                "pass another --out or delete that file"
            )
        for row in rows[1:]:
            if row.get("kind") == "task":
                self.records[row["task_id"]] = row

    def _append(self, row: dict) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def add(self, record: dict) -> None:
        if record["task_id"] in self.records:
            raise RuntimeError(f"task {record['task_id']!r} is already in {self.path}")
        self._append(record)
        self.records[record["task_id"]] = record


# ---------------------------------------------------------------------------------- running


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
    stop: Sequence[str] = STOP,
    seed: int = 0,
    max_episodes: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``task_ids`` x K samples, resumably; write ``out`` (JSON) and its ``.md``.

    At most ``max_episodes`` episodes run at once (one generation batch; an environment with a
    bounded pool, like AppWorld's servers, needs it no larger than the pool). Whole tasks are
    batched when K fits, and each task's record is appended to the sidecar as soon as its K
    episodes are done. Tasks already in ``OUT.tasks.jsonl`` (same ``settings``) are not run
    again. Episode j of task i always gets the seeds ``seed + i * K + j`` (sampling RNG and env),
    so a resumed evaluation samples what an uninterrupted one would have.
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
        progress=False,
    )
    started = time.time()
    with _EvalProgress(progress, len(task_ids), resumed) as bar:
        bar.update(list(log.records.values()))
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
            bar.update(list(log.records.values()))
    records = [log.records[task] for task in task_ids]
    result = {
        "schema": SCHEMA,
        **{key: settings.get(key) for key in ("model", "env", "split", "backend", "env_kwargs")},
        "k": k,
        "settings": settings,
        "metrics": summarize_tasks(records, k, settings.get("vocab_size")),
        "tasks_resumed": resumed,
        "wall_s_this_run": time.time() - started,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "per_task": per_task_rows(records, k),
    }
    write_results(result, out)
    return result


def sidecar_path(out: Path) -> Path:
    return (
        out.with_name(out.name + ".tasks.jsonl")
        if out.suffix != ".json"
        else out.with_suffix(".tasks.jsonl")
    )


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_results(result: dict[str, Any], out: Path) -> None:
    """``out`` (JSON) and ``out`` with suffix ``.md`` (the Markdown table), each atomically."""
    _atomic_write(out, json.dumps(result, indent=2) + "\n")
    _atomic_write(out.with_suffix(".md"), markdown_report(result))


class _EvalProgress:
    """A rich progress bar over tasks with the running pass@1."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done
        self.progress = None

    def __enter__(self) -> _EvalProgress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("eval"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("tasks"),
                TextColumn("pass@1 {task.fields[pass1]:.3f}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "eval", total=self.total, completed=self.done, pass1=0.0
            )
        return self

    def update(self, records: list[dict]) -> None:
        if self.progress is None or not records:
            return
        rates = [sum(ep["success"] for ep in r["episodes"]) / len(r["episodes"]) for r in records]
        self.progress.update(self.task, completed=min(len(records), self.total), pass1=_mean(rates))

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


# ---------------------------------------------------------------------------------- tables

_LABELS = {
    "reward/mean": "mean reward",
    "success/rate": "success rate",
    "tgc": "TGC (task goal completion)",
    "sgc": "SGC (scenario goal completion)",
    "diversity/distinct_solutions": "distinct successful solutions / task",
    "diversity/distinct_frac": "distinct / successful samples",
    "entropy/sampled": "sampled-token entropy (nats)",
    "entropy/normalised": "sampled-token entropy / ln V",
    "response/tokens_mean": "sampled tokens / episode",
    "response/stopped_frac": "responses stopped before the cap",
    "episodes/errors": "environment errors",
    "tasks": "tasks",
    "episodes": "episodes",
    "scenarios": "scenarios",
}
_ORDER = [
    "pass@1",
    "<pass@k>",
    "reward/mean",
    "success/rate",
    "tgc",
    "sgc",
    "scenarios",
    "diversity/distinct_solutions",
    "diversity/distinct_frac",
    "entropy/sampled",
    "entropy/normalised",
    "response/tokens_mean",
    "response/stopped_frac",
    "episodes/errors",
    "tasks",
    "episodes",
]


def _metric_keys(results: Sequence[dict]) -> list[str]:
    present = [key for r in results for key in r["metrics"]]
    pass_k = sorted(
        {key for key in present if key.startswith("pass@") and key != "pass@1"},
        key=lambda key: int(key.split("@")[1]),
    )
    keys: list[str] = []
    for key in _ORDER:
        if key == "<pass@k>":
            keys.extend(pass_k)
        elif key in present:
            keys.append(key)
    return keys


_COUNTS = {"tasks", "episodes", "scenarios", "episodes/errors"}


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if key in _COUNTS:
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def _header_rows(result: dict) -> list[tuple[str, str]]:
    s = result.get("settings", {})
    return [
        ("model", str(result.get("model"))),
        (
            "environment",
            str(result.get("env"))
            + (f" {json.dumps(result['env_kwargs'])}" if result.get("env_kwargs") else ""),
        ),
        ("split", str(result.get("split"))),
        ("samples per task (K)", str(result.get("k"))),
        ("backend", str(result.get("backend"))),
        ("temperature / top-p", f"{s.get('temperature')} / {s.get('top_p')}"),
        ("turns x new tokens", f"{s.get('max_turns')} x {s.get('max_new_tokens')}"),
    ]


def markdown_report(result: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation: {result.get('model')} on {result.get('env')} / {result.get('split')}",
        "",
        f"Finished {result.get('finished_at')}; unbiased pass@k (Chen et al., 2021); "
        "definitions in `trainer/evaluate.py`.",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in _header_rows(result)]
    lines += ["", "| metric | value |", "|---|---:|"]
    lines += [
        f"| {_LABELS.get(key, key)} | {_fmt(result['metrics'][key], key)} |"
        for key in _metric_keys([result])
    ]
    return "\n".join(lines) + "\n"


def compare_markdown(results: Sequence[dict], labels: Sequence[str]) -> str:
    """A side-by-side Markdown table of several results (rows: settings and metrics)."""
    lines = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    headers = [dict(_header_rows(r)) for r in results]
    for name in headers[0]:
        lines.append(f"| {name} | " + " | ".join(h[name] for h in headers) + " |")
    for key in _metric_keys(results):
        cells = [_fmt(r["metrics"].get(key), key) for r in results]
        lines.append(f"| {_LABELS.get(key, key)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"result file {str(p)!r} does not exist")
    try:
        result = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"result file {str(p)!r} is not valid JSON: {exc}") from None
    if not isinstance(result, dict) or "metrics" not in result:
        raise ValueError(f"result file {str(p)!r} is not an `eprl eval` result (no 'metrics')")
    return result


def compare_labels(paths: Sequence[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def print_compare(paths: Sequence[str]) -> str:
    from rich.console import Console
    from rich.table import Table

    results = [load_result(p) for p in paths]
    labels = compare_labels(paths)
    table = Table(title="eprl eval: comparison")
    table.add_column("")
    for label in labels:
        table.add_column(label, justify="right")
    headers = [dict(_header_rows(r)) for r in results]
    for name in headers[0]:
        table.add_row(name, *(h[name] for h in headers))
    for key in _metric_keys(results):
        table.add_row(_LABELS.get(key, key), *(_fmt(r["metrics"].get(key), key) for r in results))
    Console().print(table)
    return compare_markdown(results, labels)


def print_result(result: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{result['env']} / {result['split']}: {int(result['metrics']['tasks'])} tasks x {result['k']}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in _header_rows(result):
        table.add_row(name, value)
    for key in _metric_keys([result]):
        table.add_row(_LABELS.get(key, key), _fmt(result["metrics"][key], key))
    console = Console()
    console.print(table)
    console.print(
        f"results: {out}  (table: {out.with_suffix('.md')}; per task: {sidecar_path(out)})"
    )


# ---------------------------------------------------------------------------------- CLI

BACKENDS = ("hf", "vllm", "openai")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def default_out(model: str, env: str, split: str, k: int, env_kwargs: dict | None) -> Path:
    """``evals/<model>__<env>__<split>__k<K>[__kw<hash>].json``; a checkpoint folder
    ``runs/R/checkpoints/step_N`` is named ``R-step_N``."""
    if model.startswith(("http://", "https://")):
        name = model.split("://", 1)[1].split("#", 1)[0]
    else:
        path = Path(model)
        name = path.name
        if re.fullmatch(r"step_\d+", name) and path.parent.name == "checkpoints":
            name = f"{path.parent.parent.name}-{name}"
    parts = [_slug(name), _slug(env.split("/")[-1]), _slug(split), f"k{k}"]
    if env_kwargs:
        parts.append(
            "kw" + hashlib.sha1(json.dumps(env_kwargs, sort_keys=True).encode()).hexdigest()[:8]
        )
    return Path("evals") / ("__".join(parts) + ".json")


def eval_limits(env_id: str, env_kwargs: dict, probe) -> tuple[int, int, int]:
    """Per-environment defaults: (turns, new tokens per turn, context tokens).

    Turns: the environment's own ``max_turns`` (for ``eprl/Remote-v0`` the served env's kwargs,
    else its default). New tokens: 96 for procedural CodeExec (the training budget), 1500 for
    AppWorld (LOOP's per-turn budget), 512 otherwise. Context: 2048 for single-turn code tasks,
    else 16384 (the caller caps it to the model's window).
    """
    inner_id, inner_kwargs = env_id, env_kwargs
    if env_id == "eprl/Remote-v0":
        inner_id, inner_kwargs = env_kwargs.get("env_id", ""), env_kwargs.get("env_kwargs") or {}
    appworld = inner_id == "eprl/AppWorld-v0"
    max_turns = getattr(probe.unwrapped, "max_turns", None) or inner_kwargs.get("max_turns")
    max_turns = int(max_turns or (40 if appworld else 1))
    if appworld:
        return max_turns, 1500, 16384
    if (
        inner_id == "eprl/CodeExec-v0"
        and inner_kwargs.get("task_set", "procedural") == "procedural"
    ):
        return max_turns, 96, 2048 if max_turns == 1 else 8192
    return max_turns, 512, 2048 if max_turns == 1 else 16384


def _parse_openai_target(url: str) -> tuple[str, str | None, str | None]:
    """``URL[#model=NAME&tokenizer=NAME_OR_FOLDER]`` -> (base URL, served model, tokenizer)."""
    from urllib.parse import parse_qs

    base, _, fragment = url.partition("#")
    options = {key: values[-1] for key, values in parse_qs(fragment).items()}
    unknown = set(options) - {"model", "tokenizer"}
    if unknown:
        raise ValueError(
            f"--model {url!r}: unknown option(s) {sorted(unknown)} after '#'; "
            "expected model=NAME and/or tokenizer=NAME_OR_FOLDER"
        )
    return base, options.get("model"), options.get("tokenizer")


def _served_model(base: str) -> str:
    import httpx

    try:
        response = httpx.get(base.rstrip("/") + "/models", timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except Exception as exc:
        raise ValueError(
            f"--model {base!r}: could not list the served models at {base.rstrip('/')}/models ({exc}); "
            "name it with '#model=NAME'"
        ) from None


def load_eval_policy(
    model: str,
    backend: str,
    *,
    temperature: float,
    top_p: float,
    seed: int,
    max_context_tokens: int,
):
    """(policy, tokenizer) for ``backend``; errors name the model and what was expected."""
    from agent.models import ModelNotFoundError

    if backend == "openai":
        if not model.startswith(("http://", "https://")):
            raise ValueError(
                f"--backend openai needs --model to be the server's http(s) URL, got {model!r}"
            )
        try:
            from agent.openai_policy import OpenAIPolicy
        except ImportError as exc:
            raise ValueError(
                f"--backend openai is not available in this installation ({exc})"
            ) from None
        from agent.models import load_tokenizer

        base, served, tokenizer_name = _parse_openai_target(model)
        served = served or _served_model(base)
        try:
            tokenizer = load_tokenizer(tokenizer_name or served)
        except Exception as exc:
            raise ValueError(
                f"--model {model!r}: no tokenizer {tokenizer_name or served!r} here ({type(exc).__name__}); "
                "name a local folder or the embedded model with '#tokenizer=NAME_OR_FOLDER'"
            ) from None
        return OpenAIPolicy(base, served, tokenizer, temperature, top_p), tokenizer
    if model.startswith(("http://", "https://")):
        raise ValueError(f"--model {model!r} is a URL: use --backend openai for a served model")
    try:
        if backend == "vllm":
            from agent.models import resolve_model
            from agent.vllm_policy import VLLMPolicy

            policy = VLLMPolicy(
                resolve_model(model),
                temperature,
                top_p,
                seed=seed,
                max_model_len=max_context_tokens,
            )
            return policy, policy.tokenizer
        from agent.backends import build_policy

        policy = build_policy("hf", model, temperature=temperature, top_p=top_p, seed=seed)
        return policy, policy.tokenizer
    except ModelNotFoundError as exc:
        raise ValueError(str(exc)) from None
    except (OSError, ImportError) as exc:
        raise ValueError(f"cannot load model {model!r} with backend {backend!r}: {exc}") from None


def stratified_tasks(task_ids: Sequence[str], per_group: int) -> list[str]:
    """The first ``per_group`` tasks of each kind, in the split's order, kinds in order of first
    appearance. A task's kind is its id up to the last ``/`` (``proc/<family>/L<level>`` for
    procedural CodeExec tasks); ids without ``/`` form one kind. A held-out subset that covers
    every family and level, where the split's own first N tasks would all be of one kind."""
    if per_group < 1:
        raise ValueError(f"per_group must be >= 1, got {per_group}")
    return [task for members in task_kinds(task_ids).values() for task in members[:per_group]]


def task_kinds(task_ids: Sequence[str]) -> dict[str, list[str]]:
    """Tasks by kind (the id up to its last ``/``), kinds and tasks in the split's order."""
    kinds: dict[str, list[str]] = {}
    for task in task_ids:
        kinds.setdefault(task.rpartition("/")[0], []).append(task)
    return kinds


def batch_episodes(backend: str, env_id: str, env_kwargs: dict) -> int:
    """Episodes run at once: 32 for hf (its generation batch), 256 for the serving backends;
    for AppWorld no more than its server pool (``server_urls``, else ``max_servers``, else the
    CPU count), since an episode holds a server from reset to end. ``$EPRL_EVAL_BATCH_EPISODES``
    overrides it."""
    raw = os.environ.get("EPRL_EVAL_BATCH_EPISODES")
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"EPRL_EVAL_BATCH_EPISODES must be a positive integer, got {raw!r}")
        return int(raw)
    episodes = 32 if backend == "hf" else 256
    if env_id == "eprl/AppWorld-v0":
        pool = (
            len(env_kwargs.get("server_urls") or [])
            or env_kwargs.get("max_servers")
            or os.cpu_count()
            or 1
        )
        episodes = min(episodes, int(pool))
    return episodes


def _model_window(policy) -> int | None:
    config = getattr(getattr(policy, "model", None), "config", None)
    return getattr(config, "max_position_embeddings", None)


def evaluate_cli(
    model: str,
    env: str,
    split: str,
    k: int,
    backend: str,
    out: str | None,
    num_tasks: int | None,
    env_kwargs: str | None,
    compare: list[str] | None,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any] | str:
    """`eprl eval`: evaluate (resumably) and write ``out`` + ``.md``; or, with ``compare``,
    print the side-by-side table of those result files and return its Markdown."""
    import gymnasium

    import envs  # noqa: F401  (registers the ids)

    if compare:
        return print_compare(compare)
    if backend not in BACKENDS:
        raise ValueError(f"unknown --backend {backend!r}; expected one of {BACKENDS}")
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    if num_tasks is not None and num_tasks < 1:
        raise ValueError(f"--num-tasks must be >= 1, got {num_tasks}")
    try:
        kwargs = json.loads(env_kwargs) if env_kwargs else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--env-kwargs {env_kwargs!r} is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--env-kwargs must be a JSON object, got {env_kwargs!r}")
    if env not in gymnasium.registry:
        known = sorted(name for name in gymnasium.registry if name.startswith("eprl/"))
        raise ValueError(
            f"unknown environment {env!r}; expected one of {known} (`eprl envs` lists them)"
        )

    def make_env():
        return gymnasium.make(env, **kwargs)

    try:
        probe = make_env()
    except TypeError as exc:
        raise ValueError(f"--env-kwargs {kwargs} do not fit {env}: {exc}") from None
    try:
        splits = list(getattr(probe.unwrapped, "splits", []))
        if splits and split not in splits:
            raise ValueError(f"unknown split {split!r} for {env}; expected one of {splits}")
        task_ids = list(probe.unwrapped.task_ids(split))
        max_turns, max_new_tokens, max_context = eval_limits(env, kwargs, probe)
    finally:
        probe.close()
    if not task_ids:
        raise ValueError(f"split {split!r} of {env} has no tasks")
    task_ids = task_ids[:num_tasks] if num_tasks else task_ids

    policy, tokenizer = load_eval_policy(
        model,
        backend,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        max_context_tokens=max_context,
    )
    window = _model_window(policy)
    if window:
        max_context = min(max_context, window)
    if max_context <= max_new_tokens:
        raise ValueError(
            f"model {model!r} has a context of {max_context} tokens, not more than "
            f"the {max_new_tokens} new tokens per turn {env} needs"
        )
    out_path = Path(out) if out else default_out(model, env, split, k, kwargs)
    settings = {
        "model": model,
        "env": env,
        "split": split,
        "backend": backend,
        "env_kwargs": kwargs,
        "temperature": temperature,
        "top_p": top_p,
        "vocab_size": len(tokenizer),
    }
    result = run_evaluation(
        policy,
        make_env,
        ChatFormat(tokenizer),
        task_ids,
        k,
        out_path,
        settings,
        max_turns=max_turns,
        max_new_tokens=max_new_tokens,
        max_context_tokens=max_context,
        seed=seed,
        max_episodes=batch_episodes(backend, env, kwargs),
        progress=progress,
    )
    print_result(result, out_path)
    return result
