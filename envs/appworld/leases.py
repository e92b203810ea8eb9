"""Leases on a pinned pool of AppWorld servers shared by several processes of one host.

An AppWorld server (``appworld serve environment``) holds one task world at a time, so two
episodes on one server overwrite each other's world. Inside one process the runtime's pool
already hands each server to one episode; ranks of a trainer or workers of ``eprl serve`` are
separate processes over the same ``server_urls``, and without coordination each would start at
the first URL. A lease is an exclusive ``flock`` on a file named after the URL, held from
``acquire`` to ``release`` of the episode: the kernel drops it when the holder exits, even on
SIGKILL, so a crashed process never pins a server. ``flock`` locks are per open file, so two
runtimes of one process exclude each other too.

Leases coordinate the processes of one host (the lock files live in ``lease_dir``, by default
``$EPRL_CACHE_DIR/appworld-leases``); processes on other hosts need a lock directory on a shared
file system with working ``flock`` (not every NFS has it), or their own servers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

from envs.appworld.server import cache_dir


def default_lease_dir() -> Path:
    """``$EPRL_CACHE_DIR/appworld-leases`` (``~/.cache/eprl/appworld-leases``)."""
    return cache_dir() / "appworld-leases"


def lock_path(lease_dir: Path, url: str) -> Path:
    """The lock file of ``url``: its hash (a URL is not a file name), the URL inside for people."""
    return lease_dir / (hashlib.sha256(url.encode()).hexdigest()[:24] + ".lock")


class Lease:
    """An exclusive hold on one server URL; ``release`` (idempotent) lets the next one take it."""

    def __init__(self, url: str, fd: int):
        self.url = url
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __repr__(self) -> str:
        return f"Lease({self.url!r}, {'held' if self.held else 'released'})"


def try_lease(url: str, lease_dir: Path) -> Lease | None:
    """The lease on ``url`` if no one holds it now, else None (never waits)."""
    lease_dir.mkdir(parents=True, exist_ok=True)
    path = lock_path(lease_dir, url)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):  # who holds it, for whoever looks at the file
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{url} pid {os.getpid()}\n".encode(), 0)
    return Lease(url, fd)


def holder(url: str, lease_dir: Path) -> str | None:
    """What the lock file of ``url`` says about its last holder (for error messages)."""
    try:
        return lock_path(lease_dir, url).read_text().strip() or None
    except OSError:
        return None
