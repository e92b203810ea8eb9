"""Warm sessions: workers started and warmed up before any client asks, one pool per env id.

An AppWorld session's first reset would otherwise start its sandboxed AppWorld server cold
(process, sandbox, AppWorld's imports: seconds). For the env ids in ``warm_sessions`` the
service keeps that many workers whose env is already made, with the kwargs in
``warm_env_kwargs`` plus the pinned ones, and warmed (``env.unwrapped.warm()`` if the env has
one: AppWorld's starts a server and waits until it answers). A create whose kwargs are those
(keys left at the constructor's default aside) takes one (the session's ``worker_pid`` is the
warm worker's), and a replacement starts in the background; any other create starts cold.

Why whole workers rather than servers handed to cold workers: a warm AppWorld server belongs
to the runtime inside one worker process, so the worker is the unit that can be handed over
as it is, without reaching into any env.

Bounds: warm workers take ``max_sessions`` slots, so ``max_sessions`` bounds every env worker
of the replica (and its memory: an AppWorld one holds a ~400 MiB server); a create that finds
every slot held by sessions and warm workers evicts a warm worker, never refuses because of
one. Replacements start one at a time (a cold start competes for the CPU with live episodes)
and only into a free slot. A warm worker that dies while it waits is noticed at once (its pipe
becomes readable: a waiting worker never writes) and replaced; one that does not answer a ping
when taken is discarded, never handed out. Drain and shutdown close them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serving.workers import Worker, WorkerError, start_process, worker_main

if TYPE_CHECKING:
    from serving.pool import SessionPool
    from serving.schemas import RequestModels
    from serving.settings import ServeSettings

log = logging.getLogger("eprl.serving")

PING_TIMEOUT_S = 10.0
RETRY_FIRST_S, RETRY_MAX_S = 10.0, 300.0  # after a warm worker failed to start


def _canonical(kwargs: dict[str, Any], defaults: dict[str, str]) -> str:
    """``kwargs`` as one JSON string, keys at their constructor default left out."""
    kept = {
        key: value
        for key, value in kwargs.items()
        if defaults.get(key) != json.dumps(value, sort_keys=True)
    }
    return json.dumps(kept, sort_keys=True)


def _kwarg_path(loc: tuple) -> str:
    """The kwarg a validation issue is about (loc: [env id variant,] env_kwargs, name, ...)."""
    parts = [str(part) for part in loc]
    if "env_kwargs" in parts:
        parts = parts[parts.index("env_kwargs") + 1 :]
    return ".".join(parts) or "env_kwargs"


@dataclass(frozen=True)
class WarmSpec:
    """How many warm workers ``env_id`` keeps, and the kwargs they are made with."""

    env_id: str
    count: int
    env_kwargs: dict[str, Any]
    # constructor defaults as JSON (a session sending max_turns=40 matches one not sending it)
    defaults: dict[str, str] = field(default_factory=dict)

    def matches(self, env_id: str, env_kwargs: dict[str, Any]) -> bool:
        return env_id == self.env_id and _canonical(env_kwargs, self.defaults) == _canonical(
            self.env_kwargs, self.defaults
        )


def warm_specs(
    settings: ServeSettings, env_ids: tuple[str, ...], models: RequestModels
) -> tuple[WarmSpec, ...]:
    """The warm pools of ``settings``, their kwargs checked like a client's create request.

    Raises :class:`~serving.config.ServeConfigError` naming the env id and the bad kwarg.
    """
    from pydantic import TypeAdapter, ValidationError

    from serving.config import ServeConfigError
    from serving.routes import effective_kwargs
    from serving.schemas import env_kwargs_model

    adapter = TypeAdapter(models.create_session)
    specs = []
    for env_id, count in settings.warm_sessions.items():
        if count <= 0:
            continue
        if env_id not in env_ids:
            raise ServeConfigError(
                f"invalid serve config: warm_sessions: {env_id!r} is not registered here "
                f"(served: {list(env_ids)})"
            )
        given = settings.warm_env_kwargs.get(env_id, {})
        try:
            request = adapter.validate_python({"env_id": env_id, "env_kwargs": given})
        except ValidationError as err:
            problems = "; ".join(
                f"{_kwarg_path(issue['loc'])}: {issue['msg']} (got {issue.get('input')!r})"
                for issue in err.errors()
            )
            raise ServeConfigError(
                f"invalid serve config: warm_env_kwargs.{env_id}: {problems}"
            ) from None
        model = env_kwargs_model(env_id, settings.pinned_kwargs(env_id))
        defaults = {}
        if model is not None:
            for name, info in model.model_fields.items():
                if not info.is_required():
                    with contextlib.suppress(TypeError, ValueError):
                        defaults[name] = json.dumps(info.default, sort_keys=True)
        specs.append(WarmSpec(env_id, count, effective_kwargs(request, settings), defaults))
    return tuple(specs)


@dataclass(eq=False)
class _Ready:
    worker: Worker
    description: dict[str, Any]
    since: float = field(default_factory=time.time)


@dataclass(eq=False)
class _Starting:
    worker: Worker | None = None  # None until its process exists
    evicted: bool = False  # a session needed its slot: it is killed, its start fails


class WarmWorkers:
    """The warm pools of one :class:`~serving.pool.SessionPool` (see the module docstring).

    Runs on the pool's event loop; the blocking work runs in the pool's threads.
    """

    def __init__(self, pool: SessionPool, specs: tuple[WarmSpec, ...]) -> None:
        self.pool = pool
        self.specs = specs
        self.running = False
        self._ready: dict[str, list[_Ready]] = {spec.env_id: [] for spec in specs}
        self._starting: dict[str, _Starting] = {}  # env id -> the one starting (one at a time)
        self._not_before: dict[str, float] = {}  # env id -> monotonic time of the next try
        self._failures: dict[str, int] = {}
        self.discarded: dict[tuple[str, str], int] = {}  # (env id, reason) -> count
        self._filler: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()

    # ---- queries ---------------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Warm workers ready or starting (each holds a slot of max_sessions)."""
        starting = sum(not start.evicted for start in self._starting.values())
        return sum(map(len, self._ready.values())) + starting

    def ready_count(self, env_id: str) -> int:
        return len(self._ready.get(env_id, []))

    def starting_count(self, env_id: str) -> int:
        start = self._starting.get(env_id)
        return int(start is not None and not start.evicted)

    def ready_pids(self, env_id: str) -> list[int]:
        return [entry.worker.pid for entry in self._ready.get(env_id, [])]

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.running = bool(self.specs)
        self.kick()

    def kick(self) -> None:
        """Start warm workers into free slots (in the background), unless already doing so."""
        if self.running and (self._filler is None or self._filler.done()):
            self._filler = asyncio.get_running_loop().create_task(
                self._fill(), name="eprl-warm-workers"
            )

    async def stop(self) -> None:
        """Close every warm worker (one still starting is killed). Idempotent."""
        self.running = False  # a start whose process does not exist yet kills it when it does
        for start in list(self._starting.values()):
            if start.worker is not None:
                await self.pool._in_thread(start.worker.kill)  # its start then fails at once
        if self._filler is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
        entries = [entry for ready in self._ready.values() for entry in ready]
        for ready in self._ready.values():
            ready.clear()
        for entry in entries:
            self._unwatch(entry)
        await asyncio.gather(*(self._close(entry.worker) for entry in entries), *self._closing)

    # ---- what the pool asks ----------------------------------------------------------------

    async def take(self, env_id: str, env_kwargs: dict[str, Any]) -> _Ready | None:
        """A live warm worker made with these kwargs (removed from the pool), else None."""
        spec = next((s for s in self.specs if s.matches(env_id, env_kwargs)), None)
        if spec is None or not self.running:
            return None
        ready = self._ready[spec.env_id]
        while ready:
            entry = ready.pop(0)  # the longest waiting
            self._unwatch(entry)
            if await self.pool._in_thread(self._answers, entry.worker):
                self.kick()
                return entry
            self._count(spec.env_id, "died")
            await self._discard(entry.worker)
        self.kick()
        return None

    async def make_room(self) -> None:
        """Evict a warm worker while sessions and warm workers overfill max_sessions."""
        while self.pool.active + self.total > self.pool.max_sessions:
            starting = next(
                ((env_id, s) for env_id, s in self._starting.items() if not s.evicted), None
            )
            if starting is not None:  # not ready yet: the least work lost
                env_id, start = starting
                self._count(env_id, "evicted")
                start.evicted = True  # killed now, or as soon as its process exists
                if start.worker is not None:
                    await self.pool._in_thread(start.worker.kill)
                continue
            env_id, ready = max(
                self._ready.items(), key=lambda item: len(item[1]), default=("", [])
            )
            if not ready:
                return
            entry = ready.pop()
            self._unwatch(entry)
            self._count(env_id, "evicted")
            await self._close(entry.worker)

    # ---- filling ---------------------------------------------------------------------------

    def _wanted(self) -> WarmSpec | None:
        if self.pool.active + self.total >= self.pool.max_sessions:
            return None
        now = time.monotonic()
        for spec in self.specs:
            if len(self._ready[spec.env_id]) < spec.count and now >= self._not_before.get(
                spec.env_id, 0.0
            ):
                return spec
        return None

    async def _fill(self) -> None:
        try:
            while self.running and (spec := self._wanted()) is not None:
                start = self._starting[spec.env_id] = _Starting()  # holds the slot from now on
                try:
                    entry = await self._start(spec, start)
                except (WorkerError, OSError) as exc:
                    entry = None
                    if self.running and not start.evicted:
                        self._failed(spec, exc)
                finally:
                    self._starting.pop(spec.env_id, None)
                if entry is None:
                    continue
                if not self.running or start.evicted:  # stopped or evicted meanwhile
                    await self._close(entry.worker)
                    continue
                self._failures.pop(spec.env_id, None)
                self._ready[spec.env_id].append(entry)
                self._watch(spec.env_id, entry)
                log.info("warm worker ready: %s (pid %s)", spec.env_id, entry.worker.pid)
            self._schedule_retry()
        except Exception:
            log.exception("warm workers")

    async def _start(self, spec: WarmSpec, start: _Starting) -> _Ready:
        args = (self.pool.env_modules, spec.env_id, json.dumps(spec.env_kwargs), True)
        worker = await self.pool._in_thread(start_process, self.pool._context, worker_main, args)
        start.worker = worker
        timeout_s = self.pool.create_timeout_s + (
            self.pool.reset_timeout_s or self.pool.call_timeout_s
        )
        try:
            if start.evicted or not self.running:
                raise WorkerError("the warm worker was no longer wanted")
            description = await self.pool._in_thread(
                worker.receive, timeout_s, f"warm-up of {spec.env_id}"
            )
        except BaseException:
            await self._discard(worker)
            raise
        return _Ready(worker, description)

    def _failed(self, spec: WarmSpec, exc: BaseException) -> None:
        failures = self._failures.get(spec.env_id, 0) + 1
        self._failures[spec.env_id] = failures
        delay = min(RETRY_FIRST_S * 2 ** (failures - 1), RETRY_MAX_S)
        self._not_before[spec.env_id] = time.monotonic() + delay
        self._count(spec.env_id, "failed")
        log.warning(
            "a warm worker for %s failed to start (retry in %g s): %s", spec.env_id, delay, exc
        )

    def _schedule_retry(self) -> None:
        waits = [t - time.monotonic() for t in self._not_before.values() if t > time.monotonic()]
        if self.running and waits:
            asyncio.get_running_loop().call_later(min(waits) + 0.01, self.kick)

    # ---- watching the waiting ones ---------------------------------------------------------

    def _watch(self, env_id: str, entry: _Ready) -> None:
        """A waiting worker never writes to its pipe: readable means it died (EOF)."""
        callback = functools.partial(self._lost, env_id, entry)
        asyncio.get_running_loop().add_reader(entry.worker.conn.fileno(), callback)

    def _unwatch(self, entry: _Ready) -> None:
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(entry.worker.conn.fileno())

    def _lost(self, env_id: str, entry: _Ready) -> None:
        self._unwatch(entry)
        ready = self._ready.get(env_id, [])
        if entry not in ready:
            return
        ready.remove(entry)
        self._count(env_id, "died")
        log.warning(
            "warm worker %s (%s) died while waiting; replacing it", entry.worker.pid, env_id
        )
        task = asyncio.get_running_loop().create_task(self._discard(entry.worker))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        task.add_done_callback(lambda _: self.kick())

    @staticmethod
    def _answers(worker: Worker) -> bool:
        try:
            return worker.call("ping", {}, PING_TIMEOUT_S) == worker.pid
        except WorkerError:
            return False

    async def _close(self, worker: Worker) -> None:
        """Close the env (AppWorld: its runtime stops its servers, removes its directory)."""
        await self.pool._in_thread(worker.close, self.pool.close_timeout_s)

    async def _discard(self, worker: Worker) -> None:
        """SIGKILL (its sandboxes die with it: bubblewrap's --die-with-parent) and reap."""

        def discard() -> None:
            worker.kill()
            worker.conn.close()

        await self.pool._in_thread(discard)

    def _count(self, env_id: str, reason: str) -> None:
        key = (env_id, reason)
        self.discarded[key] = self.discarded.get(key, 0) + 1


class WarmMetrics:
    """Prometheus collector of the warm pools and of how sessions started (warm or cold)."""

    def __init__(self, pool: SessionPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Any]:
        warm = self.pool.warm
        workers = GaugeMetricFamily(
            "eprl_warm_workers",
            "warm workers by env id and state (ready: waiting for a session; starting)",
            labels=["env_id", "state"],
        )
        discarded = CounterMetricFamily(
            "eprl_warm_workers_discarded",
            "warm workers lost before a session took them, by reason (died, failed, evicted)",
            labels=["env_id", "reason"],
        )
        for spec in warm.specs:
            workers.add_metric([spec.env_id, "ready"], warm.ready_count(spec.env_id))
            workers.add_metric([spec.env_id, "starting"], warm.starting_count(spec.env_id))
            for reason in ("died", "failed", "evicted"):
                discarded.add_metric(
                    [spec.env_id, reason], warm.discarded.get((spec.env_id, reason), 0)
                )
        started = CounterMetricFamily(
            "eprl_sessions_started",
            "sessions created, by how their worker started (warm: taken from the warm pool)",
            labels=["env_id", "start"],
        )
        for (env_id, start), count in sorted(self.pool.starts.items()):
            started.add_metric([env_id, start], count)
        yield workers
        yield discarded
        yield started
