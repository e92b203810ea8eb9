"""ASGI middleware of the service, outermost first: metrics, bearer auth, body limit.

Plain ASGI classes rather than FastAPI dependencies so that they also cover what no route
handles (a 404, a 405, /docs and /openapi.json) and refuse a request before its body is read.
:class:`ServiceMetrics` holds the Prometheus metrics of one app.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import REJECTION_REASONS, error_response
from serving.pool import SessionPool
from serving.schemas import ErrorBody
from serving.tokens import TokenStore


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes`` with 413 (checked on Content-Length and while reading)."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: "ServiceMetrics") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def refuse() -> None:
            self.metrics.rejected.labels("body_too_large").inc()
            detail = f"request body exceeds the limit of {self.max_bytes} bytes"
            response = error_response(413, ErrorBody(error="body_too_large", detail=detail))
            await response(scope, receive, send)

        declared = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await refuse()
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client disconnected before sending its body
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await refuse()  # a body longer than declared, or sent without Content-Length
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
    """With tokens set, every path except /healthz needs ``Authorization: Bearer <token>``.

    ``tokens`` is read at every request, so a reload (SIGHUP) applies to the next one.
    """

    open_paths = frozenset({"/healthz"})

    def __init__(self, app: ASGIApp, tokens: TokenStore, metrics: "ServiceMetrics") -> None:
        self.app = app
        self.tokens = tokens
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        header = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        scheme, _, credentials = header.partition(b" ")
        # constant time: TokenStore compares digests (equal lengths) with compare_digest, which
        # reveals neither how much of a token matched nor its length
        name = self.tokens.check(credentials.strip())
        if scheme.lower() == b"bearer" and name is not None:
            scope.setdefault("state", {})["token_name"] = name
            await self.app(scope, receive, send)
            return
        self.metrics.rejected.labels("unauthorized").inc()
        response = error_response(
            401,
            ErrorBody(error="unauthorized", detail="missing or wrong bearer token"),
            headers={"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


class ServiceMetrics:
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
        self.env_errors = Counter(
            "eprl_env_errors",
            "failed session calls by env and kind (env_error, call_timeout, session_lost, "
            "env_create_failed)",
            ["env_id", "kind"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "eprl_step_seconds",
            "latency of a step as the service answers it (queueing in the service included)",
            ["env_id"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.worker_restarts = Counter(
            "eprl_worker_restarts",
            "worker processes lost (died, killed, stopped at a timeout): their session ended and "
            "its next session starts a fresh worker",
            ["env_id", "reason"],
            registry=r,
        )
        self.rejected = Counter(
            "eprl_requests_rejected",
            "requests refused before any env work, by reason",
            ["reason"],
            registry=r,
        )
        for reason in REJECTION_REASONS:  # exported at 0 from the start: alerts see a rate
            self.rejected.labels(reason)
        Gauge("eprl_sessions_active", "live sessions", registry=r).set_function(lambda: pool.active)
        Gauge("eprl_sessions_max", "session bound", registry=r).set_function(
            lambda: pool.max_sessions
        )
        by_state = Gauge("eprl_sessions", "live sessions by state", ["state"], registry=r)
        for state in ("starting", "ready", "busy", "closing"):
            by_state.labels(state).set_function(lambda state=state: pool.count_in_state(state))
        Gauge(
            "eprl_draining",
            "1 while the service drains (SIGTERM) and refuses new sessions",
            registry=r,
        ).set_function(lambda: float(pool.draining))


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


class MetricsMiddleware:
    """Counts every response (401 and 413 included) by route template, method and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
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
