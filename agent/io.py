"""Durable file writes: a crash (SIGKILL included) never leaves a half-written file in place.

Every writer in eprl that replaces a file (results, configs, trajectories, checkpoints, the
converted model folder) goes through :func:`atomic_write_text` or :func:`replace_dir`, and every
append-only log (``metrics.jsonl``, the evaluation sidecar) through :func:`append_line`.
Files a user names (run and serve configs, result files) are read by :func:`read_data_file`, so
that a missing or unparsable one is refused in the same words everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries, so that a rename inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    Readers see the old file or the new one, never a mix; the temporary name carries the pid, so
    two processes writing the same path do not clobber each other's temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Append one line and fsync it before returning (a log that a resumed run reads back)."""
    with Path(path).open("a") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def replace_dir(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """Move a completely written folder ``tmp`` to ``final`` (replacing an older ``final``)."""
    tmp, final = Path(tmp), Path(final)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


_PARSERS = {"YAML": (yaml.safe_load, yaml.YAMLError), "JSON": (json.loads, json.JSONDecodeError)}


def read_data_file(
    path: str | os.PathLike[str],
    what: str,
    language: Literal["YAML", "JSON"],
    error: type[Exception] = ValueError,
) -> Any:
    """What a YAML or JSON file that a user named holds; ``error`` naming the file when it is
    missing or does not parse, worded alike for every such file (``what``: "config file",
    "result file", ...). Checking the content's shape is the caller's."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what} {str(p)!r} does not exist")
    parse, parse_error = _PARSERS[language]
    try:
        return parse(p.read_text())
    except parse_error as exc:
        raise error(f"{what} {str(p)!r} is not valid {language}: {exc}") from None
