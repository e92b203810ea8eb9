"""How the service fails: every error is a JSON :class:`ErrorBody` with a status naming it.

:class:`ApiError` is what a route raises; :func:`pool_error` maps what the session pool raised
onto it; :func:`install_error_handlers` turns those, FastAPI's validation errors and Starlette's
HTTP errors into ``ErrorBody`` responses, and logs anything unexpected without ever sending its
stack trace. 5xx statuses are kept for a call that timed out or a service shutting down.
"""

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import Counter
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import pool, workers
from serving.schemas import ErrorBody, ValidationIssue

log = logging.getLogger("eprl.serving")

# what /metrics calls a request refused before any env work (eprl_requests_rejected_total)
REJECTION_REASONS = (
    "unauthorized",
    "body_too_large",
    "too_many_sessions",
    "shutting_down",
    "session_busy",
    "worker_start_failed",
)


class ApiError(Exception):
    """An error response: the status, an :class:`ErrorBody` and extra headers (Retry-After)."""

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


def error_response(
    status: int, body: ErrorBody, headers: dict[str, str] | None = None
) -> SafeJSONResponse:
    """The response for ``body`` (fields that are None left out)."""
    return SafeJSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def env_create_failed(env_id: str, exc: workers.WorkerError) -> ApiError:
    """422 for an env that could not be built from the client's kwargs (the env's message)."""
    if isinstance(exc, workers.EnvCallError):
        return ApiError(
            422,
            "env_create_failed",
            f"{env_id} could not be created: {exc.message}",
            exception=exc.exception_type,
        )
    return ApiError(422, "env_create_failed", f"{env_id} could not be created: {exc}")


def pool_error(exc: workers.WorkerError, session_id: str | None) -> ApiError:
    """Map what the pool raised onto an HTTP status and error code."""
    if isinstance(exc, pool.SessionNotFound):
        return ApiError(404, "session_not_found", str(exc), session_id=session_id)
    if isinstance(exc, pool.SessionGone):
        error = "session_lost" if exc.reason in ("lost", "timeout") else "session_closed"
        return ApiError(410, error, str(exc), session_id=session_id)
    if isinstance(exc, pool.SessionBusy):
        return ApiError(409, "session_busy", str(exc), session_id=session_id)
    if isinstance(exc, workers.WorkerTimeout):
        return ApiError(504, "call_timeout", str(exc), session_id=session_id)
    if isinstance(exc, workers.WorkerDied):
        return ApiError(410, "session_lost", str(exc), session_id=session_id)
    if isinstance(exc, pool.PoolFull):
        headers = {"Retry-After": str(exc.retry_after_s)}
        return ApiError(429, "too_many_sessions", str(exc), headers=headers)
    if isinstance(exc, pool.PoolClosed):
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


_DESCRIBED_STATUSES = {
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


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses documenting each error status a route can answer with (401 always)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in (401, *statuses):
        response: dict[str, Any] = {"model": ErrorBody, "description": _DESCRIBED_STATUSES[status]}
        if status in (429, 503):
            response["headers"] = {
                "Retry-After": {"description": "seconds", "schema": {"type": "string"}}
            }
        responses[status] = response
    return responses


_STATUS_ERRORS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def _issue_text(issue: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in issue.get("loc", ()))
    return f"{location}: {issue.get('msg', 'invalid')}" if location else issue.get("msg", "")


def install_error_handlers(app: FastAPI, errors: Counter, rejected: Counter) -> None:
    """Answer every exception of ``app`` with an ErrorBody; count each by its error code (and
    the refusals among them, by reason, in ``rejected``)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> SafeJSONResponse:
        errors.labels(exc.body.error).inc()
        if exc.body.error in REJECTION_REASONS:
            rejected.labels(exc.body.error).inc()
        return error_response(exc.status, exc.body, exc.headers)

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
        errors.labels("invalid_request").inc()
        body = ErrorBody(error="invalid_request", detail=detail or "invalid request", issues=issues)
        return error_response(422, body)

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
        errors.labels(error).inc()
        return error_response(exc.status_code, ErrorBody(error=error, detail=detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> SafeJSONResponse:
        # logged with its traceback here, never sent to the client
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        errors.labels("internal_error").inc()
        body = ErrorBody(error="internal_error", detail="internal error (logged on the server)")
        return error_response(500, body)
