"""Watching and killing a session's processes without races on reused pids."""

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def exit_status(process: subprocess.Popen) -> int | None:
    """Exit status (negative: killed by that signal) without reaping, or None while it runs.

    Not reaping keeps the pid, and so the process group id, from being reused before
    ``kill_tree`` signals the group.
    """
    if process.returncode is not None:
        return process.returncode
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return process.poll()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def descendant_pids(pid: int) -> list[int]:
    """Pids of every descendant of ``pid``, from /proc/PID/task/TID/children (no full scan)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                frontier.append(child)
    return found


def kill_pids(pids: list[int]) -> None:
    """SIGKILL each pid; one that is already gone (or not ours to signal) is skipped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def kill_tree(process: subprocess.Popen, bwrap: bool) -> None:
    """SIGKILL every descendant of ``process`` and its process group, then reap ``process``.

    With bwrap the descendants go first: the sandbox's init dies (taking its PID namespace
    with it), bwrap reaps it and exits, and nothing is left for the host's init to reap.
    """
    descendants = descendant_pids(process.pid) if process.returncode is None else []
    kill_pids(descendants)
    deadline = time.monotonic() + 0.5
    while bwrap and descendants and exit_status(process) is None and time.monotonic() < deadline:
        time.sleep(0.001)
    if process.returncode is None:  # not reaped yet, so the group id is still ours
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        logger.error("sandbox process %d did not exit 10 s after SIGKILL", process.pid)
