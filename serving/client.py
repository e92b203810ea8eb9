"""``RemoteEnv``: a Gymnasium env whose episodes run in an eprl environment service.

    env = gymnasium.make("eprl/Remote-v0", url="http://10.0.0.5:8000", env_id="eprl/CodeExec-v0",
                         token=os.environ["EPRL_TOKEN"], env_kwargs={...})
    obs, info = env.reset(seed=0, options={"task_id": ...})

It behaves like the local env (same observations, rewards and info for the same task and seed;
the same spaces, ``splits``, ``task_ids(split)`` and ``defaults``, the budgets the served env
declares, all known right after ``make``). The remote session is created at the
first ``reset`` and closed by ``close()``; ``url`` may be a list of replicas, and each session
goes to the least-loaded one that answers.

Failures are explicit: a session that the server no longer has (its worker died, the call
timed out, the replica died or restarted) raises :class:`SessionLostError` naming the session
and the replica (``.replica``); the next ``reset`` starts a new session on a live replica, and a
reset whose session was already gone (its replica drained or died between episodes) does so by
itself, since no episode is lost. Only calls that are safe to repeat (create, catalogue,
describe, health) are retried, with exponential backoff; ``step`` never is. ``https://`` URLs
are verified against ``ca_file`` (or ``$EPRL_CA_FILE``, else the system's CAs).
"""

import contextlib
import itertools
import json
import os
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import gymnasium
import httpx
from gymnasium import spaces

from serving.settings import TOKEN_ENV_VAR

# a CA bundle (PEM) to verify the service's TLS certificate by, when ca_file is not given
CA_FILE_ENV_VAR = "EPRL_CA_FILE"

_RETRYABLE_STATUS = frozenset({429, 502, 503, 504})
_round_robin = itertools.count()  # breaks ties between equally loaded replicas
_descriptions: dict[str, dict[str, Any]] = {}  # (urls, env id, kwargs) -> spaces, splits, task ids
_round_robin_lock = threading.Lock()


class RemoteEnvError(RuntimeError):
    """The service answered with an error, or could not be reached."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        session_id: str | None = None,
        replica: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.session_id = session_id
        self.replica = replica  # the base URL of the replica that failed, where one did


class SessionLostError(RemoteEnvError):
    """The remote session no longer exists (worker died, call timed out, server restarted).

    The episode cannot continue; call ``reset()`` to start a new session.
    """


class ServiceBusyError(RemoteEnvError):
    """Every replica refused a new session (all slots in use) after the retries."""


def _builtin_exception(name: str | None) -> type[Exception] | None:
    """The local exception class for an env exception reported by the server, if we have it."""
    builtin = {
        "ValueError": ValueError,
        "TypeError": TypeError,
        "KeyError": KeyError,
        "IndexError": IndexError,
        "NotImplementedError": NotImplementedError,
        "RuntimeError": RuntimeError,
    }
    if name in builtin:
        return builtin[name]
    candidate = getattr(gymnasium.error, name or "", None)
    if isinstance(candidate, type) and issubclass(candidate, Exception):
        return candidate
    return None


def _space(spec: dict[str, Any]) -> spaces.Text:
    if spec.get("type") != "Text":
        raise RemoteEnvError(f"unsupported space from the server: {spec!r}")
    return spaces.Text(
        min_length=spec["min_length"], max_length=spec["max_length"], charset=spec["charset"]
    )


class RemoteEnv(gymnasium.Env):
    """A registered eprl environment (``env_id``) running in one or more remote services.

    Args:
        url: base URL of the service, or a list of replica URLs.
        env_id: the environment to run there, e.g. "eprl/CodeExec-v0".
        token: bearer token (default: the EPRL_TOKEN environment variable, if set).
        env_kwargs: constructor kwargs of the remote env (JSON values).
        timeout_s: read timeout of one call; keep it above the server's call timeout.
        connect_timeout_s: TCP connect timeout.
        max_retries: retries of a safe call (create, describe, health) after the first try.
        backoff_s: first retry delay; doubles each retry (with jitter), capped at 30 s.
        ca_file: PEM file of the CA that signed the service's TLS certificate (``https://``
            URLs; default: the EPRL_CA_FILE environment variable, else the system's CAs).
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        url: str | list[str],
        env_id: str,
        token: str | None = None,
        env_kwargs: dict[str, Any] | None = None,
        timeout_s: float = 180.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        ca_file: str | None = None,
    ) -> None:
        urls = [url] if isinstance(url, str) else list(url)
        if not urls:
            raise ValueError("url must be a URL or a non-empty list of URLs")
        self.urls = [u.rstrip("/") for u in urls]
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        token = token if token is not None else os.environ.get(TOKEN_ENV_VAR) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        ca_file = ca_file if ca_file is not None else os.environ.get(CA_FILE_ENV_VAR) or None
        try:
            verify = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the CA file {ca_file!r}: {exc}") from None
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            trust_env=False,
            verify=verify,
        )
        self._jitter = random.Random()  # not self.np_random: retries must not shift task draws
        self.session_id: str | None = None
        self.session_url: str | None = None
        # rollout runners build a fresh env per episode: ask each service once per process
        key = json.dumps([self.urls, env_id, self.env_kwargs], sort_keys=True)
        description = _descriptions.get(key)
        if description is None:
            try:
                body = {"env_id": env_id, "env_kwargs": self.env_kwargs}
                _, response = self._with_retries(
                    "POST", "/v1/envs/describe", body, lambda: self.urls
                )
                description = response.json()
            except BaseException:
                self._http.close()
                raise
            _descriptions[key] = description
        self.observation_space = _space(description["observation_space"])
        self.action_space = _space(description["action_space"])
        self.splits: list[str] = list(description["splits"])
        self._task_ids: dict[str, list[str]] = description["task_ids"]
        # the served env's own budgets (max_turns, max_new_tokens, max_context_tokens,
        # max_parallel_episodes): an evaluator sizes its run by them as for a local env
        self.defaults: dict[str, Any] = dict(description["defaults"])

    # ---- the env contract ------------------------------------------------------------------

    def task_ids(self, split: str) -> list[str]:
        """Task ids of ``split`` (as the local env's ``task_ids``)."""
        if split not in self._task_ids:
            raise ValueError(
                f"unknown split {split!r} for {self.env_id}; expected one of {self.splits}"
            )
        return list(self._task_ids[split])

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        body = {"seed": seed, "options": options}
        if self.session_id is not None:
            try:
                result = self._session_call("reset", body)
                return result["observation"], result["info"]
            except SessionLostError as exc:
                if exc.status == 504:  # the reset itself ran out of time: not repeated
                    raise
                # the session was gone before this reset could run (its replica drained or
                # died between episodes): no episode is lost, start it on a new session
        self._create_session()
        result = self._session_call("reset", body)
        return result["observation"], result["info"]

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self.session_id is None:
            raise gymnasium.error.ResetNeeded("call reset() before step() (no remote session)")
        result = self._session_call("step", {"action": action})
        return (
            result["observation"],
            float(result["reward"]),
            bool(result["terminated"]),
            bool(result["truncated"]),
            result["info"],
        )

    def truncate(self, reason: str = "context_limit") -> tuple[float, dict[str, Any]] | None:
        """Cut the running episode and have the remote env grade it (AppWorld runs the task's
        tests on the state the last cell left): ``(reward, info)``, or None when the remote
        env cannot grade a cut episode (the rollout then keeps the rewards its steps gave)."""
        if self.session_id is None:
            raise gymnasium.error.ResetNeeded("call reset() before truncate() (no remote session)")
        result = self._session_call("truncate", {"reason": reason})
        return (float(result["reward"]), result["info"]) if result["graded"] else None

    def close(self) -> None:
        """Close the remote session (if any) and the HTTP client. Safe to call twice."""
        if self.session_id is not None and not self._http.is_closed:
            session_url = f"{self.session_url}/v1/sessions/{self.session_id}"
            self.session_id = None
            # unreachable server: it reaps the idle session itself
            with contextlib.suppress(httpx.HTTPError):
                self._http.delete(session_url)
        if not self._http.is_closed:
            self._http.close()
        super().close()

    # ---- sessions ----------------------------------------------------------------------------

    def _create_session(self) -> None:
        """Create a session on the least-loaded replica; retry with backoff when all are busy."""
        body = {"env_id": self.env_id, "env_kwargs": self.env_kwargs}
        try:
            base, response = self._with_retries(
                "POST", "/v1/sessions", body, self._replicas_by_load
            )
        except RemoteEnvError as exc:
            if exc.status not in (429, 503):
                raise
            raise ServiceBusyError(
                f"no replica accepted a new {self.env_id} session after "
                f"{self.max_retries + 1} tries: {exc}",
                status=exc.status,
                error=exc.error,
            ) from None
        self.session_id = response.json()["session_id"]
        self.session_url = base

    def _replicas_by_load(self) -> list[str]:
        """Replicas ordered by free session slots (from /healthz); unreachable ones last."""
        if len(self.urls) == 1:
            return list(self.urls)
        with _round_robin_lock:
            offset = next(_round_robin)
        rotated = [self.urls[(offset + i) % len(self.urls)] for i in range(len(self.urls))]
        free: dict[str, int] = {}
        for base in rotated:
            try:
                health = self._http.get(f"{base}/healthz", timeout=5.0).json()
                if health.get("accepting_sessions"):
                    free[base] = int(health["max_sessions"]) - int(health["sessions_active"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                pass
        # stable sort keeps the round-robin order among equally loaded replicas
        return sorted(rotated, key=lambda base: -free.get(base, -1))

    def _session_call(self, op: str, body: dict[str, Any]) -> dict[str, Any]:
        """One reset/step/truncate on the session: never retried (none is idempotent)."""
        session_id = self.session_id
        url = f"{self.session_url}/v1/sessions/{session_id}/{op}"
        try:
            response = self._http.post(url, json=body)
        except httpx.TransportError as exc:
            # the call may or may not have run: the episode's state is unknown, so it is over;
            # free its slot if the server is still there (else the server reaps it when idle)
            self.session_id = None
            with contextlib.suppress(httpx.HTTPError):
                self._http.delete(f"{self.session_url}/v1/sessions/{session_id}", timeout=5.0)
            raise SessionLostError(
                f"session {session_id} on replica {self.session_url} is lost: {op} failed in "
                f"transport ({type(exc).__name__}: {exc}); call reset() to start a new session",
                session_id=session_id,
                replica=self.session_url,
            ) from exc
        if response.status_code == 200:
            return response.json()
        error = self._error(response, self.session_url or "", session_id=session_id)
        if isinstance(error, SessionLostError):
            self.session_id = None
        raise error

    # ---- HTTP helpers ------------------------------------------------------------------------

    def _with_retries(
        self, method: str, path: str, json: Any, replicas: Callable[[], list[str]]
    ) -> tuple[str, httpx.Response]:
        """A safe (repeatable) call: the first replica that answers 2xx, with its response.

        Each round tries every replica in the order ``replicas()`` gives; an unreachable replica
        or a busy answer (429, 502, 503, 504) moves on to the next, any other error is raised at
        once. Between rounds it sleeps the longest Retry-After, at least the exponential
        backoff; after ``max_retries`` more rounds the last error is raised.
        """
        last_error: RemoteEnvError | None = None
        for attempt in range(self.max_retries + 1):
            retry_after = 0.0
            for base in replicas():
                try:
                    response = self._http.request(method, f"{base}{path}", json=json)
                except httpx.TransportError as exc:
                    last_error = RemoteEnvError(f"{base}{path} unreachable: {exc}", replica=base)
                    continue
                if response.status_code < 300:
                    return base, response
                error = self._error(response, base)
                if response.status_code not in _RETRYABLE_STATUS:
                    raise error
                last_error = error
                retry_after = max(retry_after, _retry_after(response))
            if attempt < self.max_retries:
                time.sleep(max(retry_after, self._backoff(attempt)))
        assert last_error is not None  # every round tried at least one replica
        raise last_error

    def _backoff(self, attempt: int) -> float:
        return min(30.0, self.backoff_s * 2**attempt) * self._jitter.uniform(0.5, 1.0)

    def _error(
        self, response: httpx.Response, base: str, session_id: str | None = None
    ) -> Exception:
        """The exception for an error response: the env's own type where the env raised."""
        try:
            body = response.json()
            error, detail = body.get("error"), body.get("detail", response.text)
        except ValueError:
            body, error, detail = {}, None, response.text[:500]
        if error == "env_error":
            local = _builtin_exception(body.get("exception"))
            if local is not None:
                return local(detail)
        message = f"{self.env_id} on {base}: {detail} (HTTP {response.status_code}, {error})"
        if session_id is not None and (
            response.status_code in (404, 410, 504)
            or error in ("session_not_found", "session_lost", "session_closed")
        ):
            return SessionLostError(
                f"{detail} (replica {base}, HTTP {response.status_code} {error}); "
                "call reset() to start a new session",
                status=response.status_code,
                error=error,
                session_id=session_id,
                replica=base,
            )
        return RemoteEnvError(
            message, status=response.status_code, error=error, session_id=session_id, replica=base
        )


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(60.0, float(response.headers.get("Retry-After", 0)))
    except ValueError:
        return 0.0
