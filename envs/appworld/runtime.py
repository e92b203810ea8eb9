"""The AppWorld runtime: a pool of AppWorld environment servers on loopback, one task per process.

AppWorld (``appworld==0.1.3.post1``) pins pydantic 1 and an old FastAPI, so it lives in its own
venv (``.venv-appworld``) and eprl talks to it over HTTP only; nothing here imports ``appworld``.

Design:

- A server is the FastAPI app of ``appworld serve environment`` run by ``serve.py`` with the
  AppWorld venv's python, on a socket this process binds on 127.0.0.1 (OS-chosen port, handed
  over as a file descriptor). A server holds one task world at a time, so concurrency comes from
  the number of servers. All servers of a runtime share one work directory: ``data`` is a
  symlink to ``<root>/data`` (read only, real or generated data), and AppWorld's per-episode
  outputs (``experiments/outputs/<experiment_name>``) and the server logs live beside it, so
  the data directory is never written to. The work directory is removed on close.
- The pool starts servers lazily, up to ``max_servers``; ``acquire`` hands out an idle server
  (checking that it is alive and answers) or starts one, and blocks, with a timeout, while all
  are busy.
- A server that dies or stops answering fails the request in flight with
  ``AppWorldServerError`` (a clear message naming the server, the task and the log tail; never
  a hang: every request has a timeout). The caller releases it as broken; the pool kills it and
  starts a fresh one on the next ``acquire``.
- No process is left behind: each server runs in its own process group, which ``close`` kills;
  a ``weakref.finalize`` does the same when the runtime is garbage collected or the interpreter
  exits; and each server exits by itself when its parent process disappears (even after
  SIGKILL), see ``serve.py``.
- ``server_urls`` instead uses servers someone else runs (``appworld serve environment`` on
  other hosts or in Docker, over the same data): they are never started, restarted or killed
  here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-appworld"
SERVE_SCRIPT = Path(__file__).with_name("serve.py")
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
        self, url: str, process: subprocess.Popen | None = None, log_path: Path | None = None
    ):
        self.url = url
        self.process = process
        self.log_path = log_path
        self._client = httpx.Client(base_url=url, timeout=30.0, trust_env=False)

    def __repr__(self) -> str:
        pid = f", pid {self.process.pid}" if self.process else ""
        return f"AppWorld server at {self.url}{pid}"

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


def _kill_process_groups(processes: list[subprocess.Popen], grace_s: float = 2.0) -> None:
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


def _shutdown(processes: list[subprocess.Popen], workdir: dict[str, Path | None]) -> None:
    _kill_process_groups(processes)
    processes.clear()
    if workdir.get("path") is not None:
        shutil.rmtree(workdir["path"], ignore_errors=True)
        workdir["path"] = None


class AppWorldRuntime:
    """A lazily started pool of AppWorld servers over one AppWorld root (see the module doc).

    ``acquire()`` returns a server for one episode (``/initialize`` ... ``/close``);
    ``release(server, broken=...)`` gives it back. ``close()`` stops every server it started.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        python: str | os.PathLike | None = None,
        max_servers: int | None = None,
        server_urls: Sequence[str] | None = None,
        start_timeout_s: float = 180.0,
        acquire_timeout_s: float = 600.0,
    ):
        self.root = resolve_root(root)
        self.server_urls = [url.rstrip("/") for url in server_urls or []]
        self.python = None if self.server_urls else resolve_python(python)
        self.max_servers = (
            len(self.server_urls)
            if self.server_urls
            else max(1, max_servers or os.cpu_count() or 1)
        )
        self.start_timeout_s = start_timeout_s
        self.acquire_timeout_s = acquire_timeout_s
        self._condition = threading.Condition()
        self._idle: list[AppWorldServer] = []
        self._n_servers = 0  # started or starting
        self._unused_urls = list(self.server_urls)
        self._closed = False
        self._users = 0
        # shared with the finalizer, which must not hold a reference to self
        self._processes: list[subprocess.Popen] = []
        self._workdir: dict[str, Path | None] = {"path": None}
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._workdir)

    def __repr__(self) -> str:
        where = (
            ", ".join(self.server_urls) if self.server_urls else f"{self.max_servers} local servers"
        )
        return f"AppWorldRuntime(root={self.root}, {where})"

    @property
    def workdir(self) -> Path | None:
        """The servers' AppWorld root (``data`` symlink, experiment outputs, logs); None for URLs."""
        return self._workdir["path"]

    def pids(self) -> list[int]:
        """Process ids of the live servers this runtime started."""
        return [process.pid for process in self._processes if process.poll() is None]

    def acquire(self, timeout_s: float | None = None) -> AppWorldServer:
        """An idle, answering server, started if needed; waits while all ``max_servers`` are busy."""
        timeout_s = self.acquire_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            with self._condition:
                while not self._idle and self._n_servers >= self.max_servers and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise AppWorldRuntimeError(
                            f"all {self.max_servers} AppWorld servers stayed busy for {timeout_s:.0f}s: "
                            "close finished environments or raise max_servers"
                        )
                    self._condition.wait(remaining)
                if self._closed:
                    raise AppWorldRuntimeError(f"{self} is closed")
                server = self._idle.pop() if self._idle else None
                if server is None:
                    self._n_servers += 1  # reserve the slot; start outside the lock
            if server is None:
                break
            if server.healthy():  # outside the lock: a wedged server must not block the pool
                return server
            with self._condition:
                doomed = self._forget(server)
            if doomed is not None:
                _kill_process_groups([doomed])
        try:
            server = self._start_server()
        except BaseException:
            with self._condition:
                self._n_servers -= 1
                self._condition.notify()
            raise
        with self._condition:
            closed = self._closed  # closed while this server was starting?
            doomed = self._forget(server) if closed else None
        if closed:
            if doomed is not None:
                _kill_process_groups([doomed])
            raise AppWorldRuntimeError(f"{self} was closed while a server was starting")
        return server

    def release(self, server: AppWorldServer, broken: bool = False) -> None:
        """Give a server back; a broken or dead one is stopped and replaced on demand."""
        doomed = None
        with self._condition:
            if broken or self._closed or not server.alive():
                doomed = self._forget(server)
            else:
                self._idle.append(server)
            self._condition.notify()
        if doomed is not None:
            _kill_process_groups([doomed])

    def close(self) -> None:
        """Stop every server this runtime started and remove its work directory. Idempotent."""
        with self._condition:
            self._closed = True
            for server in self._idle:
                server.close_client()
            self._idle.clear()
            self._condition.notify_all()
        self._finalizer()

    def _forget(self, server: AppWorldServer) -> subprocess.Popen | None:
        """Drop a server from the pool (lock held); returns its process, for the caller to kill."""
        server.close_client()
        self._n_servers -= 1
        if server.process is None:
            self._unused_urls.append(server.url)
            return None
        with contextlib.suppress(ValueError):
            self._processes.remove(server.process)
        return server.process

    def _start_server(self) -> AppWorldServer:
        if self.server_urls:
            with self._condition:
                url = self._unused_urls.pop(0)
            server = AppWorldServer(url)
            if not server.healthy():
                with self._condition:
                    self._unused_urls.append(url)
                raise AppWorldRuntimeError(
                    f"the AppWorld server at {url} is unreachable (GET / failed): start it with "
                    "`appworld serve environment --port PORT --root ROOT` over the same data, or drop server_urls"
                )
            return server
        workdir = self._ensure_workdir()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            port = listener.getsockname()[1]
            log_path = workdir / "logs" / f"server-{port}.log"
            env = {
                k: v
                for k, v in os.environ.items()
                if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
            }
            env.update(APPWORLD_ROOT=str(workdir), PYTHONUNBUFFERED="1")
            with open(log_path, "ab") as log:
                process = subprocess.Popen(
                    [
                        str(self.python),
                        str(SERVE_SCRIPT),
                        "--fd",
                        str(listener.fileno()),
                        "--root",
                        str(workdir),
                        "--parent-pid",
                        str(os.getpid()),
                        "--remove-root-when-orphaned",
                    ],
                    pass_fds=(listener.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    env=env,
                    start_new_session=True,
                )
        finally:
            listener.close()  # the child holds its own copy
        self._processes.append(process)
        server = AppWorldServer(f"http://127.0.0.1:{port}", process=process, log_path=log_path)
        try:
            server.wait_ready(self.start_timeout_s)
        except BaseException:
            server.close_client()
            _kill_process_groups([process])
            with contextlib.suppress(ValueError):
                self._processes.remove(process)
            raise
        return server

    def _ensure_workdir(self) -> Path:
        with self._condition:
            if self._workdir["path"] is None:
                path = Path(tempfile.mkdtemp(prefix="eprl-appworld-"))
                (path / "data").symlink_to(self.root / "data", target_is_directory=True)
                (path / "logs").mkdir()
                (path / "experiments" / "outputs").mkdir(parents=True)
                self._workdir["path"] = path
            return self._workdir["path"]

    def remove_outputs(self, experiment_name: str) -> None:
        """Delete one episode's AppWorld outputs (only for servers this runtime started)."""
        if self.workdir is not None and experiment_name and "/" not in experiment_name:
            shutil.rmtree(
                self.workdir / "experiments" / "outputs" / experiment_name, ignore_errors=True
            )

    # ------------------------------------------------------------ sharing between environments

    def detach(self) -> None:
        """One user fewer; the last one closes the runtime (and so stops its servers)."""
        with _SHARED_LOCK:  # the same lock as shared_runtime(): no one attaches in between
            self._users -= 1
            last = self._users <= 0
            if last:
                for key, runtime in list(_SHARED.items()):
                    if runtime is self:
                        del _SHARED[key]
        if last:
            self.close()


_SHARED: dict[tuple, AppWorldRuntime] = {}
_SHARED_LOCK = threading.Lock()


def shared_runtime(
    root: str | os.PathLike | None = None,
    python: str | os.PathLike | None = None,
    max_servers: int | None = None,
    server_urls: Sequence[str] | None = None,
    start_timeout_s: float = 180.0,
) -> AppWorldRuntime:
    """The process-wide runtime for this configuration, attached once more (``detach()`` it).

    Environments in one process (threads, vector envs) share servers this way; the last one to
    detach stops them.
    """
    resolved_root = resolve_root(root)
    resolved_python = None if server_urls else resolve_python(python)
    key = (
        str(resolved_root),
        str(resolved_python),
        max_servers,
        tuple(server_urls or ()),
        start_timeout_s,
    )
    with _SHARED_LOCK:
        runtime = _SHARED.get(key)
        if runtime is None or runtime._closed:
            runtime = AppWorldRuntime(
                resolved_root, resolved_python, max_servers, server_urls, start_timeout_s
            )
            _SHARED[key] = runtime
        runtime._users += 1
        return runtime
