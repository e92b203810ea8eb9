"""One AppWorld server as eprl sees it, and where AppWorld's venv and data are found.

``AppWorldServer`` is the HTTP client of one ``appworld serve environment`` app: a sealed
sandbox this runtime started (reached over the unix socket in its private directory) or a URL
someone else runs. Every request has a timeout, which is also how a cell's wall-clock limit is
enforced from outside the sandbox; a dead or hung server becomes ``AppWorldServerError`` with the
tail of its log, never a hang. The pool that starts and hands out servers is ``runtime.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from envs.appworld import sealed

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-appworld"
APPWORLD_VERSION = "0.1.3.post1"


class AppWorldRuntimeError(RuntimeError):
    """The AppWorld runtime is missing, unreachable or failed; the message says what to do."""


class AppWorldServerError(AppWorldRuntimeError):
    """An AppWorld server died or stopped answering; the episode on it is lost."""


def cache_dir() -> Path:
    """eprl's cache root: ``$EPRL_CACHE_DIR``, else ``~/.cache/eprl``."""
    return Path(os.environ.get("EPRL_CACHE_DIR", Path.home() / ".cache" / "eprl"))


def default_root() -> Path:
    """Where ``eprl appworld make-data`` writes by default and the env looks last."""
    return cache_dir() / "appworld"


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The AppWorld root (the directory holding ``data/``): ``root``, else ``$APPWORLD_ROOT``,
    else ``default_root()``. Raises ``AppWorldRuntimeError`` when it holds no AppWorld data."""
    candidate = root or os.environ.get("APPWORLD_ROOT") or default_root()
    path = Path(candidate).expanduser().absolute()
    if not (path / "data" / "tasks").is_dir():
        source = (
            "root="
            if root
            else ("$APPWORLD_ROOT" if os.environ.get("APPWORLD_ROOT") else "the default root")
        )
        raise AppWorldRuntimeError(
            f"no AppWorld data under {path} ({source}): expected {path}/data/tasks. Generate a small "
            f"dataset offline with `eprl appworld make-data --out {path}`, or point APPWORLD_ROOT at "
            "AppWorld's released data (`appworld download data --root DIR` on a connected machine)."
        )
    return path


def data_source(root: Path) -> str:
    """Which data an AppWorld root holds, for every report: ``appworld-generated`` (the small
    offline world of ``eprl appworld make-data``) or ``appworld-release`` (AppWorld's own)."""
    generated = (Path(root) / "data" / "eprl_generated.json").is_file()
    return "appworld-generated" if generated else "appworld-release"


def resolve_python(python: str | os.PathLike | None = None) -> Path:
    """The AppWorld venv's python: ``python``, else ``$EPRL_APPWORLD_VENV``, else
    ``<repo>/.venv-appworld``; each may name the venv, its ``bin`` folder or the interpreter."""
    candidate = Path(python or os.environ.get("EPRL_APPWORLD_VENV") or DEFAULT_VENV).expanduser()
    # absolute(), not resolve(): a venv's python is a symlink, and following it leaves the venv
    for executable in (candidate, candidate / "bin" / "python", candidate / "python"):
        if executable.is_file() and os.access(executable, os.X_OK):
            return executable.absolute()
    raise AppWorldRuntimeError(
        f"the AppWorld venv's python was not found at {candidate} (looked for {candidate}/bin/python): "
        f"run `make setup` (it builds .venv-appworld with appworld=={APPWORLD_VERSION}) or set "
        "EPRL_APPWORLD_VENV to such a venv."
    )


def _log_tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    return ("\n--- server log (last lines) ---\n" + "\n".join(text)) if text else ""


class AppWorldServer:
    """One AppWorld environment server: a process this runtime started, or a given URL."""

    def __init__(
        self,
        url: str,
        process: subprocess.Popen | None = None,
        log_path: Path | None = None,
        directory: Path | None = None,
    ):
        self.url = url
        self.process = process
        self.log_path = log_path
        self.directory = directory  # a sealed server's private directory; None for a URL
        self.lease = None  # a URL's cross-process lease (leases.Lease) while an episode holds it
        transport = None
        if directory is not None:
            transport = httpx.HTTPTransport(uds=str(directory / sealed.SOCKET_NAME))
        self._client = httpx.Client(
            base_url=url, timeout=30.0, trust_env=False, transport=transport
        )

    @property
    def sealed(self) -> bool:
        """Whether this server is a sandbox this runtime started (else someone else's URL)."""
        return self.directory is not None

    def __repr__(self) -> str:
        if self.sealed:
            return f"sealed AppWorld server {self.directory.name} (pid {self.process.pid})"
        return f"AppWorld server at {self.url}"

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None

    def healthy(self, timeout_s: float = 10.0) -> bool:
        if not self.alive():
            return False
        try:
            return self._client.get("/", timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def call(self, method: str, timeout_s: float, **payload: Any) -> Any:
        """POST ``/<method>`` with a JSON body and return its ``output``.

        Raises ``AppWorldServerError`` when the server dies, hangs past ``timeout_s`` or cannot
        be reached, and ``AppWorldRuntimeError`` when AppWorld answers with an error.
        """
        what = f"/{method}" + (f" for task {payload['task_id']}" if "task_id" in payload else "")
        try:
            response = self._client.post(f"/{method}", json=payload, timeout=timeout_s)
        except httpx.TimeoutException as error:
            raise AppWorldServerError(
                f"{self} did not answer {what} within {timeout_s:.0f}s; it is presumed hung and will "
                f"be replaced, and this episode is lost (call reset() to start a new one).{_log_tail(self.log_path)}"
            ) from error
        except httpx.TransportError as error:
            state = (
                "" if self.alive() else f" (its process exited with code {self.process.returncode})"
            )
            raise AppWorldServerError(
                f"{self} failed during {what}{state}: {type(error).__name__}: {error}. The server will be "
                f"replaced and this episode is lost (call reset() to start a new one).{_log_tail(self.log_path)}"
            ) from error
        if response.status_code != 200:
            if not self.alive():
                raise AppWorldServerError(
                    f"{self} died during {what} (exit code {self.process.returncode}).{_log_tail(self.log_path)}"
                )
            raise AppWorldRuntimeError(
                f"AppWorld failed on {what}: HTTP {response.status_code} {response.text[:500]}{_log_tail(self.log_path)}"
            )
        return response.json()["output"]

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise AppWorldRuntimeError(
                    f"{self} exited with code {self.process.returncode} while starting.{_log_tail(self.log_path)}"
                )
            if self.healthy(timeout_s=min(5.0, max(deadline - time.monotonic(), 0.1))):
                return
            time.sleep(0.2)
        raise AppWorldRuntimeError(
            f"{self} did not answer within {timeout_s:.0f}s of starting (raise start_timeout_s on a "
            f"busy machine).{_log_tail(self.log_path)}"
        )

    def close_client(self) -> None:
        self._client.close()


def kill_process_groups(processes: list[subprocess.Popen], grace_s: float = 2.0) -> None:
    """SIGTERM each server's process group, then SIGKILL whatever is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, sig)
        deadline = time.monotonic() + grace_s
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(deadline - time.monotonic(), 0.01))
        if all(process.poll() is not None for process in processes):
            break
    for process in processes:  # reap; the group (AppWorld spawns nothing) goes with the leader
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=1.0)
