"""The service's routes (all JSON; ``/docs`` shows the OpenAPI page)::

    POST   /v1/sessions                     create a session {env_id, env_kwargs} -> 201 SessionInfo
    GET    /v1/sessions                     list sessions
    GET    /v1/sessions/{session_id}        a session's state and limits
    POST   /v1/sessions/{session_id}/reset  {seed, options: {task_id}} -> {observation, info}
    POST   /v1/sessions/{session_id}/step   {action} -> {observation, reward, terminated, truncated, info}
    DELETE /v1/sessions/{session_id}        close the session (its env and worker process)
    GET    /v1/envs                         catalogue: env ids, task sets, splits, task counts
    POST   /v1/envs/describe                {env_id, env_kwargs} -> spaces, splits, task ids, defaults
    GET    /healthz                         liveness and readiness (never needs the token)
    GET    /metrics                         Prometheus text format

Handlers get what they work on (the pool, the settings, the metrics, the env caches) through
FastAPI dependencies that read ``app.state``, so a route can be exercised on its own by
overriding them (``app.dependency_overrides[get_pool] = ...``). The request bodies are built
per settings (:func:`serving.schemas.request_models`), hence :func:`build_router`.
"""

import json
import time
from collections import OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from serving import workers
from serving.errors import SafeJSONResponse, env_create_failed, error_responses, pool_error
from serving.middleware import ServiceMetrics
from serving.pool import Session, SessionPool
from serving.schemas import (
    SESSION_ID_PATTERN,
    Catalogue,
    CatalogueEnv,
    CloseResponse,
    EnvDescription,
    Health,
    RequestModels,
    ResetRequest,
    ResetResponse,
    SessionInfo,
    SessionLimits,
    SessionList,
    StepResponse,
    TruncateRequest,
    TruncateResponse,
)
from serving.settings import ServeSettings

# an env whose catalogue failed (e.g. its data was missing) is asked again after this long
CATALOGUE_RETRY_S = 60.0
MAX_CACHED_DESCRIPTIONS = 256


@dataclass
class EnvCaches:
    """The served env ids and what one-shot jobs found out about them (each job forks a worker)."""

    env_ids: tuple[str, ...]
    # env id -> (monotonic time of the job, its catalogue entry)
    catalogue: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    # json [env id, kwargs] -> description, least recently added first
    descriptions: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)


def get_pool(request: Request) -> SessionPool:
    """Dependency: the app's session pool (override it to test a route on its own)."""
    return request.app.state.pool


def get_settings(request: Request) -> ServeSettings:
    """Dependency: the app's settings (override it to test a route on its own)."""
    return request.app.state.settings


def get_metrics(request: Request) -> ServiceMetrics:
    """Dependency: the app's Prometheus metrics (override it to test a route on its own)."""
    return request.app.state.metrics


def get_env_caches(request: Request) -> EnvCaches:
    """Dependency: the served env ids and the catalogue and describe caches (override it to test a route on its own)."""
    return request.app.state.env_caches


Pool = Annotated[SessionPool, Depends(get_pool)]
Settings = Annotated[ServeSettings, Depends(get_settings)]
Metrics = Annotated[ServiceMetrics, Depends(get_metrics)]
Caches = Annotated[EnvCaches, Depends(get_env_caches)]
SessionId = Annotated[str, Path(pattern=SESSION_ID_PATTERN, description="32 hex digits")]


def effective_kwargs(request: Any, settings: ServeSettings) -> dict[str, Any]:
    """The client's kwargs (only those it set, so env defaults apply) plus the pinned ones."""
    kwargs = request.env_kwargs
    if isinstance(kwargs, BaseModel):
        kwargs = kwargs.model_dump(exclude_unset=True)
    pinned = settings.pinned_kwargs(request.env_id)
    return {**kwargs, **{key: value for key, value in pinned.items() if value is not None}}


def session_info(session: Session, settings: ServeSettings) -> SessionInfo:
    """The API's view of a session: its state, its env's spaces and the limits of its calls."""
    description = session.description
    return SessionInfo(
        session_id=session.session_id,
        env_id=session.env_id,
        env_kwargs=session.env_kwargs,
        status="busy" if session.busy and session.status == "ready" else session.status,
        created_at=session.created_at,
        idle_s=session.idle_s,
        episodes=session.episodes,
        steps=session.steps,
        turn=session.turn,
        task_id=session.task_id,
        worker_pid=session.worker.pid if session.worker is not None else None,
        observation_space=description.get("observation_space"),
        action_space=description.get("action_space"),
        splits=description.get("splits", []),
        limits=SessionLimits(
            max_action_chars=settings.max_action_chars,
            max_body_bytes=settings.max_body_bytes,
            call_timeout_s=settings.call_timeout_s,
            reset_timeout_s=settings.timeout_of("reset"),
            idle_timeout_s=settings.idle_timeout_s,
        ),
    )


# error codes of a call counted here as the env failing (eprl_env_errors_total{kind}); a lost
# or timed-out worker is counted when its session ends (serving.app), however it was noticed
_ENV_ERROR_KINDS = frozenset({"env_error"})


async def timed_session_call(
    pool: SessionPool, metrics: ServiceMetrics, session_id: str, op: str, **kwargs: Any
) -> tuple[Any, str, float]:
    """One env call on a live session, its latency recorded under ``op``: (result, env id,
    seconds)."""
    env_id = live_session(pool, session_id).env_id
    started = time.perf_counter()
    result = await pool_call(
        pool.call(session_id, op, **kwargs), session_id, env_id=env_id, metrics=metrics
    )
    elapsed = time.perf_counter() - started
    metrics.env_call_seconds.labels(op).observe(elapsed)
    return result, env_id, elapsed


async def pool_call(
    call: Awaitable[Any],
    session_id: str | None = None,
    *,
    env_id: str | None = None,
    metrics: ServiceMetrics | None = None,
) -> Any:
    """Await a pool call; what the pool raises becomes the matching ApiError (counted by env
    and kind in ``metrics`` when it is the env's failure rather than a refusal)."""
    try:
        return await call
    except workers.WorkerError as exc:
        error = pool_error(exc, session_id)
        if metrics is not None and env_id is not None and error.body.error in _ENV_ERROR_KINDS:
            metrics.env_errors.labels(env_id, error.body.error).inc()
        raise error from None


def live_session(pool: SessionPool, session_id: str) -> Session:
    """The ready session ``session_id``, else the ApiError saying why not (404, 410)."""
    try:
        return pool.get(session_id)
    except workers.WorkerError as exc:
        raise pool_error(exc, session_id) from None


def _session_links(source: str) -> dict[str, Any]:
    """OpenAPI links from a response carrying a session id to the session's operations.

    ``source`` is "$response.body" (create) or "$request.path" (reset); clients and stateful
    fuzzers follow them to exercise real sessions.
    """
    expression = (
        f"{source}#/session_id" if source.startswith("$response") else f"{source}.session_id"
    )
    return {
        operation: {"operationId": operation, "parameters": {"session_id": expression}}
        for operation in ("reset_session", "step_session", "get_session", "close_session")
    }


def build_router(models: RequestModels) -> APIRouter:
    """Every route of the service, with ``models`` as the bodies of create, describe and step."""
    router = APIRouter()

    @router.post(
        "/v1/sessions",
        status_code=201,
        response_model=SessionInfo,
        responses={
            **error_responses(400, 413, 422, 429, 503, 504),
            201: {"description": "The new session", "links": _session_links("$response.body")},
        },
        operation_id="create_session",
        tags=["sessions"],
        summary="Create a session: one environment in its own worker process",
    )
    async def create_session(
        request: models.create_session,  # type: ignore[valid-type]
        pool: Pool,
        settings: Settings,
        metrics: Metrics,
    ) -> SessionInfo:
        started = time.perf_counter()
        try:
            session = await pool.create(request.env_id, effective_kwargs(request, settings))
        except (workers.EnvCallError, workers.WorkerDied) as exc:
            metrics.env_errors.labels(request.env_id, "env_create_failed").inc()
            raise env_create_failed(request.env_id, exc) from None
        except workers.WorkerError as exc:
            raise pool_error(exc, None) from None
        metrics.env_call_seconds.labels("create").observe(time.perf_counter() - started)
        metrics.sessions_created.labels(request.env_id).inc()
        return session_info(session, settings)

    @router.get(
        "/v1/sessions",
        response_model=SessionList,
        responses=error_responses(),
        operation_id="list_sessions",
        tags=["sessions"],
    )
    async def list_sessions(pool: Pool, settings: Settings) -> SessionList:
        sessions = [session_info(s, settings) for s in pool.sessions()]
        return SessionList(sessions=sessions, active=pool.active, max_sessions=pool.max_sessions)

    @router.get(
        "/v1/sessions/{session_id}",
        response_model=SessionInfo,
        responses=error_responses(404, 410, 422),
        operation_id="get_session",
        tags=["sessions"],
        summary="A session's state and limits",
    )
    async def get_session(session_id: SessionId, pool: Pool, settings: Settings) -> SessionInfo:
        return session_info(live_session(pool, session_id), settings)

    @router.post(
        "/v1/sessions/{session_id}/reset",
        response_model=ResetResponse,
        responses={
            **error_responses(400, 404, 409, 410, 413, 422, 504),
            200: {"description": "First observation", "links": _session_links("$request.path")},
        },
        operation_id="reset_session",
        tags=["sessions"],
    )
    async def reset_session(
        session_id: SessionId, request: ResetRequest, pool: Pool, metrics: Metrics
    ) -> dict[str, Any]:
        options = request.options.model_dump(exclude_none=True) if request.options else None
        result, env_id, _ = await timed_session_call(
            pool, metrics, session_id, "reset", seed=request.seed, options=options
        )
        metrics.resets.labels(env_id).inc()
        return result  # validated once, against response_model, by FastAPI

    @router.post(
        "/v1/sessions/{session_id}/step",
        response_model=StepResponse,
        responses=error_responses(400, 404, 409, 410, 413, 422, 504),
        operation_id="step_session",
        tags=["sessions"],
    )
    async def step_session(
        session_id: SessionId,
        request: models.step,  # type: ignore[valid-type]
        pool: Pool,
        metrics: Metrics,
    ) -> dict[str, Any]:
        result, env_id, elapsed = await timed_session_call(
            pool, metrics, session_id, "step", action=request.action
        )
        metrics.step_seconds.labels(env_id).observe(elapsed)
        metrics.steps.labels(env_id).inc()
        return result

    @router.post(
        "/v1/sessions/{session_id}/truncate",
        response_model=TruncateResponse,
        responses=error_responses(400, 404, 409, 410, 413, 422, 504),
        operation_id="truncate_session",
        tags=["sessions"],
    )
    async def truncate_session(
        session_id: SessionId, request: TruncateRequest, pool: Pool, metrics: Metrics
    ) -> dict[str, Any]:
        """Cut the running episode (the client's context or turn limit) and grade it as it
        stands, where the env can (AppWorld: the task's tests on the last state)."""
        result, _, _ = await timed_session_call(
            pool, metrics, session_id, "truncate", reason=request.reason
        )
        return result

    @router.delete(
        "/v1/sessions/{session_id}",
        response_model=CloseResponse,
        responses=error_responses(404, 409, 410, 422),
        operation_id="close_session",
        tags=["sessions"],
    )
    async def close_session(session_id: SessionId, pool: Pool) -> CloseResponse:
        await pool_call(pool.close(session_id), session_id)
        return CloseResponse(session_id=session_id, closed=True)

    @router.get(
        "/v1/envs",
        response_model=Catalogue,
        responses=error_responses(503, 504),
        operation_id="catalogue",
        tags=["environments"],
        summary="Served environments with their task sets, splits and task counts",
    )
    async def catalogue(pool: Pool, caches: Caches) -> Catalogue:
        now = time.monotonic()
        cached = caches.catalogue
        stale = [
            env_id
            for env_id in caches.env_ids
            if env_id not in cached
            or (not cached[env_id][1]["available"] and now - cached[env_id][0] > CATALOGUE_RETRY_S)
        ]
        if stale:
            result = await pool_call(pool.run_job("catalogue", env_ids=stale))
            for env_id, entry in result.items():
                cached[env_id] = (now, entry)
        return Catalogue(
            envs=[CatalogueEnv(env_id=env_id, **cached[env_id][1]) for env_id in caches.env_ids]
        )

    @router.post(
        "/v1/envs/describe",
        response_model=EnvDescription,
        responses=error_responses(400, 413, 422, 503, 504),
        operation_id="describe_env",
        tags=["environments"],
        summary="Spaces, splits, task ids and budgets of an env id with given constructor kwargs",
    )
    async def describe_env(
        request: models.describe,  # type: ignore[valid-type]
        pool: Pool,
        settings: Settings,
        caches: Caches,
    ) -> EnvDescription:
        """What a client needs before its first reset, so ``RemoteEnv`` asks it in its constructor.

        The env's spaces, its splits with their task ids, and ``defaults``: the budgets the env
        declares as ``env.unwrapped.defaults`` (max_turns, max_new_tokens of one turn,
        max_context_tokens, max_parallel_episodes), derived from its ``max_turns`` when it
        declares none.
        """
        env_kwargs = effective_kwargs(request, settings)
        key = json.dumps([request.env_id, env_kwargs], sort_keys=True)
        if key not in caches.descriptions:
            try:
                description = await pool.run_job(
                    "describe", env_id=request.env_id, env_kwargs=env_kwargs
                )
            except workers.EnvCallError as exc:
                raise env_create_failed(request.env_id, exc) from None
            except workers.WorkerError as exc:
                raise pool_error(exc, None) from None
            caches.descriptions[key] = description
            while len(caches.descriptions) > MAX_CACHED_DESCRIPTIONS:
                caches.descriptions.popitem(last=False)
        description = caches.descriptions[key]
        return EnvDescription(env_id=request.env_id, env_kwargs=env_kwargs, **description)

    @router.get(
        "/healthz",
        response_model=Health,
        responses={
            503: {"model": Health, "description": "Not ready (starting, draining or stopping)"}
        },
        operation_id="health",
        tags=["service"],
        summary="Liveness and readiness (no token needed)",
    )
    async def healthz(pool: Pool) -> SafeJSONResponse:
        if pool.accepting:
            status: Literal["ok", "draining", "shutting_down", "starting"] = "ok"
        elif pool.draining:
            status = "draining"
        else:
            status = "starting" if pool.active == 0 else "shutting_down"
        health = Health(
            status=status,
            sessions_active=pool.active,
            max_sessions=pool.max_sessions,
            accepting_sessions=pool.accepting,
        )
        return SafeJSONResponse(health.model_dump(), status_code=200 if pool.accepting else 503)

    @router.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {
                "content": {"text/plain": {"schema": {"type": "string"}}},
                "description": "Prometheus text format",
            },
            401: {
                "description": "Missing or wrong bearer token",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                },
            },
        },
        operation_id="metrics",
        tags=["service"],
    )
    async def prometheus_metrics(metrics: Metrics) -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
