"""Evaluation results as people read them: the JSON + Markdown files, the terminal table, and
the side-by-side comparison of several result files (``eprl eval --compare A.json B.json``)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.io import atomic_write_text
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
        "definitions in `trainer/evaluation/metrics.py`.",
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
