"""The environment service: FastAPI over :class:`serving.pool.SessionPool`.

``create_app(settings)`` builds the ASGI app; ``serve(host, port, token, ..., config=...)`` runs
it with uvicorn (``eprl serve``; the drain on SIGTERM and token reloads on SIGHUP are
:mod:`serving.server`, the config file :mod:`serving.config`). The parts live next door: the settings in :mod:`serving.settings`, the
bodies in :mod:`serving.schemas`, the routes in :mod:`serving.routes`, the error responses in
:mod:`serving.errors` and the auth, size-limit and metrics middleware in
:mod:`serving.middleware`.
"""

import logging
import os
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serving.config import ServeConfigError, load_serve_settings
from serving.errors import SafeJSONResponse, install_error_handlers
from serving.middleware import (
    BearerAuthMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    ServiceMetrics,
)
from serving.pool import Session, SessionPool
from serving.routes import EnvCaches, build_router
from serving.schemas import request_models
from serving.server import DrainingServer, uvicorn_config
from serving.settings import ServeSettings, is_loopback, served_env_ids
from serving.tokens import TokenFileError, TokenStore
from serving.warm import WarmMetrics, warm_specs

__all__ = ["ServeSettings", "create_app", "is_loopback", "serve"]

log = logging.getLogger("eprl.serving")


def _entry_point_modules(env_ids: tuple[str, ...]) -> tuple[str, ...]:
    """The modules defining the served envs (preloaded by the workers' forkserver)."""
    from gymnasium.envs.registration import registry

    modules = []
    for env_id in env_ids:
        entry_point = registry[env_id].entry_point
        if isinstance(entry_point, str):
            modules.append(entry_point.split(":")[0])
    return tuple(modules)


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the service. The worker pool starts and stops with the app's lifespan."""
    settings = settings or ServeSettings()
    env_ids = served_env_ids(settings)
    if not env_ids:
        raise ValueError("no environments to serve: no eprl/* id is registered")
    metrics: ServiceMetrics
    models = request_models(settings, env_ids)

    def session_ended(session: Session, reason: str) -> None:
        metrics.sessions_ended.labels(reason).inc()
        if reason in ("lost", "timeout"):
            metrics.worker_restarts.labels(session.env_id, reason).inc()
            kind = "session_lost" if reason == "lost" else "call_timeout"
            metrics.env_errors.labels(session.env_id, kind).inc()

    pool = SessionPool(
        max_sessions=settings.max_sessions,
        env_modules=settings.env_modules,
        preload_modules=_entry_point_modules(env_ids),
        call_timeout_s=settings.call_timeout_s,
        reset_timeout_s=settings.reset_timeout_s,
        create_timeout_s=settings.create_timeout_s,
        idle_timeout_s=settings.idle_timeout_s,
        reap_interval_s=settings.reap_interval_s,
        close_timeout_s=max(settings.shutdown_grace_s, 1.0),
        retry_after_s=settings.retry_after_s,
        start_method=settings.start_method,
        on_session_end=session_ended,
        warm=warm_specs(settings, env_ids, models),
    )
    metrics = ServiceMetrics(pool)
    metrics.registry.register(WarmMetrics(pool))
    tokens = None
    if settings.authenticated:
        secret = settings.token.get_secret_value() if settings.token is not None else None
        try:
            tokens = TokenStore(secret, settings.tokens_file)
        except TokenFileError as exc:
            raise ServeConfigError(f"invalid serve config: tokens_file: {exc}") from None

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
    # what the routes' dependencies (serving.routes.get_pool, ...) hand to the handlers
    app.state.pool = pool
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.env_caches = EnvCaches(env_ids)
    app.state.tokens = tokens

    install_error_handlers(app, metrics.errors, metrics.rejected)
    app.include_router(build_router(models))

    # middleware: the last added runs first
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=metrics)
    if tokens is not None:
        app.add_middleware(BearerAuthMiddleware, tokens=tokens, metrics=metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            if tokens is not None:
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


def serve(
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    max_sessions: int | None = None,
    *,
    config: str | os.PathLike[str] | None = None,
    **settings: Any,
) -> None:
    """Run the service with uvicorn until SIGTERM (drained) or SIGINT (``eprl serve``).

    ``config`` is a YAML file of :class:`ServeSettings` fields; the other arguments (any
    ServeSettings field; None: not given) override it, and ``token`` falls back to the
    ``EPRL_TOKEN`` environment variable (``TOKEN_ENV_VAR``), then to the file's. Raises
    ``ValueError`` (:class:`~serving.config.ServeConfigError`) with a message naming the bad key
    and binds nothing when the settings are invalid or unsafe, e.g. a non-loopback host without
    a token.
    """
    overrides = {"host": host, "port": port, "token": token, "max_sessions": max_sessions}
    resolved = load_serve_settings(config, {**overrides, **settings})
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
        level = logging.getLevelName(resolved.log_level.upper())
        log.setLevel(level if isinstance(level, int) else logging.DEBUG)
    app = create_app(resolved)
    tokens: TokenStore | None = app.state.tokens
    auth = (
        f"bearer token required ({len(tokens.names)} accepted)"
        if tokens is not None
        else "no token (loopback only)"
    )
    log.info("eprl serve on %s://%s:%d (%s)", resolved.scheme, resolved.host, resolved.port, auth)
    if not resolved.tls and not is_loopback(resolved.host):
        log.warning("plain HTTP off loopback: tokens travel in the clear (set tls_certfile)")
    server = DrainingServer(uvicorn_config(app, resolved), app.state.pool, resolved, tokens)
    server.run()
