"""The session pool: at most ``max_sessions`` sessions, each one environment in a worker process.

A crashing environment ends only its own session (:class:`~serving.workers.WorkerDied`), a call
that runs past its timeout stops the worker (:class:`~serving.workers.WorkerTimeout`), the number
of live sessions is bounded (:class:`PoolFull`, never a queue), idle sessions are reaped, and
:meth:`SessionPool.shutdown` closes every environment. The worker processes themselves, and the
pipe protocol to them, are :mod:`serving.workers`; the workers kept warm for new sessions
(``warm_sessions``) are :mod:`serving.warm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.to_thread

from serving.warm import WarmSpec, WarmWorkers
from serving.workers import (
    PRELOAD_ENV_VAR,
    Worker,
    WorkerDied,
    WorkerError,
    WorkerTimeout,
    exit_description,
    job_main,
    start_process,
    token_hidden,
    worker_main,
)

log = logging.getLogger("eprl.serving")


class PoolFull(WorkerError):
    """Every session slot is taken; the caller should retry after ``retry_after_s``."""

    def __init__(self, max_sessions: int, retry_after_s: int) -> None:
        super().__init__(
            f"all {max_sessions} session slots are in use; close a session or retry "
            f"in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class PoolClosed(WorkerError):
    """The service is shutting down and accepts no new sessions."""


class SessionNotFound(WorkerError):
    """No session has this id (never created here, or forgotten long ago)."""


class SessionGone(WorkerError):
    """The session existed but has ended; ``reason`` says why (lost, idle, timeout, ...)."""

    def __init__(self, session_id: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.reason = reason


class SessionBusy(WorkerError):
    """Another call on the same session is still running (environments are single-threaded)."""


@dataclass(eq=False)
class Session:
    """One client session: an environment in a worker, plus bookkeeping for the API."""

    session_id: str
    env_id: str
    env_kwargs: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    status: Literal["starting", "ready", "closing"] = "starting"
    worker: Worker | None = None
    description: dict[str, Any] = field(default_factory=dict)
    episodes: int = 0
    steps: int = 0
    turn: int = 0
    task_id: str | None = None
    warm: bool = False  # its worker came from the warm pool (serving/warm.py)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def busy(self) -> bool:
        return self.lock.locked()

    @property
    def idle_s(self) -> float:
        return 0.0 if self.busy else time.monotonic() - self.last_used


SessionEndHook = Callable[[Session, str], None]


class SessionPool:
    """At most ``max_sessions`` live sessions, each one environment in its own worker process.

    Async API for the HTTP layer; the blocking pipe work runs in threads. ``on_session_end`` is
    called with (session, reason) whenever a session ends; reasons: "client", "idle", "lost",
    "timeout", "drain" (reset while draining), "shutdown".
    """

    def __init__(
        self,
        *,
        max_sessions: int,
        env_modules: tuple[str, ...] = ("envs",),
        preload_modules: tuple[str, ...] = (),
        call_timeout_s: float = 120.0,
        reset_timeout_s: float | None = None,
        create_timeout_s: float = 120.0,
        idle_timeout_s: float = 600.0,
        reap_interval_s: float = 10.0,
        close_timeout_s: float = 10.0,
        retry_after_s: int = 2,
        start_method: Literal["forkserver", "spawn"] = "forkserver",
        on_session_end: SessionEndHook | None = None,
        warm: tuple[WarmSpec, ...] = (),
    ) -> None:
        self.max_sessions = max_sessions
        self.env_modules = tuple(env_modules)
        self.preload_modules = tuple(preload_modules)
        self.call_timeout_s = call_timeout_s
        self.reset_timeout_s = reset_timeout_s
        self.create_timeout_s = create_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.reap_interval_s = reap_interval_s
        self.close_timeout_s = close_timeout_s
        self.retry_after_s = retry_after_s
        self.start_method = start_method
        self.on_session_end = on_session_end
        self.accepting = False
        self.draining = False
        self._context = multiprocessing.get_context(start_method)
        self._sessions: dict[str, Session] = {}
        # why each recently ended session ended, so a late call gets 410 with the reason, not 404
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._job_lock = asyncio.Lock()  # one-shot jobs (catalogue, describe) run one at a time
        # every blocking call holds a thread: one per session plus closes and one-shot jobs
        self._limiter = anyio.CapacityLimiter(max_sessions + 16)
        self._reaper: asyncio.Task | None = None
        # workers started and warmed before any client asks (serving/warm.py)
        self.warm = WarmWorkers(self, tuple(warm))
        self._warm_stop: asyncio.Task | None = None
        self.starts: dict[tuple[str, str], int] = {}  # (env id, "warm" | "cold") -> sessions

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the forkserver (imports the env modules once) and the idle reaper."""
        if self.start_method == "forkserver":
            await self._in_thread(self._start_forkserver)
        self.accepting = True
        self._reaper = asyncio.create_task(self._reap_forever(), name="eprl-session-reaper")
        self.warm.start()

    def _start_forkserver(self) -> None:
        from multiprocessing import forkserver

        modules = ("gymnasium", *self.env_modules, *self.preload_modules)
        os.environ[PRELOAD_ENV_VAR] = ",".join(dict.fromkeys(modules))
        self._context.set_forkserver_preload(["serving._preload"])
        # the forkserver's environment is every worker's starting one: no token in it
        with token_hidden():
            forkserver.ensure_running()

    def begin_drain(self) -> None:
        """Refuse new sessions; live ones finish their episodes (a reset ends the session)."""
        if not self.draining:
            self.draining = True
            self.accepting = False
            log.info("draining: no new sessions; %d live sessions may finish", self.active)
            if self.warm.running:  # no session will take them: give their memory back now
                self._warm_stop = asyncio.get_running_loop().create_task(self.warm.stop())

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Refuse new sessions, then close every environment (killing those that hang)."""
        self.accepting = False
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        await self.warm.stop()
        if self._warm_stop is not None:
            await self._warm_stop
        sessions = list(self._sessions.values())
        await asyncio.gather(*(self._shutdown_session(s, grace_s) for s in sessions))

    async def _shutdown_session(self, session: Session, grace_s: float) -> None:
        try:
            await asyncio.wait_for(session.lock.acquire(), grace_s)
        except TimeoutError:
            # a call is still running: stop its worker, the call then fails and releases the lock
            if session.worker is not None:
                await self._in_thread(session.worker.kill)
            await session.lock.acquire()
        try:
            await self._end(session, "shutdown", "the service shut down")
        finally:
            session.lock.release()

    # ---- queries ---------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._sessions)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def count_in_state(self, state: str) -> int:
        """Live sessions in ``state``: starting, ready (idle), busy (a call running), closing."""
        count = 0
        for session in self._sessions.values():
            current = session.status
            if current == "ready" and session.busy:
                current = "busy"
            count += current == state
        return count

    def get(self, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is not None and session.status == "ready":
            return session
        if session is not None:
            raise SessionGone(session_id, "closing", f"session {session_id} is being closed")
        if session_id in self._ended:
            reason, message = self._ended[session_id]
            raise SessionGone(session_id, reason, message)
        raise SessionNotFound(f"no session with id {session_id!r} on this server")

    # ---- session operations ----------------------------------------------------------------

    async def create(self, env_id: str, env_kwargs: dict[str, Any]) -> Session:
        if not self.accepting:
            what = "draining" if self.draining else "shutting down"
            raise PoolClosed(f"the service is {what} and accepts no new sessions")
        if len(self._sessions) >= self.max_sessions:
            raise PoolFull(self.max_sessions, self.retry_after_s)
        session = Session(uuid.uuid4().hex, env_id, dict(env_kwargs))
        self._sessions[session.session_id] = session  # holds the slot while the worker starts
        async with session.lock:
            try:
                warm = await self.warm.take(env_id, env_kwargs)
                if warm is not None:
                    session.worker, session.description = warm.worker, warm.description
                    session.warm = True
                else:
                    await self.warm.make_room()  # warm workers yield their slots to sessions
                    session.worker = await self._in_thread(
                        start_process,
                        self._context,
                        worker_main,
                        (self.env_modules, env_id, json.dumps(env_kwargs)),
                    )
                    session.description = await self._in_thread(
                        session.worker.receive, self.create_timeout_s, f"creation of {env_id}"
                    )
            except BaseException:
                del self._sessions[session.session_id]
                if session.worker is not None:
                    await self._in_thread(session.worker.kill)
                    session.worker.conn.close()
                raise
            session.status = "ready"
            session.last_used = time.monotonic()
        start = "warm" if session.warm else "cold"
        self.starts[env_id, start] = self.starts.get((env_id, start), 0) + 1
        log.info(
            "session %s created: %s (pid %s, %s)",
            session.session_id,
            env_id,
            session.worker.pid,
            start,
        )
        return session

    async def call(self, session_id: str, op: str, **kwargs: Any) -> Any:
        """Run one env call (reset or step) in the session's worker."""
        session = self.get(session_id)
        if session.busy:
            raise SessionBusy(f"session {session_id} is busy with another call; retry after it")
        async with session.lock:
            self.get(session_id)  # it may have ended while this request waited for the lock
            assert session.worker is not None
            if op == "reset" and self.draining:
                # the episode is over: free the slot so the client starts its next one elsewhere
                message = (
                    f"session {session_id} was closed at its reset: the service is draining; "
                    "start a new session (on another replica)"
                )
                await self._end(session, "drain", message)
                raise SessionGone(session_id, "drain", message)
            timeout_s = self.call_timeout_s
            if op == "reset" and self.reset_timeout_s is not None:
                timeout_s = self.reset_timeout_s
            try:
                result = await self._in_thread(session.worker.call, op, kwargs, timeout_s)
            except (WorkerTimeout, WorkerDied) as exc:
                message = f"session {session_id} ended: {exc}"
                reason = "timeout" if isinstance(exc, WorkerTimeout) else "lost"
                await self._end(session, reason, message)
                raise type(exc)(message) from None
            finally:
                session.last_used = time.monotonic()
            if op == "reset":
                session.episodes += 1
                session.turn = 0
                session.task_id = result["info"].get("task_id")
            elif op == "step":
                session.steps += 1
                session.turn = int(result["info"].get("turn", session.turn + 1))
            return result

    async def close(self, session_id: str, reason: str = "client") -> None:
        session = self.get(session_id)
        if session.busy:
            raise SessionBusy(f"session {session_id} is busy with another call; retry after it")
        async with session.lock:
            self.get(session_id)
            await self._end(session, reason, f"session {session_id} was closed by its client")

    async def _end(self, session: Session, reason: str, message: str) -> None:
        """Stop the session's worker and forget it; the caller holds the session lock."""
        session.status = "closing"
        try:
            if session.worker is not None:
                await self._in_thread(session.worker.close, self.close_timeout_s)
        finally:
            self._sessions.pop(session.session_id, None)
            self._ended[session.session_id] = (reason, message)
            while len(self._ended) > 10_000:
                self._ended.popitem(last=False)
            log.info("session %s ended (%s)", session.session_id, reason)
            self.warm.kick()  # a slot is free: a warm worker may start into it
            if self.on_session_end is not None:
                self.on_session_end(session, reason)

    # ---- reaping ---------------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval_s)
            try:
                await self.reap()
            except Exception:
                log.exception("session reaper")

    async def reap(self) -> None:
        """End sessions idle past ``idle_timeout_s`` and sessions whose worker died while idle."""
        for session in list(self._sessions.values()):
            if session.status != "ready" or session.busy or session.worker is None:
                continue
            async with session.lock:
                if session.status != "ready":
                    continue
                if not session.worker.is_alive():
                    await self._in_thread(session.worker.process.join, 1.0)
                    exit_text = exit_description(session.worker.process.exitcode)
                    await self._end(
                        session,
                        "lost",
                        f"session {session.session_id} ended: the worker process "
                        f"(pid {session.worker.pid}) {exit_text} while idle",
                    )
                elif time.monotonic() - session.last_used > self.idle_timeout_s:
                    await self._end(
                        session,
                        "idle",
                        f"session {session.session_id} was closed after "
                        f"{self.idle_timeout_s:g} s without calls",
                    )

    # ---- one-shot jobs ---------------------------------------------------------------------

    async def run_job(self, job: str, timeout_s: float | None = None, **kwargs: Any) -> Any:
        """Run ``job`` (catalogue, describe) in a fresh worker process and return its result."""
        async with self._job_lock:
            worker = await self._in_thread(
                start_process,
                self._context,
                job_main,
                (self.env_modules, job, json.dumps(kwargs)),
            )
            try:
                return await self._in_thread(
                    worker.receive, timeout_s or self.create_timeout_s, job
                )
            finally:
                await self._in_thread(functools.partial(worker.close, 5.0, ask=False))

    async def _in_thread(self, func: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)
