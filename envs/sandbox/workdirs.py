"""Host work directories that outlive a SIGKILL: named after their owner, swept by the next one.

A sandboxed session or the AppWorld runtime keeps files on the host (a HOME for the
``rlimits-only`` sandbox; the servers' shared data, sockets and saved states for AppWorld).
They are removed on close and by a finalizer, but a process killed with SIGKILL (the OOM
killer, a preempted job, ``kill -9`` of a trainer) runs neither, and the sandboxes themselves die
with it (``--die-with-parent``), leaving only the directory. So each directory's name says who
owns it, ``<prefix><pid namespace>-<pid>-<start time>-<random>``, and ``owned_tempdir`` first
removes every directory of the same prefix whose owner is gone: its pid no longer exists, or now
belongs to a process that started later (a reused pid). Directories of another pid namespace
(a container sharing this ``/tmp``), links, and (unless this process is root, whose sessions
hand their directories to the sandbox's uid) directories of another uid are never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot; ``/proc/<pid>/stat`` field 22),
    or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return int(stat.rsplit(b")", 1)[1].split()[19])


def _pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix) + r"(\d+)-(\d+)-(\d+)-[^/]+")


def owner_alive(name: str, prefix: str) -> bool | None:
    """Whether the process that made directory ``name`` still runs; None when ``name`` is not
    one of ours in this pid namespace (then it is left alone)."""
    match = _pattern(prefix).fullmatch(name)
    if match is None or int(match.group(1)) != _pid_namespace():
        return None
    return process_start_ticks(int(match.group(2))) == int(match.group(3))


def sweep_stale(prefix: str, parent: str | os.PathLike | None = None) -> list[Path]:
    """Remove the directories ``<parent>/<prefix>...`` of this uid whose owner has died;
    returns what was removed."""
    parent = Path(parent or tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if not entry.name.startswith(prefix) or owner_alive(entry.name, prefix) is not False:
                continue
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                # root's sessions chown their directory to the sandbox's uid
                mine = info.st_uid == os.geteuid() or os.geteuid() == 0
                if entry.is_dir(follow_symlinks=False) and mine:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(Path(entry.path))
    if removed:
        logger.info("removed %d work directories of dead processes: %s", len(removed), removed)
    return removed


def owned_tempdir(prefix: str, parent: str | os.PathLike | None = None) -> Path:
    """A new private directory named after this process (``mkdtemp``), after sweeping the
    stale ones of the same ``prefix``."""
    sweep_stale(prefix, parent)
    pid = os.getpid()
    owner = f"{prefix}{_pid_namespace()}-{pid}-{process_start_ticks(pid)}-"
    return Path(tempfile.mkdtemp(prefix=owner, dir=parent))
