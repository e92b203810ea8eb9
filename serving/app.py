"""The environment service: FastAPI over :class:`serving.pool.SessionPool`.

``create_app(settings)`` builds the ASGI app; ``serve(host, port, token, ...)`` runs it with
uvicorn (``eprl serve``). The parts live next door: the settings in :mod:`serving.settings`, the
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
from pydantic import ValidationError

from serving.errors import SafeJSONResponse, install_error_handlers
from serving.middleware import (
    BearerAuthMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    ServiceMetrics,
)
from serving.pool import SessionPool
from serving.routes import EnvCaches, build_router
from serving.schemas import request_models
from serving.settings import TOKEN_ENV_VAR, ServeSettings, is_loopback, served_env_ids

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
    metrics = ServiceMetrics(pool)

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

    install_error_handlers(app, metrics.errors)
    app.include_router(build_router(request_models(settings, env_ids)))

    # middleware: the last added runs first
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

    ``token`` defaults to the ``EPRL_TOKEN`` environment variable (``TOKEN_ENV_VAR``). Raises
    ``ValueError`` with a clear message (and binds nothing) when the settings are unsafe, e.g. a
    non-loopback host without a token. Further keyword arguments are :class:`ServeSettings`
    fields.
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
