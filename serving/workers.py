"""Sessions of the environment service: one environment per worker process.

Each session's environment lives in its own process, started from a forkserver that has
already imported gymnasium and the environment modules (so a worker costs a fork, not a
Python start-up). The server talks to a worker over a pipe, one JSON message per call:

    server -> worker   ["reset", {"seed": 3, "options": {"task_id": "..."}}]
    worker -> server   ["ok", {"observation": "...", "info": {...}}]
                       ["error", "ValueError", "unknown task id 'x'"]

A crashing environment therefore ends only its own session (:class:`WorkerDied`), a call that
runs past its timeout stops the worker (:class:`WorkerTimeout`), the number of live sessions is
bounded (:class:`PoolFull`, never a queue), idle sessions are reaped, and :meth:`SessionPool.shutdown`
closes every environment. JSON on the pipe keeps results exactly what the HTTP layer can send and
means the server never unpickles anything a worker wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import types
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

import anyio
import anyio.to_thread

log = logging.getLogger("eprl.serving")

# A worker reply larger than this is refused (the session ends) instead of exhausting memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Read by serving._preload inside the forkserver: comma-separated modules to import once.
PRELOAD_ENV_VAR = "EPRL_SERVING_PRELOAD"
_START_LOCK = threading.Lock()  # multiprocessing's Process.start() is not safe across threads


class WorkerError(Exception):
    """Base class of everything a worker call can raise."""


class WorkerDied(WorkerError):
    """The worker process ended (crash, kill, out of memory) while it held a session."""


class WorkerTimeout(WorkerError):
    """A call ran past its timeout; the worker was stopped, the session is over."""


class EnvCallError(WorkerError):
    """The environment raised; the worker (and its session) is still alive."""

    def __init__(self, exception_type: str, message: str) -> None:
        super().__init__(f"{exception_type}: {message}")
        self.exception_type = exception_type
        self.message = message


class PoolFull(WorkerError):
    """Every session slot is taken; the caller should retry after ``retry_after_s``."""

    def __init__(self, max_sessions: int, retry_after_s: int) -> None:
        super().__init__(
            f"all {max_sessions} session slots are in use; close a session or retry "
            f"in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class WorkerStartFailed(WorkerError):
    """No worker process could be started (the host is out of processes or memory)."""


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


# --------------------------------------------------------------------------------------------
# Worker side (runs in the child process)
# --------------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """Convert an env's info values into plain JSON values (numpy scalars and arrays included).

    Non-finite floats become the strings "nan", "inf", "-inf" (JSON has no such numbers);
    anything unknown becomes its ``str``.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else repr(float(value))
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(item) for item in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return jsonable(value.tolist())
    return str(value)


def space_spec(space: Any) -> dict[str, Any]:
    """Describe a gymnasium Text space as JSON (the only space the env contract uses)."""
    from gymnasium.spaces import Text

    if not isinstance(space, Text):
        raise TypeError(
            f"the service serves environments with Text spaces only, got {type(space).__name__}"
        )
    return {
        "type": "Text",
        "min_length": int(space.min_length),
        "max_length": int(space.max_length),
        "charset": "".join(sorted(space.character_set)),
    }


def _describe_env(env: Any) -> dict[str, Any]:
    unwrapped = env.unwrapped
    splits = list(getattr(unwrapped, "splits", []) or [])
    return {
        "observation_space": space_spec(env.observation_space),
        "action_space": space_spec(env.action_space),
        "splits": [str(split) for split in splits],
    }


def _encode(message: Any) -> bytes:
    # surrogatepass: an observation may carry lone surrogates (bytes decoded with
    # surrogateescape); they must survive the pipe exactly as the local env returned them.
    return json.dumps(message, ensure_ascii=False, allow_nan=False).encode("utf-8", "surrogatepass")


def _decode(data: bytes) -> Any:
    return json.loads(data.decode("utf-8", "surrogatepass"))


def _error_reply(exc: BaseException) -> list[Any]:
    return ["error", type(exc).__name__, str(exc) or type(exc).__name__]


def _op_reset(env: Any, seed: int | None = None, options: dict | None = None) -> dict[str, Any]:
    observation, info = env.reset(seed=seed, options=options)
    return {"observation": str(observation), "info": jsonable(info)}


def _op_step(env: Any, action: str) -> dict[str, Any]:
    observation, reward, terminated, truncated, info = env.step(action)
    reward = float(reward)
    if not math.isfinite(reward):
        raise ValueError(f"the environment returned a non-finite reward ({reward})")
    return {
        "observation": str(observation),
        "reward": reward,
        "terminated": bool(terminated),
        "truncated": bool(truncated),
        "info": jsonable(info),
    }


def _op_task_ids(env: Any, split: str) -> list[str]:
    return [str(task_id) for task_id in env.unwrapped.task_ids(split)]


_OPS: dict[str, Callable[..., Any]] = {
    "reset": _op_reset,
    "step": _op_step,
    "task_ids": _op_task_ids,
    "describe": lambda env: _describe_env(env),
}


def _import_modules(modules: tuple[str, ...]) -> None:
    for module in modules:
        importlib.import_module(module)


def _worker_main(
    conn: Connection, env_modules: tuple[str, ...], env_id: str, env_kwargs_json: str
) -> None:
    """Entry point of a session worker: build the env, then serve calls until close or EOF."""
    # Ctrl-C reaches the whole process group; the server closes its workers in order itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    env = None
    try:
        try:
            import gymnasium

            _import_modules(env_modules)
            env = gymnasium.make(env_id, **json.loads(env_kwargs_json))
            conn.send_bytes(_encode(["ok", _describe_env(env)]))
        except Exception as exc:
            conn.send_bytes(_encode(_error_reply(exc)))
            return
        while True:
            try:
                op, kwargs = _decode(conn.recv_bytes())
            except EOFError:
                return  # the server went away: fall through to env.close()
            if op == "close":
                env, closing = None, env
                try:
                    closing.close()
                    reply: list[Any] = ["ok", None]
                except Exception as exc:
                    reply = _error_reply(exc)
                conn.send_bytes(_encode(reply))
                return
            try:
                reply = ["ok", _OPS[op](env, **kwargs)]
            except Exception as exc:
                reply = _error_reply(exc)
            conn.send_bytes(_encode(reply))
    finally:
        if env is not None:
            with contextlib.suppress(Exception):
                env.close()


def _catalogue_entries(env_id: str) -> list[dict[str, Any]]:
    """Task sets of one env id: its module's ``catalogue()`` (the env contract), else a probe."""
    import gymnasium
    from gymnasium.envs.registration import registry

    spec = registry[env_id]
    if isinstance(spec.entry_point, str):
        module = importlib.import_module(spec.entry_point.split(":")[0])
        catalogue = getattr(module, "catalogue", None)
        if catalogue is not None:
            return [dict(entry) for entry in catalogue() if entry.get("env_id") == env_id]
    env = gymnasium.make(env_id)
    try:
        unwrapped = env.unwrapped
        splits = {split: len(unwrapped.task_ids(split)) for split in unwrapped.splits}
    finally:
        env.close()
    return [{"env_id": env_id, "task_set": None, "kwargs": {}, "splits": splits}]


def _job_catalogue(env_ids: list[str]) -> dict[str, Any]:
    result = {}
    for env_id in env_ids:
        try:
            entries = _catalogue_entries(env_id)
            result[env_id] = {"available": True, "error": None, "entries": jsonable(entries)}
        except Exception as exc:
            result[env_id] = {"available": False, "error": f"{type(exc).__name__}: {exc}"}
    return result


def _job_describe(env_id: str, env_kwargs: dict[str, Any]) -> dict[str, Any]:
    import gymnasium

    env = gymnasium.make(env_id, **env_kwargs)
    try:
        description = _describe_env(env)
        description["task_ids"] = {
            split: _op_task_ids(env, split) for split in description["splits"]
        }
        return description
    finally:
        env.close()


_JOBS: dict[str, Callable[..., Any]] = {"catalogue": _job_catalogue, "describe": _job_describe}


def _job_main(conn: Connection, env_modules: tuple[str, ...], job: str, args_json: str) -> None:
    """Entry point of a one-shot worker (catalogue, describe): run one job, reply, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _import_modules(env_modules)
        reply: list[Any] = ["ok", _JOBS[job](**json.loads(args_json))]
    except Exception as exc:
        reply = _error_reply(exc)
    conn.send_bytes(_encode(reply))


# --------------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------------


def _exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "ended without an exit status"
    if exitcode < 0:
        try:
            return f"was killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with status {exitcode}"


class Worker:
    """Server-side handle of one worker process. Blocking: call it from a thread.

    A worker serves one call at a time; the session lock above guarantees that.
    """

    def __init__(self, process: multiprocessing.process.BaseProcess, conn: Connection) -> None:
        self.process = process
        self.conn = conn

    @property
    def pid(self) -> int:
        return int(self.process.pid or 0)

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def _died(self, doing: str) -> WorkerDied:
        self.process.join(timeout=2.0)
        return WorkerDied(
            f"the worker process (pid {self.pid}) {_exit_description(self.process.exitcode)} "
            f"during {doing}"
        )

    def receive(self, timeout_s: float, doing: str) -> Any:
        """Wait for one reply; raise the matching :class:`WorkerError`."""
        try:
            ready = self.conn.poll(timeout_s)
        except (OSError, EOFError):
            raise self._died(doing) from None
        if not ready:
            self.kill()
            raise WorkerTimeout(
                f"{doing} did not finish within {timeout_s:g} s; the worker process "
                f"(pid {self.pid}) was stopped"
            )
        try:
            status, *payload = _decode(self.conn.recv_bytes(MAX_MESSAGE_BYTES))
        except (EOFError, ConnectionError):
            raise self._died(doing) from None
        except OSError as exc:  # reply over MAX_MESSAGE_BYTES: the pipe is unusable now
            self.kill()
            raise WorkerDied(f"{doing} returned an unusable reply ({exc})") from None
        if status == "ok":
            return payload[0]
        raise EnvCallError(payload[0], payload[1])

    def call(self, op: str, kwargs: dict[str, Any], timeout_s: float) -> Any:
        try:
            self.conn.send_bytes(_encode([op, kwargs]))
        except (OSError, ValueError):
            raise self._died(f"the time before {op}") from None
        return self.receive(timeout_s, op)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5.0)

    def close(self, timeout_s: float, *, ask: bool = True) -> None:
        """Ask the env to close (``ask``), then make sure the process is gone."""
        try:
            if ask and self.process.is_alive():
                self.call("close", {}, timeout_s)
        except WorkerError as exc:
            log.warning("closing worker %s: %s", self.pid, exc)
        finally:
            self.process.join(timeout=timeout_s)
            self.kill()
            self.conn.close()


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Hide the main script from multiprocessing while a worker starts (hold _START_LOCK).

    multiprocessing re-runs the main script (as ``__mp_main__``) in every child it starts from
    a script, so each worker would re-import whatever the script imports (FastAPI and uvicorn
    for ``eprl serve``: ~20 MB per session) and an unguarded script would start a second server
    in every worker. Workers need nothing from it: their targets live in this module.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _start_process(
    context: multiprocessing.context.BaseContext, target: Callable[..., None], args: tuple
) -> Worker:
    parent_conn, child_conn = context.Pipe(duplex=True)
    process = context.Process(target=target, args=(child_conn, *args), daemon=True)
    try:
        with _START_LOCK, _main_module_hidden():
            process.start()
    except OSError as exc:
        parent_conn.close()
        raise WorkerStartFailed(f"could not start a worker process: {exc}") from exc
    finally:
        child_conn.close()
    return Worker(process, parent_conn)


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
    "timeout", "shutdown".
    """

    def __init__(
        self,
        *,
        max_sessions: int,
        env_modules: tuple[str, ...] = ("envs",),
        preload_modules: tuple[str, ...] = (),
        call_timeout_s: float = 120.0,
        create_timeout_s: float = 120.0,
        idle_timeout_s: float = 600.0,
        reap_interval_s: float = 10.0,
        close_timeout_s: float = 10.0,
        retry_after_s: int = 2,
        start_method: Literal["forkserver", "spawn"] = "forkserver",
        on_session_end: SessionEndHook | None = None,
    ) -> None:
        self.max_sessions = max_sessions
        self.env_modules = tuple(env_modules)
        self.preload_modules = tuple(preload_modules)
        self.call_timeout_s = call_timeout_s
        self.create_timeout_s = create_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.reap_interval_s = reap_interval_s
        self.close_timeout_s = close_timeout_s
        self.retry_after_s = retry_after_s
        self.start_method = start_method
        self.on_session_end = on_session_end
        self.accepting = False
        self._context = multiprocessing.get_context(start_method)
        self._sessions: dict[str, Session] = {}
        # why each recently ended session ended, so a late call gets 410 with the reason, not 404
        self._ended: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self._job_lock = asyncio.Lock()  # one-shot jobs (catalogue, describe) run one at a time
        # every blocking call holds a thread: one per session plus closes and one-shot jobs
        self._limiter = anyio.CapacityLimiter(max_sessions + 16)
        self._reaper: asyncio.Task | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the forkserver (imports the env modules once) and the idle reaper."""
        if self.start_method == "forkserver":
            await self._in_thread(self._start_forkserver)
        self.accepting = True
        self._reaper = asyncio.create_task(self._reap_forever(), name="eprl-session-reaper")

    def _start_forkserver(self) -> None:
        from multiprocessing import forkserver

        modules = ("gymnasium", *self.env_modules, *self.preload_modules)
        os.environ[PRELOAD_ENV_VAR] = ",".join(dict.fromkeys(modules))
        self._context.set_forkserver_preload(["serving._preload"])
        forkserver.ensure_running()

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """Refuse new sessions, then close every environment (killing those that hang)."""
        self.accepting = False
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
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
            raise PoolClosed("the service is shutting down and accepts no new sessions")
        if len(self._sessions) >= self.max_sessions:
            raise PoolFull(self.max_sessions, self.retry_after_s)
        session = Session(uuid.uuid4().hex, env_id, dict(env_kwargs))
        self._sessions[session.session_id] = session  # holds the slot while the worker starts
        async with session.lock:
            try:
                worker = await self._in_thread(
                    _start_process,
                    self._context,
                    _worker_main,
                    (self.env_modules, env_id, json.dumps(env_kwargs)),
                )
                session.worker = worker
                session.description = await self._in_thread(
                    worker.receive, self.create_timeout_s, f"creation of {env_id}"
                )
            except BaseException:
                del self._sessions[session.session_id]
                if session.worker is not None:
                    await self._in_thread(session.worker.kill)
                    session.worker.conn.close()
                raise
            session.status = "ready"
            session.last_used = time.monotonic()
        log.info("session %s created: %s (pid %s)", session.session_id, env_id, worker.pid)
        return session

    async def call(self, session_id: str, op: str, **kwargs: Any) -> Any:
        """Run one env call (reset, step, task_ids, describe) in the session's worker."""
        session = self.get(session_id)
        if session.busy:
            raise SessionBusy(f"session {session_id} is busy with another call; retry after it")
        async with session.lock:
            self.get(session_id)  # it may have ended while this request waited for the lock
            assert session.worker is not None
            try:
                result = await self._in_thread(session.worker.call, op, kwargs, self.call_timeout_s)
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
                    exit_text = _exit_description(session.worker.process.exitcode)
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
                _start_process,
                self._context,
                _job_main,
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
