"""What the environment service is configured by: :class:`ServeSettings` and the served env ids.

Also the one name of the token's environment variable (``TOKEN_ENV_VAR``), read by the server
(``serve``) and the client (``RemoteEnv``) alike. Imports neither FastAPI nor gymnasium at module
level, so the client can import it and stay light.
"""

import ipaddress
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SecretStr,
    field_validator,
    model_validator,
)

TOKEN_ENV_VAR = "EPRL_TOKEN"
MIN_TOKEN_CHARS = 16
# The environments whose untrusted code runs sealed (envs/sandbox/, envs/appworld/sealed.py)
# out of reach of whatever decides its reward: the only ones the service offers, since over the
# network any other one is remote code execution on this host for whoever holds the token.
SEALED_ENV_IDS = ("eprl/AppWorld-v0", "eprl/CodeExec-v0")
# kwargs no client may send, whatever the config says (None: the env's default applies): they
# choose things on this host (an isolation mode, an interpreter, a directory, where to connect)
ALWAYS_PINNED: dict[str, dict[str, None]] = {
    "eprl/CodeExec-v0": {"sandbox": None},
    "eprl/AppWorld-v0": {"python": None, "root": None, "server_urls": None},
}
MAX_WARM_PER_ENV = 64


def token_problem(value: str) -> str | None:
    """What is wrong with ``value`` as a bearer token (None: usable). Never quotes the value."""
    if len(value) < MIN_TOKEN_CHARS or not value.isascii() or not value.isprintable():
        return (
            f"must be at least {MIN_TOKEN_CHARS} printable ASCII characters without spaces "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if " " in value:
        return "must not contain spaces"
    return None


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
    # bearer token; a token (or tokens_file) is required whenever host is not a loopback address
    token: SecretStr | None = None
    # one token per line (``NAME TOKEN`` or ``TOKEN``), re-read on SIGHUP (serving.tokens)
    tokens_file: Path | None = None
    # TLS straight from uvicorn: both paths, or neither (plain HTTP)
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    max_sessions: int = Field(64, ge=1, le=4096)
    # served env ids, a subset of SEALED_ENV_IDS; None = every registered one of them (never
    # eprl/Remote-v0 either: a remote env inside the service would let clients make it connect
    # anywhere)
    env_ids: tuple[str, ...] | None = None
    # modules imported to register env ids (in the server and, preloaded, in every worker)
    env_modules: tuple[str, ...] = ("envs",)
    call_timeout_s: float = Field(120.0, gt=0)
    # a reset may start a sandbox or an AppWorld server cold; None: call_timeout_s
    reset_timeout_s: float | None = Field(None, gt=0)
    create_timeout_s: float = Field(120.0, gt=0)
    idle_timeout_s: float = Field(600.0, gt=0)
    reap_interval_s: float = Field(10.0, gt=0)
    # SIGTERM: live sessions may finish their episodes for this long (new ones are refused,
    # /healthz answers 503), then shutdown_grace_s more for a call still running
    drain_grace_s: float = Field(30.0, ge=0)
    shutdown_grace_s: float = Field(10.0, ge=0)
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    max_action_chars: int = Field(262_144, ge=1)
    max_env_kwargs: int = Field(64, ge=0)
    # kwargs clients may not send; the server passes its value (None: not passed, the env's
    # default applies). These choose things on this host: CodeExec's `sandbox` could select the
    # weaker rlimits-only isolation or another interpreter, AppWorld's `python`, `root` and
    # `server_urls` a program, a directory or where to connect.
    # An operator's entry adds to these or sets their values; it never drops one (a config
    # giving AppWorld only its `root` must not let clients choose `python` or `server_urls`).
    pinned_env_kwargs: dict[str, dict[str, JsonValue]] = Field(
        default_factory=lambda: {env_id: dict(keys) for env_id, keys in ALWAYS_PINNED.items()}
    )
    # env id -> workers kept started and warmed (AppWorld: a sandboxed server answering) for the
    # next sessions of that env id (docs/serving.md, Warm sessions); absent or 0: none. They
    # share max_sessions with the sessions, which evict them when they need the room.
    warm_sessions: dict[str, Annotated[int, Field(ge=0, le=MAX_WARM_PER_ENV)]] = Field(
        default_factory=dict
    )
    # env id -> the kwargs (besides the pinned ones) warm workers are made with; a session whose
    # kwargs equal these (keys at the constructor's default aside) takes a warm worker
    warm_env_kwargs: dict[str, dict[str, JsonValue]] = Field(default_factory=dict)
    retry_after_s: int = Field(2, ge=1)
    start_method: Literal["forkserver", "spawn"] = "forkserver"
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    access_log: bool = True

    @field_validator("pinned_env_kwargs")
    @classmethod
    def _keep_the_isolation_pins(
        cls, pinned: dict[str, dict[str, JsonValue]]
    ) -> dict[str, dict[str, JsonValue]]:
        merged = {env_id: dict(keys) for env_id, keys in ALWAYS_PINNED.items()}
        for env_id, keys in pinned.items():
            merged[env_id] = {**merged.get(env_id, {}), **keys}
        return merged

    @field_validator("token")
    @classmethod
    def _token_is_usable(cls, token: SecretStr | None) -> SecretStr | None:
        if token is None or not token.get_secret_value():
            return None
        problem = token_problem(token.get_secret_value())
        if problem:
            raise ValueError(f"the token {problem}")
        return token

    @field_validator("tokens_file", "tls_certfile", "tls_keyfile")
    @classmethod
    def _file_exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"no such file: {str(path)!r}")
        return path

    @model_validator(mode="after")
    def _token_required_off_loopback(self) -> "ServeSettings":
        if self.token is None and self.tokens_file is None and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve on {self.host!r} without a token: binding to a non-loopback "
                f"address requires a bearer token (--token, the {TOKEN_ENV_VAR} environment "
                "variable or tokens_file), or bind to 127.0.0.1"
            )
        if self.authenticated and self.log_level == "trace":
            raise ValueError("log level 'trace' prints request headers (the token); use 'debug'")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError(
                "TLS needs both tls_certfile and tls_keyfile (got only "
                f"{'tls_certfile' if self.tls_keyfile is None else 'tls_keyfile'})"
            )
        self._check_warm()
        return self

    def _check_warm(self) -> None:
        """warm_sessions and warm_env_kwargs name served env ids, fit in max_sessions, and set
        no pinned kwarg (no client could send it, so no session would ever match)."""
        served = SEALED_ENV_IDS if self.env_ids is None else self.env_ids
        for key in ("warm_sessions", "warm_env_kwargs"):
            for env_id in getattr(self, key):
                if env_id not in served:
                    raise ValueError(
                        f"{key}: {env_id!r} is not a served env id (served: {list(served)})"
                    )
        total = sum(self.warm_sessions.values())
        if total > self.max_sessions:
            raise ValueError(
                f"warm_sessions: {total} warm workers in all ({dict(self.warm_sessions)}) exceed "
                f"max_sessions ({self.max_sessions}), which bounds sessions and warm workers "
                "together"
            )
        for env_id, kwargs in self.warm_env_kwargs.items():
            pinned = sorted(set(kwargs) & set(self.pinned_kwargs(env_id)))
            if pinned:
                raise ValueError(
                    f"warm_env_kwargs: {env_id} sets {pinned}, which are pinned (clients cannot "
                    "send them, so no session would match): set them in pinned_env_kwargs"
                )

    @property
    def authenticated(self) -> bool:
        """Whether requests need a bearer token (a token or a tokens file is configured)."""
        return self.token is not None or self.tokens_file is not None

    @property
    def tls(self) -> bool:
        return self.tls_certfile is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def timeout_of(self, op: str) -> float:
        """The time limit of one ``op`` call (reset may start sandboxes cold)."""
        if op == "reset" and self.reset_timeout_s is not None:
            return self.reset_timeout_s
        return self.call_timeout_s

    def pinned_kwargs(self, env_id: str) -> dict[str, JsonValue]:
        """The kwargs of ``env_id`` that clients may not send (None values: left to the env)."""
        return self.pinned_env_kwargs.get(env_id, {})


def served_env_ids(settings: ServeSettings) -> tuple[str, ...]:
    """The env ids this service will create sessions for."""
    from gymnasium.envs.registration import registry

    for module in settings.env_modules:
        __import__(module)
    if settings.env_ids is not None:
        unknown = [env_id for env_id in settings.env_ids if env_id not in registry]
        if unknown:
            raise ValueError(f"env ids not registered with gymnasium: {unknown}")
        unsealed = [env_id for env_id in settings.env_ids if env_id not in SEALED_ENV_IDS]
        if unsealed:
            raise ValueError(
                f"env ids {unsealed} are not sealed environments: the service offers only "
                f"{list(SEALED_ENV_IDS)}, whose code runs sandboxed away from their rewards"
            )
        return tuple(settings.env_ids)
    return tuple(sorted(env_id for env_id in SEALED_ENV_IDS if env_id in registry))
