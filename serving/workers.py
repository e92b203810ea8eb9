"""Worker processes of the environment service: one environment per process.

Each session's environment lives in its own process, started from a forkserver that has
already imported gymnasium and the environment modules (so a worker costs a fork, not a
Python start-up). The server talks to a worker over a pipe, one JSON message per call:

    server -> worker   ["reset", {"seed": 3, "options": {"task_id": "..."}}]
    worker -> server   ["ok", {"observation": "...", "info": {...}}]
                       ["error", "ValueError", "unknown task id 'x'"]

This module holds both ends: what runs in the child (:func:`worker_main` for a session,
:func:`job_main` for a one-shot catalogue or describe) and the server's blocking handle on it
(:class:`Worker`), with the errors a call can end in. JSON on the pipe keeps results exactly
what the HTTP layer can send and means the server never unpickles anything a worker wrote.
Sessions, their bound and their lifetimes are :mod:`serving.pool`.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import types
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from envs.defaults import env_defaults
from serving.settings import TOKEN_ENV_VAR

log = logging.getLogger("eprl.serving")

# A worker reply larger than this is refused (the session ends) instead of exhausting memory.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Read by serving._preload inside the forkserver: comma-separated modules to import once.
PRELOAD_ENV_VAR = "EPRL_SERVING_PRELOAD"
_START_LOCK = threading.Lock()  # multiprocessing's Process.start() is not safe across threads
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)  # resolved at import: a forked child must not dlopen


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


class WorkerStartFailed(WorkerError):
    """No worker process could be started (the host is out of processes or memory)."""


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
    """Spaces and splits of a session's env (what the server keeps with the session)."""
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


def _op_truncate(env: Any, reason: str) -> dict[str, Any]:
    """Grade the cut episode where the env can (``truncate(reason) -> (reward, info)``)."""
    grade = getattr(env.unwrapped, "truncate", None)
    if not callable(grade):
        return {"graded": False, "reward": 0.0, "info": {}}
    reward, info = grade(reason)
    reward = float(reward)
    if not math.isfinite(reward):
        raise ValueError(f"the environment graded the cut episode {reward} (not finite)")
    return {"graded": True, "reward": reward, "info": jsonable(info)}


def _op_ping(env: Any) -> int:
    """Proof of life before a warm worker is handed to a session (serving/warm.py)."""
    return os.getpid()


_OPS: dict[str, Callable[..., Any]] = {
    "reset": _op_reset,
    "step": _op_step,
    "truncate": _op_truncate,
    "ping": _op_ping,
}


def _warm_up(env: Any) -> None:
    """Start now what the env's first reset would start cold (its ``warm()``, if it has one:
    AppWorld's starts and waits for a sandboxed server), for a warm worker."""
    warm = getattr(env.unwrapped, "warm", None)
    if callable(warm):
        warm()


def _die_with_parent() -> None:
    """SIGKILL this worker when its parent (the forkserver, or the server) goes away.

    A server killed with SIGKILL runs no cleanup; its forkserver then exits, and without this
    its workers would keep running environment code for nobody. Their sandboxes follow them
    (bubblewrap's --die-with-parent).
    """
    parent = os.getppid()
    with contextlib.suppress(AttributeError):  # not Linux: no parent-death signal
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _import_modules(modules: tuple[str, ...]) -> None:
    for module in modules:
        importlib.import_module(module)


def worker_main(
    conn: Connection,
    env_modules: tuple[str, ...],
    env_id: str,
    env_kwargs_json: str,
    warm: bool = False,
) -> None:
    """Entry point of a session worker: build the env, then serve calls until close or EOF.

    A ``warm`` worker also warms its env up (:func:`_warm_up`) before it reports ready, then
    waits, unowned, until the pool hands it to a session (``serving/warm.py``).
    """
    # Env code runs here: it gets no bearer token, and neither does anything it starts.
    os.environ.pop(TOKEN_ENV_VAR, None)
    # Ctrl-C reaches the whole process group; the server closes its workers in order itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    env = None
    try:
        try:
            import gymnasium

            _import_modules(env_modules)
            env = gymnasium.make(env_id, **json.loads(env_kwargs_json))
            if warm:
                _warm_up(env)
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
            split: [str(task_id) for task_id in env.unwrapped.task_ids(split)]
            for split in description["splits"]
        }
        description["defaults"] = {key: jsonable(value) for key, value in env_defaults(env).items()}
        return description
    finally:
        env.close()


_JOBS: dict[str, Callable[..., Any]] = {"catalogue": _job_catalogue, "describe": _job_describe}


def job_main(conn: Connection, env_modules: tuple[str, ...], job: str, args_json: str) -> None:
    """Entry point of a one-shot worker (catalogue, describe): run one job, reply, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    try:
        _import_modules(env_modules)
        reply: list[Any] = ["ok", _JOBS[job](**json.loads(args_json))]
    except Exception as exc:
        reply = _error_reply(exc)
    conn.send_bytes(_encode(reply))


# --------------------------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------------------------


def exit_description(exitcode: int | None) -> str:
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

    A worker serves one call at a time; the session's lock (serving.pool) guarantees that.
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
            f"the worker process (pid {self.pid}) {exit_description(self.process.exitcode)} "
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


@contextlib.contextmanager
def token_hidden() -> Iterator[None]:
    """Keep the bearer token out of the environment a worker starts with (hold _START_LOCK):
    a spawned worker, or a forkserver started on demand, copies this process's environment,
    and ``/proc/<pid>/environ`` would show it for the worker's whole life."""
    token = os.environ.pop(TOKEN_ENV_VAR, None)
    try:
        yield
    finally:
        if token is not None:
            os.environ[TOKEN_ENV_VAR] = token


def start_process(
    context: multiprocessing.context.BaseContext, target: Callable[..., None], args: tuple
) -> Worker:
    parent_conn, child_conn = context.Pipe(duplex=True)
    process = context.Process(target=target, args=(child_conn, *args), daemon=True)
    try:
        with _START_LOCK, _main_module_hidden(), token_hidden():
            process.start()
    except OSError as exc:
        parent_conn.close()
        raise WorkerStartFailed(f"could not start a worker process: {exc}") from exc
    finally:
        child_conn.close()
    return Worker(process, parent_conn)
