"""The environment service: FastAPI over :class:`serving.workers.SessionPool`.

``create_app(settings)`` builds the ASGI app; ``serve(host, port, token, ...)`` runs it with
uvicorn (``eprl serve``). Routes (all JSON; ``/docs`` shows the OpenAPI page)::

    POST   /v1/sessions                     create a session {env_id, env_kwargs} -> 201 SessionInfo
    GET    /v1/sessions                     list sessions
    GET    /v1/sessions/{session_id}        a session's state and limits
    POST   /v1/sessions/{session_id}/reset  {seed, options: {task_id}} -> {observation, info}
    POST   /v1/sessions/{session_id}/step   {action} -> {observation, reward, terminated, truncated, info}
    DELETE /v1/sessions/{session_id}        close the session (its env and worker process)
    GET    /v1/envs                         catalogue: env ids, task sets, splits, task counts
    POST   /v1/envs/describe                {env_id, env_kwargs} -> spaces, splits and task ids
    GET    /healthz                         liveness and readiness (never needs the token)
    GET    /metrics                         Prometheus text format

Every error is a JSON :class:`ErrorBody` with a 4xx status naming the problem (5xx only for a
call that timed out or the service shutting down); no response ever carries a stack trace.
"""

import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import os
import re
import socket
import time
import typing
from collections import OrderedDict
from collections.abc import Awaitable, Iterable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, Union

from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SecretStr,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import workers
from serving.workers import SessionPool

log = logging.getLogger("eprl.serving")

TOKEN_ENV_VAR = "EPRL_TOKEN"
MIN_TOKEN_CHARS = 16
SESSION_ID_PATTERN = r"^[0-9a-f]{32}$"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False  # unresolvable: treat as exposed
    return bool(addresses) and all(
        ipaddress.ip_address(address.split("%")[0]).is_loopback for address in addresses
    )


class ServeSettings(BaseModel):
    """Everything the service is configured by (``eprl serve`` flags map onto these)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # bearer token; required whenever host is not a loopback address
    token: SecretStr | None = None
    max_sessions: int = Field(64, ge=1, le=4096)
    # served env ids; None = every registered eprl/* id except eprl/Remote-v0 (a remote env
    # inside the service would let clients make it connect anywhere)
    env_ids: tuple[str, ...] | None = None
    # modules imported to register env ids (in the server and, preloaded, in every worker)
    env_modules: tuple[str, ...] = ("envs",)
    call_timeout_s: float = Field(120.0, gt=0)
    create_timeout_s: float = Field(120.0, gt=0)
    idle_timeout_s: float = Field(600.0, gt=0)
    reap_interval_s: float = Field(10.0, gt=0)
    shutdown_grace_s: float = Field(10.0, ge=0)
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    max_action_chars: int = Field(262_144, ge=1)
    max_env_kwargs: int = Field(64, ge=0)
    # kwargs clients may not send; the server passes its value (None: not passed, the env's
    # default applies). These choose things on this host: CodeExec's `sandbox` could select the
    # weaker rlimits-only isolation or another interpreter, AppWorld's `python`, `root` and
    # `server_urls` a program, a directory or where to connect.
    pinned_env_kwargs: dict[str, dict[str, JsonValue]] = Field(
        default_factory=lambda: {
            "eprl/CodeExec-v0": {"sandbox": None},
            "eprl/AppWorld-v0": {"python": None, "root": None, "server_urls": None},
        }
    )
    retry_after_s: int = Field(2, ge=1)
    start_method: Literal["forkserver", "spawn"] = "forkserver"

    @field_validator("token")
    @classmethod
    def _token_is_usable(cls, token: SecretStr | None) -> SecretStr | None:
        if token is None or not token.get_secret_value():
            return None
        value = token.get_secret_value()
        if len(value) < MIN_TOKEN_CHARS or not value.isascii() or not value.isprintable():
            raise ValueError(
                f"the token must be at least {MIN_TOKEN_CHARS} printable ASCII characters "
                "without spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        if " " in value:
            raise ValueError("the token must not contain spaces")
        return token

    @model_validator(mode="after")
    def _token_required_off_loopback(self) -> "ServeSettings":
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on {self.host!r} without a token: binding to a non-loopback "
                f"address requires a bearer token (--token or the {TOKEN_ENV_VAR} environment "
                "variable), or bind to 127.0.0.1"
            )
        return self


def served_env_ids(settings: ServeSettings) -> tuple[str, ...]:
    """The env ids this service will create sessions for."""
    from gymnasium.envs.registration import registry

    for module in settings.env_modules:
        __import__(module)
    if settings.env_ids is not None:
        unknown = [env_id for env_id in settings.env_ids if env_id not in registry]
        if unknown:
            raise ValueError(f"env ids not registered with gymnasium: {unknown}")
        return tuple(settings.env_ids)
    return tuple(
        sorted(
            env_id
            for env_id in registry
            if env_id.startswith("eprl/") and env_id != "eprl/Remote-v0"
        )
    )


# --------------------------------------------------------------------------------------------
# Request and response models
# --------------------------------------------------------------------------------------------


def _check_text(value: Any, where: str) -> None:
    """Reject lone surrogates (valid JSON escapes, but not Unicode text an env can use)."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where} contains a lone surrogate (not valid Unicode)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check_text(item, where)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _text_ok(model: BaseModel) -> BaseModel:
    for name in type(model).model_fields:
        _check_text(getattr(model, name), name)
    return model


def _model_name(env_id: str) -> str:
    """ "eprl/CodeExec-v0" -> "CodeExecV0" (a readable schema name per env id)."""
    name = env_id.split("/")[-1]
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[^0-9A-Za-z]+", name))


def env_kwargs_model(env_id: str, pinned: Iterable[str] = ()) -> type[BaseModel] | None:
    """A strict model of ``env_id``'s constructor kwargs, built from its signature.

    Keys in ``pinned`` (set by the server) and ``render_mode`` are left out, so clients get a
    422 naming them. Returns None when the signature cannot be described (``**kwargs``,
    a class that does not import, a default that is not JSON): then any JSON object is accepted
    and the env itself validates.
    """
    from gymnasium.envs.registration import load_env_creator, registry

    entry_point = registry[env_id].entry_point
    try:
        creator = load_env_creator(entry_point) if isinstance(entry_point, str) else entry_point
        init = creator.__init__ if isinstance(creator, type) else creator
        parameters = inspect.signature(init).parameters
        hints = typing.get_type_hints(init)
    except Exception:
        return None
    fields: dict[str, Any] = {}
    for name, parameter in parameters.items():
        if name == "self" or parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if name in pinned or name == "render_mode":
            continue
        annotation = hints.get(name, JsonValue)
        try:
            TypeAdapter(annotation).json_schema()
        except Exception:
            annotation = JsonValue
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[name] = (annotation, default)
    try:
        model = create_model(f"{_model_name(env_id)}Kwargs", __base__=StrictModel, **fields)
        model.model_json_schema()
    except Exception:
        return None
    return model


def _env_request_model(
    prefix: str, env_ids: tuple[str, ...], pinned: dict[str, dict[str, Any]], settings: Any
) -> Any:
    """Request body {env_id, env_kwargs}: one variant per env id, discriminated by env_id."""
    any_kwargs = Annotated[
        dict[Annotated[str, Field(max_length=128)], JsonValue],
        Field(max_length=settings.max_env_kwargs, description="constructor kwargs (JSON values)"),
    ]
    variants = []
    for env_id in env_ids:
        kwargs_model = env_kwargs_model(env_id, pinned[env_id])
        if kwargs_model is None:
            kwargs_field: tuple[Any, Any] = (any_kwargs, Field(default_factory=dict))
        elif all(not field.is_required() for field in kwargs_model.model_fields.values()):
            kwargs_field = (kwargs_model, Field(default_factory=kwargs_model))
        else:
            kwargs_field = (kwargs_model, ...)
        variants.append(
            create_model(
                f"{prefix}{_model_name(env_id)}",
                __base__=StrictModel,
                __validators__={"text_ok": model_validator(mode="after")(_text_ok)},
                env_id=(Literal[env_id], ...),  # type: ignore[valid-type]
                env_kwargs=kwargs_field,
            )
        )
    if len(variants) == 1:
        return variants[0]
    return Annotated[Union[tuple(variants)], Field(discriminator="env_id")]  # noqa: UP007


class ResetOptions(StrictModel):
    task_id: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        pattern=r"^[\x21-\x7e]+$",
        description="task to run; omitted: the env draws one from its split with its seeded RNG",
    )


class ResetRequest(StrictModel):
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="seed of the env's RNG")
    options: ResetOptions | None = None


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error response: a machine-readable code and a sentence naming the problem."""

    error: str = Field(description="e.g. invalid_request, session_not_found, session_lost")
    detail: str
    session_id: str | None = None
    exception: str | None = Field(None, description="exception type raised by the environment")
    issues: list[ValidationIssue] | None = None


class SpaceSpec(BaseModel):
    type: Literal["Text"]
    min_length: int
    max_length: int
    charset: str


class SessionLimits(BaseModel):
    max_action_chars: int
    max_body_bytes: int
    call_timeout_s: float
    idle_timeout_s: float


class SessionInfo(BaseModel):
    session_id: str
    env_id: str
    env_kwargs: dict[str, JsonValue]
    status: Literal["starting", "ready", "busy", "closing"]
    created_at: float = Field(description="unix time")
    idle_s: float
    episodes: int
    steps: int
    turn: int
    task_id: str | None
    worker_pid: int | None
    observation_space: SpaceSpec | None
    action_space: SpaceSpec | None
    splits: list[str]
    limits: SessionLimits


class SessionList(BaseModel):
    sessions: list[SessionInfo]
    active: int
    max_sessions: int


class ResetResponse(BaseModel):
    observation: str
    info: dict[str, JsonValue]


class StepResponse(BaseModel):
    observation: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, JsonValue]


class CloseResponse(BaseModel):
    session_id: str
    closed: bool


class CatalogueEntry(BaseModel):
    env_id: str
    task_set: str | None = None
    kwargs: dict[str, JsonValue] = {}
    splits: dict[str, int]


class CatalogueEnv(BaseModel):
    env_id: str
    available: bool
    error: str | None = None
    entries: list[CatalogueEntry] = []


class Catalogue(BaseModel):
    envs: list[CatalogueEnv]


class EnvDescription(BaseModel):
    env_id: str
    env_kwargs: dict[str, JsonValue]
    observation_space: SpaceSpec
    action_space: SpaceSpec
    splits: list[str]
    task_ids: dict[str, list[str]]


class Health(BaseModel):
    status: Literal["ok", "shutting_down", "starting"]
    sessions_active: int
    max_sessions: int
    accepting_sessions: bool


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        session_id: str | None = None,
        exception: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.body = ErrorBody(
            error=error, detail=detail, session_id=session_id, exception=exception
        )
        self.headers = headers


class SafeJSONResponse(JSONResponse):
    """JSON that never fails to encode: lone surrogates in env text become JSON escapes."""

    def render(self, content: Any) -> bytes:
        # backslashreplace writes a lone surrogate as the six characters \udXXX, which inside a
        # JSON string is exactly the escape the client decodes back to the same character.
        return json.dumps(
            content, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8", "backslashreplace")


def _error_response(
    status: int, body: ErrorBody, headers: dict[str, str] | None = None
) -> SafeJSONResponse:
    return SafeJSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


_STATUS_ERRORS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def _pool_error(exc: workers.WorkerError, session_id: str | None) -> ApiError:
    """Map what the pool raised onto an HTTP status and error code."""
    if isinstance(exc, workers.SessionNotFound):
        return ApiError(404, "session_not_found", str(exc), session_id=session_id)
    if isinstance(exc, workers.SessionGone):
        error = "session_lost" if exc.reason in ("lost", "timeout") else "session_closed"
        return ApiError(410, error, str(exc), session_id=session_id)
    if isinstance(exc, workers.SessionBusy):
        return ApiError(409, "session_busy", str(exc), session_id=session_id)
    if isinstance(exc, workers.WorkerTimeout):
        return ApiError(504, "call_timeout", str(exc), session_id=session_id)
    if isinstance(exc, workers.WorkerDied):
        return ApiError(410, "session_lost", str(exc), session_id=session_id)
    if isinstance(exc, workers.PoolFull):
        headers = {"Retry-After": str(exc.retry_after_s)}
        return ApiError(429, "too_many_sessions", str(exc), headers=headers)
    if isinstance(exc, workers.PoolClosed):
        return ApiError(503, "shutting_down", str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, workers.WorkerStartFailed):
        return ApiError(503, "worker_start_failed", str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, workers.EnvCallError):
        # calling step before reset is a protocol error of the client (gymnasium's ResetNeeded)
        status = 409 if exc.exception_type == "ResetNeeded" else 422
        return ApiError(
            status, "env_error", exc.message, session_id=session_id, exception=exc.exception_type
        )
    return ApiError(422, "env_error", str(exc), session_id=session_id)


def _responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses documenting each error status a route can answer with."""
    described = {
        400: "Malformed body (not UTF-8 / not parseable)",
        401: "Missing or wrong bearer token",
        404: "No such session",
        409: "Session busy with another call, or step before reset",
        410: "Session ended (worker died, timed out, idle-reaped or closed)",
        413: "Request body over the size limit",
        422: "Invalid request, or the environment rejected the call",
        429: "All session slots in use (see Retry-After)",
        503: "Service shutting down, or no worker process could be started",
        504: "Environment call timed out; the session ended",
    }
    responses: dict[int | str, dict[str, Any]] = {}
    for status in (401, *statuses):
        response: dict[str, Any] = {"model": ErrorBody, "description": described[status]}
        if status in (429, 503):
            response["headers"] = {
                "Retry-After": {"description": "seconds", "schema": {"type": "string"}}
            }
        responses[status] = response
    return responses


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


# --------------------------------------------------------------------------------------------
# ASGI middleware: metrics (outermost), auth, body limit
# --------------------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413 (checked on Content-Length and while reading)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = _error_response(
            413,
            ErrorBody(
                error="body_too_large",
                detail=f"request body exceeds the limit of {self.max_bytes} bytes",
            ),
        )
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await too_large(scope, receive, send)
                return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client disconnected before sending its body
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class BearerAuthMiddleware:
    """With a token set, every path except /healthz needs ``Authorization: Bearer <token>``."""

    open_paths = frozenset({"/healthz"})

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token_digest = hashlib.sha256(token.encode("ascii")).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, credentials = header.partition(b" ")
        # constant time: comparing digests (equal lengths) with compare_digest reveals neither
        # how much of the token matched nor its length
        digest = hashlib.sha256(credentials.strip()).digest()
        if scheme.lower() == b"bearer" and hmac.compare_digest(digest, self.token_digest):
            await self.app(scope, receive, send)
            return
        response = _error_response(
            401,
            ErrorBody(error="unauthorized", detail="missing or wrong bearer token"),
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


class _Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can share a process)."""

    def __init__(self, pool: SessionPool) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "eprl_http_requests", "HTTP requests", ["route", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "eprl_http_request_seconds", "HTTP request latency", ["route", "method"], registry=r
        )
        self.env_call_seconds = Histogram(
            "eprl_env_call_seconds",
            "latency of environment calls in the worker (create, reset, step)",
            ["op"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.steps = Counter("eprl_env_steps", "env steps", ["env_id"], registry=r)
        self.resets = Counter("eprl_env_resets", "env resets (episodes)", ["env_id"], registry=r)
        self.sessions_created = Counter(
            "eprl_sessions_created", "sessions created", ["env_id"], registry=r
        )
        self.sessions_ended = Counter(
            "eprl_sessions_ended",
            "sessions ended, by reason (client, idle, lost, timeout, shutdown)",
            ["reason"],
            registry=r,
        )
        self.errors = Counter("eprl_errors", "error responses by error code", ["error"], registry=r)
        Gauge("eprl_sessions_active", "live sessions", registry=r).set_function(lambda: pool.active)
        Gauge("eprl_sessions_max", "session bound", registry=r).set_function(
            lambda: pool.max_sessions
        )


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


class MetricsMiddleware:
    """Counts every response (401 and 413 included) by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            # label values must stay few: a fuzzer sends any method token
            method = scope["method"] if scope["method"] in _HTTP_METHODS else "other"
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.request_seconds.labels(route, method).observe(
                time.perf_counter() - started
            )


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------


def _session_info(session: workers.Session, settings: ServeSettings) -> SessionInfo:
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
            idle_timeout_s=settings.idle_timeout_s,
        ),
    )


def _issue_text(issue: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in issue.get("loc", ()))
    return f"{location}: {issue.get('msg', 'invalid')}" if location else issue.get("msg", "")


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the service. The worker pool starts and stops with the app's lifespan."""
    settings = settings or ServeSettings()
    env_ids = served_env_ids(settings)
    if not env_ids:
        raise ValueError("no environments to serve: no eprl/* id is registered")
    metrics: _Metrics
    pool = SessionPool(
        max_sessions=settings.max_sessions,
        env_modules=settings.env_modules,
        preload_modules=_entry_point_modules(env_ids),
        call_timeout_s=settings.call_timeout_s,
        create_timeout_s=settings.create_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
        reap_interval_s=settings.reap_interval_s,
        close_timeout_s=max(settings.shutdown_grace_s, 1.0),
        retry_after_s=settings.retry_after_s,
        start_method=settings.start_method,
        on_session_end=lambda session, reason: metrics.sessions_ended.labels(reason).inc(),
    )
    metrics = _Metrics(pool)
    catalogue_cache: dict[str, tuple[float, dict[str, Any]]] = {}
    describe_cache: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - FastAPI's lifespan protocol
        await pool.start()
        log.info("serving %s with at most %d sessions", ", ".join(env_ids), pool.max_sessions)
        try:
            yield
        finally:
            await pool.shutdown(settings.shutdown_grace_s)

    app = FastAPI(
        title="eprl environment service",
        description="Gymnasium environments (text observations and actions) as a service.",
        version="1",
        lifespan=lifespan,
        default_response_class=SafeJSONResponse,
    )
    app.state.pool = pool
    app.state.settings = settings

    # ---- request models that depend on the settings (so the OpenAPI schema is exact) --------

    pinned = {env_id: settings.pinned_env_kwargs.get(env_id, {}) for env_id in env_ids}
    CreateSessionRequest = _env_request_model("CreateSession", env_ids, pinned, settings)  # noqa: N806
    DescribeRequest = _env_request_model("Describe", env_ids, pinned, settings)  # noqa: N806
    StepRequest = create_model(  # noqa: N806
        "StepRequest",
        __base__=StrictModel,
        __validators__={"text_ok": model_validator(mode="after")(_text_ok)},
        action=(str, Field(..., max_length=settings.max_action_chars)),
    )

    def effective_kwargs(request: Any) -> dict[str, Any]:
        """The client's kwargs (only those it set, so env defaults apply) plus the pinned ones."""
        kwargs = request.env_kwargs
        if isinstance(kwargs, BaseModel):
            kwargs = kwargs.model_dump(exclude_unset=True)
        server_set = {
            key: value for key, value in pinned[request.env_id].items() if value is not None
        }
        return {**kwargs, **server_set}

    SessionId = Annotated[str, Path(pattern=SESSION_ID_PATTERN, description="32 hex digits")]  # noqa: N806

    # ---- error handlers ----------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> SafeJSONResponse:
        metrics.errors.labels(exc.body.error).inc()
        return _error_response(exc.status, exc.body, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        issues = [
            ValidationIssue(
                loc=[part if isinstance(part, int) else str(part) for part in e.get("loc", ())],
                msg=str(e.get("msg", "")),
                type=str(e.get("type", "")),
            )
            for e in exc.errors()[:20]
        ]
        detail = "; ".join(_issue_text(e) for e in exc.errors()[:5])
        metrics.errors.labels("invalid_request").inc()
        body = ErrorBody(error="invalid_request", detail=detail or "invalid request", issues=issues)
        return _error_response(422, body)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        error = _STATUS_ERRORS.get(exc.status_code, "http_error")
        detail = exc.detail if isinstance(exc.detail, str) else error
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            # Starlette names the methods of the first matching route only; list them all
            allowed = sorted(
                {
                    method
                    for route in app.routes
                    if isinstance(route, APIRoute) and route.path_regex.match(request.url.path)
                    for method in route.methods
                }
            )
            headers["Allow"] = ", ".join(allowed)
            detail = (
                f"{request.method} is not allowed on {request.url.path}; use {', '.join(allowed)}"
            )
        metrics.errors.labels(error).inc()
        return _error_response(exc.status_code, ErrorBody(error=error, detail=detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> SafeJSONResponse:
        # logged with its traceback here, never sent to the client
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        metrics.errors.labels("internal_error").inc()
        body = ErrorBody(error="internal_error", detail="internal error (logged on the server)")
        return _error_response(500, body)

    async def _pool_call(coro: Awaitable[Any], session_id: str | None = None) -> Any:
        try:
            return await coro
        except workers.WorkerError as exc:
            raise _pool_error(exc, session_id) from None

    def _live_session(session_id: str) -> workers.Session:
        try:
            return pool.get(session_id)
        except workers.WorkerError as exc:
            raise _pool_error(exc, session_id) from None

    # ---- routes ------------------------------------------------------------------------------

    @app.post(
        "/v1/sessions",
        status_code=201,
        response_model=SessionInfo,
        responses={
            **_responses(400, 413, 422, 429, 503, 504),
            201: {"description": "The new session", "links": _session_links("$response.body")},
        },
        operation_id="create_session",
        tags=["sessions"],
        summary="Create a session: one environment in its own worker process",
    )
    async def create_session(request: CreateSessionRequest) -> SessionInfo:  # type: ignore[valid-type]
        started = time.perf_counter()
        try:
            session = await pool.create(request.env_id, effective_kwargs(request))
        except workers.EnvCallError as exc:
            raise ApiError(
                422,
                "env_create_failed",
                f"{request.env_id} could not be created: {exc.message}",
                exception=exc.exception_type,
            ) from None
        except workers.WorkerDied as exc:
            raise ApiError(
                422, "env_create_failed", f"{request.env_id} could not be created: {exc}"
            ) from None
        except workers.WorkerError as exc:
            raise _pool_error(exc, None) from None
        metrics.env_call_seconds.labels("create").observe(time.perf_counter() - started)
        metrics.sessions_created.labels(request.env_id).inc()
        return _session_info(session, settings)

    @app.get(
        "/v1/sessions",
        response_model=SessionList,
        responses=_responses(),
        operation_id="list_sessions",
        tags=["sessions"],
    )
    async def list_sessions() -> SessionList:
        sessions = [_session_info(s, settings) for s in pool.sessions()]
        return SessionList(sessions=sessions, active=pool.active, max_sessions=pool.max_sessions)

    @app.get(
        "/v1/sessions/{session_id}",
        response_model=SessionInfo,
        responses=_responses(404, 410, 422),
        operation_id="get_session",
        tags=["sessions"],
        summary="A session's state and limits",
    )
    async def get_session(session_id: SessionId) -> SessionInfo:
        return _session_info(_live_session(session_id), settings)

    @app.post(
        "/v1/sessions/{session_id}/reset",
        response_model=ResetResponse,
        responses={
            **_responses(400, 404, 409, 410, 413, 422, 504),
            200: {"description": "First observation", "links": _session_links("$request.path")},
        },
        operation_id="reset_session",
        tags=["sessions"],
    )
    async def reset_session(session_id: SessionId, request: ResetRequest) -> dict[str, Any]:
        options = request.options.model_dump(exclude_none=True) if request.options else None
        env_id = _live_session(session_id).env_id
        started = time.perf_counter()
        result = await _pool_call(
            pool.call(session_id, "reset", seed=request.seed, options=options), session_id
        )
        metrics.env_call_seconds.labels("reset").observe(time.perf_counter() - started)
        metrics.resets.labels(env_id).inc()
        return result  # validated once, against response_model, by FastAPI

    @app.post(
        "/v1/sessions/{session_id}/step",
        response_model=StepResponse,
        responses=_responses(400, 404, 409, 410, 413, 422, 504),
        operation_id="step_session",
        tags=["sessions"],
    )
    async def step_session(session_id: SessionId, request: StepRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        env_id = _live_session(session_id).env_id
        started = time.perf_counter()
        result = await _pool_call(pool.call(session_id, "step", action=request.action), session_id)
        metrics.env_call_seconds.labels("step").observe(time.perf_counter() - started)
        metrics.steps.labels(env_id).inc()
        return result

    @app.delete(
        "/v1/sessions/{session_id}",
        response_model=CloseResponse,
        responses=_responses(404, 409, 410, 422),
        operation_id="close_session",
        tags=["sessions"],
    )
    async def close_session(session_id: SessionId) -> CloseResponse:
        await _pool_call(pool.close(session_id), session_id)
        return CloseResponse(session_id=session_id, closed=True)

    @app.get(
        "/v1/envs",
        response_model=Catalogue,
        responses=_responses(503, 504),
        operation_id="catalogue",
        tags=["environments"],
        summary="Served environments with their task sets, splits and task counts",
    )
    async def catalogue() -> Catalogue:
        now = time.monotonic()
        stale = [
            env_id
            for env_id in env_ids
            if env_id not in catalogue_cache
            # an unavailable env is retried after a minute (e.g. its data was installed since)
            or (
                not catalogue_cache[env_id][1]["available"]
                and now - catalogue_cache[env_id][0] > 60
            )
        ]
        if stale:
            result = await _pool_call(pool.run_job("catalogue", env_ids=stale))
            for env_id, entry in result.items():
                catalogue_cache[env_id] = (now, entry)
        return Catalogue(
            envs=[CatalogueEnv(env_id=env_id, **catalogue_cache[env_id][1]) for env_id in env_ids]
        )

    @app.post(
        "/v1/envs/describe",
        response_model=EnvDescription,
        responses=_responses(400, 413, 422, 503, 504),
        operation_id="describe_env",
        tags=["environments"],
        summary="Spaces, splits and task ids of an env id with given constructor kwargs",
    )
    async def describe_env(request: DescribeRequest) -> EnvDescription:  # type: ignore[valid-type]
        env_kwargs = effective_kwargs(request)
        key = json.dumps([request.env_id, env_kwargs], sort_keys=True)
        if key not in describe_cache:
            try:
                description = await pool.run_job(
                    "describe", env_id=request.env_id, env_kwargs=env_kwargs
                )
            except workers.EnvCallError as exc:
                raise ApiError(
                    422,
                    "env_create_failed",
                    f"{request.env_id} could not be created: {exc.message}",
                    exception=exc.exception_type,
                ) from None
            except workers.WorkerError as exc:
                raise _pool_error(exc, None) from None
            describe_cache[key] = description
            while len(describe_cache) > 256:
                describe_cache.popitem(last=False)
        return EnvDescription(env_id=request.env_id, env_kwargs=env_kwargs, **describe_cache[key])

    @app.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": Health, "description": "Not ready (starting or shutting down)"}},
        operation_id="health",
        tags=["service"],
        summary="Liveness and readiness (no token needed)",
    )
    async def healthz() -> SafeJSONResponse:
        if pool.accepting:
            status: Literal["ok", "shutting_down", "starting"] = "ok"
        else:
            status = "starting" if pool.active == 0 else "shutting_down"
        health = Health(
            status=status,
            sessions_active=pool.active,
            max_sessions=pool.max_sessions,
            accepting_sessions=pool.accepting,
        )
        return SafeJSONResponse(health.model_dump(), status_code=200 if pool.accepting else 503)

    @app.get(
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
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ---- middleware (the last added runs first) ---------------------------------------------

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.token is not None:
        app.add_middleware(BearerAuthMiddleware, token=settings.token.get_secret_value())
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            if settings.token is not None:
                schema.setdefault("components", {})["securitySchemes"] = {
                    "bearerAuth": {"type": "http", "scheme": "bearer"}
                }
                for path, operations in schema["paths"].items():
                    for operation in operations.values():
                        operation["security"] = [] if path == "/healthz" else [{"bearerAuth": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _entry_point_modules(env_ids: tuple[str, ...]) -> tuple[str, ...]:
    from gymnasium.envs.registration import registry

    modules = []
    for env_id in env_ids:
        entry_point = registry[env_id].entry_point
        if isinstance(entry_point, str):
            modules.append(entry_point.split(":")[0])
    return tuple(modules)


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    max_sessions: int = 64,
    *,
    log_level: str = "info",
    access_log: bool = True,
    **settings: Any,
) -> None:
    """Run the service with uvicorn until SIGINT/SIGTERM (``eprl serve``).

    ``token`` defaults to the ``EPRL_TOKEN`` environment variable. Raises ``ValueError`` with a
    clear message (and binds nothing) when the settings are unsafe, e.g. a non-loopback host
    without a token. Further keyword arguments are :class:`ServeSettings` fields.
    """
    import uvicorn

    if token is None:
        token = os.environ.get(TOKEN_ENV_VAR) or None
    try:
        config = ServeSettings(
            host=host, port=port, token=token, max_sessions=max_sessions, **settings
        )
    except ValidationError as exc:
        raise ValueError(
            "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        ) from None
    if config.token is not None and log_level.lower() == "trace":
        raise ValueError("log level 'trace' prints request headers (the token); use 'debug'")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
        level = logging.getLevelName(log_level.upper())
        log.setLevel(level if isinstance(level, int) else logging.DEBUG)
    app = create_app(config)
    auth = "bearer token required" if config.token is not None else "no token (loopback only)"
    log.info("eprl serve on http://%s:%d (%s)", host, port, auth)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=access_log,
        server_header=False,
        timeout_graceful_shutdown=int(config.shutdown_grace_s) or None,
    )
