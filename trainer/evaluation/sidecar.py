"""The resumable task log of an evaluation, ``OUT.tasks.jsonl``.

Per-task results are appended (and fsync'd) as soon as a batch of tasks finishes; a rerun with
the same settings reads it, skips the tasks it holds and runs only the rest, so a task is never
run to completion twice. A half-written last line (a kill mid-write) is dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agent.io import append_line

SCHEMA = 1
# the settings a resumed evaluation must share with the run that wrote the sidecar
RESUME_KEYS = (
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
        differ = [key for key in RESUME_KEYS if saved.get(key) != self.settings.get(key)]
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
        append_line(self.path, json.dumps(row))

    def add(self, record: dict) -> None:
        if record["task_id"] in self.records:
            raise RuntimeError(f"task {record['task_id']!r} is already in {self.path}")
        self._append(record)
        self.records[record["task_id"]] = record


def sidecar_path(out: Path) -> Path:
    return (
        out.with_name(out.name + ".tasks.jsonl")
        if out.suffix != ".json"
        else out.with_suffix(".tasks.jsonl")
    )
