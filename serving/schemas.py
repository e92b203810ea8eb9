"""The service's request and response bodies (pydantic models; FastAPI derives the OpenAPI schema).

Bodies that carry env kwargs or actions depend on the settings (the served env ids, their
constructor signatures, the pinned kwargs, the size limits), so :func:`request_models` builds
them per app: the OpenAPI schema is then exact, and a fuzzer can generate valid sessions from it.
"""

import inspect
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    TypeAdapter,
    create_model,
    model_validator,
)

from serving.settings import ServeSettings

SESSION_ID_PATTERN = r"^[0-9a-f]{32}$"


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


def _env_request_model(prefix: str, env_ids: tuple[str, ...], settings: ServeSettings) -> Any:
    """Request body {env_id, env_kwargs}: one variant per env id, discriminated by env_id."""
    any_kwargs = Annotated[
        dict[Annotated[str, Field(max_length=128)], JsonValue],
        Field(max_length=settings.max_env_kwargs, description="constructor kwargs (JSON values)"),
    ]
    variants = []
    for env_id in env_ids:
        kwargs_model = env_kwargs_model(env_id, settings.pinned_kwargs(env_id))
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


@dataclass(frozen=True)
class RequestModels:
    """The request bodies whose schema depends on the settings (see the module docstring)."""

    create_session: Any
    describe: Any
    step: type[BaseModel]


def request_models(settings: ServeSettings, env_ids: tuple[str, ...]) -> RequestModels:
    """Build the settings-dependent request bodies for an app serving ``env_ids``."""
    step = create_model(
        "StepRequest",
        __base__=StrictModel,
        __validators__={"text_ok": model_validator(mode="after")(_text_ok)},
        action=(str, Field(..., max_length=settings.max_action_chars)),
    )
    return RequestModels(
        create_session=_env_request_model("CreateSession", env_ids, settings),
        describe=_env_request_model("Describe", env_ids, settings),
        step=step,
    )


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
    reset_timeout_s: float
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


class TruncateRequest(StrictModel):
    reason: str = Field(
        "context_limit",
        min_length=1,
        max_length=64,
        pattern=r"^[a-z][a-z0-9_]*$",
        description="why the client cuts the episode (recorded as info.truncation_reason)",
    )


class TruncateResponse(BaseModel):
    graded: bool = Field(
        description="false: this environment cannot grade a cut episode (reward 0, info empty)"
    )
    reward: float
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


class EnvDefaults(BaseModel):
    """The budgets an env declares (``env.unwrapped.defaults``); evaluators size runs by them."""

    max_turns: int = Field(description="turns per episode")
    max_new_tokens: int = Field(description="generation budget of one agent turn")
    max_context_tokens: int = Field(description="prompt plus every turn of one episode")
    max_parallel_episodes: int | None = Field(
        description="episodes the env can run at once; null: no env-side limit"
    )


class EnvDescription(BaseModel):
    env_id: str
    env_kwargs: dict[str, JsonValue]
    observation_space: SpaceSpec
    action_space: SpaceSpec
    splits: list[str]
    task_ids: dict[str, list[str]]
    defaults: EnvDefaults


class Health(BaseModel):
    status: Literal["ok", "draining", "shutting_down", "starting"]
    sessions_active: int
    max_sessions: int
    accepting_sessions: bool
