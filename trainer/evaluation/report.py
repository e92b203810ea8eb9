"""Evaluation results as people read them: the JSON + Markdown files, the terminal table, and
the side-by-side comparison of several result files with each one's paired difference from the
first (``eprl eval --compare A.json B.json``). Every score is shown with its bootstrap interval
and the tasks and samples it rests on."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.io import atomic_write_text, read_data_file
from trainer.evaluation.compare import paired_differences, verdict
from trainer.evaluation.intervals import Bootstrap
from trainer.evaluation.sidecar import sidecar_path


def write_results(result: dict[str, Any], out: Path) -> None:
    """``out`` (JSON) and ``out`` with suffix ``.md`` (the Markdown table), each atomically."""
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown_report(result))


_LABELS = {
    "reward/mean": "mean reward",
    "success/rate": "success rate",
    "tgc": "TGC (task goal completion)",
    "sgc": "SGC (scenario goal completion)",
    "diversity/distinct_solutions": "distinct successful solutions / task",
    "diversity/distinct_frac": "distinct / successful samples",
    "entropy/sampled": "sampled-token entropy (nats)",
    "entropy/normalised": "sampled-token entropy / ln V",
    "entropy/sampled_stopped": "sampled-token entropy, answers that stop (nats)",
    "response/tokens_mean": "sampled tokens / episode",
    "response/stopped_frac": "responses stopped before the cap",
    "episodes/errors": "environment errors (episodes, left out of the scores)",
    "tasks/errored": "tasks with only errored episodes (left out)",
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
    "entropy/sampled_stopped",
    "response/tokens_mean",
    "response/stopped_frac",
    "episodes/errors",
    "tasks/errored",
    "<tasks/pass@k>",
    "tasks",
    "episodes",
]


def _label(key: str) -> str:
    if key.startswith("tasks/pass@"):
        return f"tasks with n >= {key.split('@')[1]} (counted under {key.split('/')[1]})"
    return _LABELS.get(key, key)


def _metric_keys(results: Sequence[dict]) -> list[str]:
    present = [key for r in results for key in r["metrics"]]

    def numbered(prefix: str) -> list[str]:
        found = {key for key in present if key.startswith(prefix) and key != "pass@1"}
        return sorted(found, key=lambda key: int(key.split("@")[1]))

    keys: list[str] = []
    for key in _ORDER:
        if key == "<pass@k>":
            keys.extend(numbered("pass@"))
        elif key == "<tasks/pass@k>":
            keys.extend(numbered("tasks/pass@"))
        elif key in present:
            keys.append(key)
    return keys


def _is_count(key: str) -> bool:
    return key in {"tasks", "episodes", "scenarios", "episodes/errors", "tasks/errored"} or (
        key.startswith("tasks/pass@")
    )


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if _is_count(key):
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:.3f}"
    return str(value)


def _confidence(result: dict) -> float:
    return result.get("bootstrap", {}).get("confidence", 0.95)


def _interval(result: dict, key: str) -> str:
    bounds = result.get("intervals", {}).get(key)
    return "-" if bounds is None else f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _counts(result: dict, key: str) -> tuple[str, str]:
    counts = result.get("counts", {}).get(key)
    return ("-", "-") if counts is None else (str(counts["tasks"]), str(counts["samples"]))


def _score_cells(result: dict, key: str) -> tuple[str, str, str, str]:
    """(value, interval, tasks, samples) of one metric; counts and descriptive metrics carry
    no interval."""
    value = _fmt(result["metrics"].get(key), key)
    if _is_count(key) or key not in result.get("counts", {}):
        return value, "", "", ""
    return value, _interval(result, key), *_counts(result, key)


def _side_by_side(result: dict, key: str) -> str:
    value, bounds, tasks, samples = _score_cells(result, key)
    return value if not bounds else f"{value} {bounds} ({tasks} tasks, {samples} samples)"


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
        ("data", ", ".join(result.get("data") or []) or "as shipped with the environment"),
        ("samples per task (K)", str(result.get("k"))),
        ("backend", str(result.get("backend"))),
        ("temperature / top-p", f"{s.get('temperature')} / {s.get('top_p')}"),
        ("turns x new tokens", f"{s.get('max_turns')} x {s.get('max_new_tokens')}"),
    ]


def markdown_report(result: dict[str, Any]) -> str:
    confidence = _confidence(result)
    lines = [
        f"# Evaluation: {result.get('model')} on {result.get('env')} / {result.get('split')}",
        "",
        f"Finished {result.get('finished_at')}; unbiased pass@k (Chen et al., 2021); "
        f"{confidence:.0%} intervals from a bootstrap over tasks and samples; errored episodes "
        "are left out of the scores; definitions in `trainer/evaluation/metrics.py` and "
        "`intervals.py`.",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in _header_rows(result)]
    lines += [
        "",
        f"| metric | value | {confidence:.0%} interval | tasks | samples |",
        "|---|---:|---|---:|---:|",
    ]
    lines += [
        f"| {_label(key)} | " + " | ".join(_score_cells(result, key)) + " |"
        for key in _metric_keys([result])
    ]
    return "\n".join(lines) + "\n"


def _tables(
    results: Sequence[dict], labels: Sequence[str], boot: Bootstrap
) -> list[tuple[str, list[str], list[str], list[list[str]]]]:
    """The comparison as (title, notes, header, rows) tables: side by side, then each result's
    paired difference from the first."""
    headers = [dict(_header_rows(r)) for r in results]
    rows = [[name, *(h[name] for h in headers)] for name in headers[0]]
    rows += [
        [_label(key), *(_side_by_side(r, key) for r in results)] for key in _metric_keys(results)
    ]
    tables = [("", [], ["", *labels], rows)]
    for other, label in zip(results[1:], labels[1:], strict=True):
        paired = paired_differences(results[0], other, boot)
        title = (
            f"Paired difference {label} - {labels[0]} over the {paired['tasks']['common']} tasks "
            f"in both ({boot.confidence:.0%} paired bootstrap, {boot.resamples} resamples, "
            f"seed {boot.seed})"
        )
        rows = []
        for key, entry in paired["differences"].items():
            bounds = entry["interval"]
            rows.append(
                [
                    _label(key),
                    f"{entry['difference']:+.3f}",
                    "-" if bounds is None else f"[{bounds[0]:+.3f}, {bounds[1]:+.3f}]",
                    str(entry["tasks"]),
                    verdict(entry, boot.confidence, labels[0], label),
                ]
            )
        header = ["metric", f"{label} - {labels[0]}", f"{boot.confidence:.0%} interval"]
        tables.append((title, paired["notes"], [*header, "tasks", "verdict"], rows))
    return tables


def compare_markdown(
    results: Sequence[dict], labels: Sequence[str], boot: Bootstrap = Bootstrap()
) -> str:
    """A side-by-side Markdown table of several results (rows: settings and metrics, each score
    with its interval and counts), then each result's paired difference from the first."""
    lines: list[str] = []
    for title, notes, header, rows in _tables(results, labels, boot):
        if title:
            lines += ["", title + ":", ""]
        lines += [f"- note: {note}" for note in notes] + ([""] if notes else [])
        if rows:
            lines += [
                "|" + "".join(f" {name} |" if name else " |" for name in header),
                "|---|" + "---:|" * (len(header) - 1),
                *("| " + " | ".join(row) + " |" for row in rows),
            ]
    return "\n".join(lines) + "\n"


def load_result(path: str | os.PathLike[str]) -> dict[str, Any]:
    result = read_data_file(path, "result file", "JSON", error=ValueError)
    if not isinstance(result, dict) or "metrics" not in result:
        raise ValueError(
            f"result file {str(Path(path))!r} is not an `eprl eval` result (no 'metrics')"
        )
    return result


def compare_labels(paths: Sequence[str]) -> list[str]:
    stems = [Path(p).stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [str(p) for p in paths]


def print_compare(paths: Sequence[str], boot: Bootstrap = Bootstrap()) -> str:
    """Print the side-by-side table and the paired differences; return them as Markdown."""
    from rich.console import Console
    from rich.table import Table

    results = [load_result(p) for p in paths]
    labels = compare_labels(paths)
    console = Console()
    for title, notes, header, rows in _tables(results, labels, boot):
        table = Table(title=title or "eprl eval: comparison")
        for i, name in enumerate(header):
            table.add_column(name, justify="left" if i == 0 or name == "verdict" else "right")
        for row in rows:
            table.add_row(*row)
        if rows:
            console.print(table)
        for note in notes:
            console.print(f"note: {note}")
    return compare_markdown(results, labels, boot)


def print_result(result: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{result['env']} / {result['split']}: {int(result['metrics']['tasks'])} tasks x {result['k']}"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column(f"{_confidence(result):.0%} interval")
    table.add_column("tasks", justify="right")
    table.add_column("samples", justify="right")
    for name, value in _header_rows(result):
        table.add_row(name, value)
    for key in _metric_keys([result]):
        table.add_row(_label(key), *_score_cells(result, key))
    console = Console()
    console.print(table)
    console.print(
        f"results: {out}  (table: {out.with_suffix('.md')}; per task: {sidecar_path(out)})"
    )
