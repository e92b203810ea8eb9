"""The AppWorld runtime: a pool of sealed AppWorld servers, one episode each, and their evaluator.

AppWorld (``appworld==0.1.3.post1``) pins pydantic 1 and an old FastAPI, so it lives in its own
venv (``.venv-appworld``) and eprl talks to it over HTTP only; nothing here imports ``appworld``.

Design:

- A server is the FastAPI app of ``appworld serve environment`` run by ``serve.py`` inside a
  bubblewrap sandbox of its own (``sealed.py``: no network, no ground truth, rlimits, its own
  uid), serving a unix socket in its private directory. A server runs one episode and is
  then killed; ``release`` starts a replacement in the background, so a ``reset`` normally
  finds a fresh server waiting. All servers of a runtime share one work directory (the
  task-independent data, ``serve.py``, one directory per server, the evaluator's inbox, the
  logs); it is removed on close, and, when this process was SIGKILLed before it could, by the
  next runtime to start (``envs/sandbox/workdirs.py``: the directory is named after its owner).
- The reward comes from ``evaluate``: the saved end state of the episode is copied out of the
  server's directory and evaluated by one sandboxed evaluator process per runtime, which holds
  the ground truth and never runs model code.
- The pool starts servers lazily; at most ``max_servers`` run episodes at once, plus one spare
  starting or waiting for the next episode. ``acquire`` hands out an idle server (checking that
  it is alive and answers), else waits for a spare already starting (sooner than a second start
  competing with it for the CPU), else starts one, and blocks, with a timeout, while
  ``max_servers`` are busy.
- A server that dies or stops answering fails the request in flight with
  ``AppWorldServerError`` (a clear message naming the server, the task and the log tail; never
  a hang: every request has a timeout, which is also how a cell's time limit is enforced from
  outside the sandbox). The caller releases it as broken; the pool kills it.
- No process is left behind: each server runs in its own process group, which ``close`` kills
  (bubblewrap's ``--die-with-parent`` takes the sandbox with it); a ``weakref.finalize`` does
  the same when the runtime is garbage collected or the interpreter exits, and the sandboxes
  die with this process even after SIGKILL.
- ``server_urls`` instead uses servers someone else runs (``appworld serve environment`` on
  other hosts or in Docker, over the same data): they are never started, restarted or killed
  here, they are *not* sealed by eprl, and their own ``/evaluate`` gives the reward.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from envs.appworld import leases, sealed
from envs.appworld.server import (  # noqa: F401  (re-exported: the runtime's public names)
    APPWORLD_VERSION,
    DEFAULT_VENV,
    REPO_ROOT,
    AppWorldRuntimeError,
    AppWorldServer,
    AppWorldServerError,
    cache_dir,
    default_root,
    kill_process_groups,
    resolve_python,
    resolve_root,
)
from envs.sandbox.workdirs import owned_tempdir

logger = logging.getLogger(__name__)
WORKDIR_PREFIX = "eprl-appworld-"  # under the temp dir, named after its owner (workdirs.py)


def _shutdown(
    processes: list[subprocess.Popen],
    workdir: dict[str, Path | None],
    evaluator: dict[str, sealed.Evaluator | None],
) -> None:
    if evaluator.get("evaluator") is not None:
        evaluator["evaluator"].kill()
    kill_process_groups(processes)
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
        lease_dir: str | os.PathLike | None = None,
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
        # URLs are leased across processes (leases.py); sealed servers are this runtime's own
        self.lease_dir = Path(lease_dir) if lease_dir else leases.default_lease_dir()
        self._condition = threading.Condition()
        self._idle: list[AppWorldServer] = []
        self._n_servers = 0  # started or starting, idle or busy
        self._busy = 0  # handed out by acquire (or reserved for it), not yet released
        self._spares_starting = 0  # started in the background by _start_spare, not ready yet
        self._awaiting_spare = 0  # acquire calls waiting for one of those instead of starting
        # sealed servers run one episode each, so one more than max_servers may exist: a spare
        # that starts while max_servers episodes run
        self._capacity = self.max_servers + (0 if self.server_urls else 1)
        self._unused_urls = list(self.server_urls)
        self._closed = False
        self._users = 0
        # shared with the finalizer, which must not hold a reference to self
        self._processes: list[subprocess.Popen] = []
        self._workdir: dict[str, Path | None] = {"path": None}
        self._evaluator: dict[str, sealed.Evaluator | None] = {"evaluator": None}
        self._finalizer = weakref.finalize(
            self, _shutdown, self._processes, self._workdir, self._evaluator
        )
        self.bwrap = None if self.server_urls else shutil.which("bwrap")
        if not self.server_urls and self.bwrap is None:
            raise AppWorldRuntimeError(
                "bubblewrap (bwrap) is not installed, and local AppWorld servers run sealed in "
                "it: `sudo apt-get install bubblewrap` (Debian/Ubuntu), or give server_urls of "
                "servers you run and isolate yourself"
            )

    def __repr__(self) -> str:
        where = (
            ", ".join(self.server_urls) if self.server_urls else f"{self.max_servers} local servers"
        )
        return f"AppWorldRuntime(root={self.root}, {where})"

    @property
    def workdir(self) -> Path | None:
        """The sealed servers' shared work directory (``shared/`` data, ``servers/``, ``inbox/``,
        ``logs/``); None before the first server and for URLs."""
        return self._workdir["path"]

    def ready_servers(self) -> int:
        """Servers started, answering and waiting for an episode (the spare, for sealed ones)."""
        with self._condition:
            return len(self._idle)

    def starting_servers(self) -> int:
        """Spares starting in the background, not answering yet (each takes seconds of CPU)."""
        with self._condition:
            return self._spares_starting

    def pids(self) -> list[int]:
        """Process ids of the live servers this runtime started."""
        return [process.pid for process in self._processes if process.poll() is None]

    def acquire(self, timeout_s: float | None = None, start_spare: bool = True) -> AppWorldServer:
        """An idle, answering server, started if needed; waits while all ``max_servers`` are busy.

        Handing out a sealed server starts the next episode's spare in the background; with
        ``start_spare=False`` the caller does that itself (``start_spare()``) once the work it
        is waiting for is done, so that the spare's start (seconds of CPU) does not compete
        with, say, the episode's ``/initialize``. ``release`` starts one in any case.
        """
        timeout_s = self.acquire_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            with self._condition:
                awaiting = False  # counted in _awaiting_spare: this call waits for a spare's start
                try:
                    while not self._closed:
                        full = self._busy >= self.max_servers or (
                            not self._idle and self._n_servers >= self._capacity
                        )
                        # a spare already starting comes sooner than a new start, which would
                        # also halve its CPU share: wait for it unless others already do
                        others = self._awaiting_spare - awaiting
                        spare_coming = not self._idle and self._spares_starting > others
                        if not (full or spare_coming):
                            break
                        if spare_coming and not full and not awaiting:
                            awaiting = True
                            self._awaiting_spare += 1
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            raise AppWorldRuntimeError(
                                f"all {self.max_servers} AppWorld servers stayed busy for {timeout_s:.0f}s: "
                                "close finished environments or raise max_servers"
                            )
                        self._condition.wait(remaining)
                finally:
                    if awaiting:
                        self._awaiting_spare -= 1
                if self._closed:
                    raise AppWorldRuntimeError(f"{self} is closed")
                server = self._idle.pop() if self._idle else None
                if server is None:
                    self._n_servers += 1  # reserve the slot; start outside the lock
                self._busy += 1
            if server is None:
                break
            if server.healthy():  # outside the lock: a wedged server must not block the pool
                if server.sealed and start_spare:  # the next episode's server starts now
                    self.start_spare()
                return server
            with self._condition:
                self._busy -= 1
                doomed = self._forget(server)
            if doomed is not None:
                kill_process_groups([doomed])
        try:
            server = self._start_server(deadline)
        except BaseException:
            with self._condition:
                self._n_servers -= 1
                self._busy -= 1
                self._condition.notify()
            raise
        with self._condition:
            closed = self._closed  # closed while this server was starting?
            if closed:
                self._busy -= 1
            doomed = self._forget(server) if closed else None
        if closed:
            if doomed is not None:
                kill_process_groups([doomed])
            raise AppWorldRuntimeError(f"{self} was closed while a server was starting")
        if server.sealed and start_spare:
            self.start_spare()
        return server

    def release(self, server: AppWorldServer, broken: bool = False) -> None:
        """Give a server back. A sealed server ran its one episode: it is killed (every process
        of its sandbox is gone when this returns), and its directory is removed and a fresh one
        starts in the background; a URL's lease is released (the next episode of any process
        may take it), and a broken URL is leased again only once it answers."""
        doomed = None
        with self._condition:
            self._busy -= 1
            if server.sealed or server.lease is not None or broken or self._closed:
                doomed = self._forget(server)
            else:
                self._idle.append(server)
            self._condition.notify()
        if doomed is not None:
            kill_process_groups([doomed])
        if server.sealed:  # nothing runs there any more; close() removes what is left
            reserved = self._reserve_spare()
            threading.Thread(
                target=self._retire, args=(server.directory, reserved), daemon=True
            ).start()

    def _retire(self, directory: Path, spare_reserved: bool) -> None:
        shutil.rmtree(directory, ignore_errors=True)
        if spare_reserved:
            self._start_spare(reserved=True)

    def evaluate(
        self, server: AppWorldServer, task_id: str, experiment_name: str, timeout_s: float
    ) -> dict[str, Any]:
        """AppWorld's test report (``passes``, ``failures``, ``num_tests``, ``success``, ...)
        of the episode ``experiment_name`` on ``server``. A sealed server's saved state goes
        to the sandboxed evaluator; a URL's server evaluates itself (``/evaluate``)."""
        if not server.sealed:
            return server.call(
                "evaluate", timeout_s=timeout_s, task_id=task_id, suppress_errors=True
            )
        inbox = self.workdir / "inbox"
        evaluator = self._sealed_evaluator()
        try:
            sealed.collect_saved_state(server.directory, inbox, task_id, experiment_name)
            return evaluator.evaluate(task_id, experiment_name, timeout_s)
        except (OSError, RuntimeError) as error:
            raise AppWorldRuntimeError(
                f"evaluating episode {experiment_name} (task {task_id}) failed: {error}"
            ) from error
        finally:
            shutil.rmtree(inbox / "experiments" / "outputs" / experiment_name, ignore_errors=True)

    def _sealed_evaluator(self) -> sealed.Evaluator:
        """The runtime's one evaluator (made on first use; its process starts on first call)."""
        with self._condition:
            if self._evaluator["evaluator"] is None:
                self._evaluator["evaluator"] = sealed.Evaluator(
                    self.root,
                    self.python,
                    self.workdir / "inbox",
                    self.bwrap,
                    self.workdir / "logs" / "eval.log",
                )
            return self._evaluator["evaluator"]

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
            if server.lease is not None:
                server.lease.release()
            self._unused_urls.append(server.url)
            return None
        with contextlib.suppress(ValueError):
            self._processes.remove(server.process)
        return server.process

    def _start_server(self, deadline: float | None = None) -> AppWorldServer:
        if self.server_urls:
            return self._lease_url(deadline or time.monotonic() + self.acquire_timeout_s)
        workdir = self._ensure_workdir()
        try:
            process, directory, log_path = sealed.start_server(
                workdir, self.bwrap, self.python.parent.parent
            )
        except (sealed.SealedSetupError, OSError) as error:
            raise AppWorldRuntimeError(f"cannot start a sealed AppWorld server: {error}") from None
        with self._condition:
            closed = self._closed
            if not closed:
                self._processes.append(process)
        if closed:  # close() ran while this one started: it is not ours to keep
            kill_process_groups([process])
            raise AppWorldRuntimeError(f"{self} was closed while a server was starting")
        server = AppWorldServer(
            "http://appworld", process=process, log_path=log_path, directory=directory
        )
        try:
            server.wait_ready(self.start_timeout_s)
        except BaseException:
            server.close_client()
            kill_process_groups([process])
            shutil.rmtree(directory, ignore_errors=True)
            with contextlib.suppress(ValueError):
                self._processes.remove(process)
            raise
        return server

    def _lease_url(self, deadline: float) -> AppWorldServer:
        """A URL no episode of any process holds (this runtime's free ones, then the lease),
        waiting until ``deadline`` while other processes hold them all."""
        started = time.monotonic()
        while True:
            with self._condition:
                candidates = list(self._unused_urls)
            for url in candidates:
                lease = leases.try_lease(url, self.lease_dir)
                if lease is None:
                    continue
                with self._condition:
                    self._unused_urls.remove(url)
                server = AppWorldServer(url)
                server.lease = lease
                if server.healthy():
                    return server
                with self._condition:
                    self._forget(server)
                    self._n_servers += 1  # _forget counts a pool slot; acquire still holds it
                raise AppWorldRuntimeError(
                    f"the AppWorld server at {url} is unreachable (GET / failed): start it with "
                    "`appworld serve environment --port PORT --root ROOT` over the same data, or drop server_urls"
                )
            if time.monotonic() >= deadline:
                held = [leases.holder(url, self.lease_dir) or url for url in candidates]
                raise AppWorldRuntimeError(
                    f"every free AppWorld server of this runtime stayed leased by other processes for "
                    f"{time.monotonic() - started:.0f}s ({held}; lock files in {self.lease_dir}): "
                    "give each process its own servers, add servers, or raise acquire_timeout_s"
                )
            time.sleep(0.2)  # another process's episode holds each; its release is not signalled

    def _ensure_workdir(self) -> Path:
        with self._condition:
            if self._closed:  # a spare starting while the runtime closes must not make another
                raise AppWorldRuntimeError(f"{self} is closed")
            if self._workdir["path"] is None:
                path = owned_tempdir(WORKDIR_PREFIX)  # sweeps those of killed runtimes
                (path / "logs").mkdir()
                sealed.prepare_workdir(path, self.root)
                self._workdir["path"] = path
            return self._workdir["path"]

    def start_spare(self) -> None:
        """Start, in the background, a sealed server for the next episode if the pool has room
        for one (nothing to do when it is full, closed, or made of URLs)."""
        if not self.server_urls and self._reserve_spare():
            threading.Thread(target=self._start_spare, args=(False, True), daemon=True).start()

    def prestart(self) -> bool:
        """Start a server for the next episode now and return once it answers (True), so the
        next ``acquire`` takes it at once; False when one is already idle or the pool is full.

        What a warm service session calls before any client asks for it (``serving/warm.py``):
        the cold start (sandbox, AppWorld import) is then paid before the session exists, and
        so is the evaluator's, which would otherwise start at the end of the first episode.
        Errors propagate, unlike the background spare's. URLs are never started: False.
        """
        if self.server_urls:
            return False
        with self._condition:
            if self._closed:
                raise AppWorldRuntimeError(f"{self} is closed")
            if self._idle or self._n_servers >= self._capacity:
                return False
        started = self._start_spare(raise_errors=True)
        try:
            self._sealed_evaluator().start(timeout_s=self.start_timeout_s)
        except (OSError, RuntimeError) as error:
            raise AppWorldRuntimeError(f"the AppWorld evaluator did not start: {error}") from error
        return started

    def _reserve_spare(self) -> bool:
        """Count a spare as starting now, in the caller's thread, if the pool has room for one
        (so ``starting_servers()`` says so as soon as ``start_spare`` returns)."""
        with self._condition:
            if self._closed or self._n_servers >= self._capacity:
                return False
            self._n_servers += 1
            self._spares_starting += 1
            return True

    def _start_spare(self, raise_errors: bool = False, reserved: bool = False) -> bool:
        """Start a server for the next episode while nobody waits for it (in a thread); its
        slot is reserved here unless the caller already did (``_reserve_spare``)."""
        if not reserved and not self._reserve_spare():
            return False
        try:
            server = self._start_server()
        except Exception as error:  # noqa: BLE001 (the next acquire starts one and reports)
            logger.debug("a spare AppWorld server did not start: %s", error)
            with self._condition:
                self._n_servers -= 1
                self._spares_starting -= 1
                self._condition.notify_all()
            if raise_errors:
                raise
            return False
        with self._condition:
            self._spares_starting -= 1
            doomed = self._forget(server) if self._closed else None
            if doomed is None:
                self._idle.append(server)
            self._condition.notify_all()
        if doomed is not None:
            kill_process_groups([doomed])
            if raise_errors:
                raise AppWorldRuntimeError(f"{self} was closed while a server was starting")
        return doomed is None

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
