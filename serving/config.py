"""``eprl serve --config serve.yaml``: the service's settings from a YAML file plus overrides.

The file's keys are the fields of :class:`serving.settings.ServeSettings` (``configs/serve.yaml``
lists every one with its default). Overrides win over the file, key by key: the ``eprl serve``
flags, ``--set key=value`` (dotted keys reach into mappings, values parse as YAML), and for the
token the ``EPRL_TOKEN`` environment variable. Errors read like those of run configs
(:mod:`trainer.config`): one line per bad key, naming the key and the value it got; a token's
value is never shown.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from agent.io import read_data_file
from serving.settings import TOKEN_ENV_VAR, ServeSettings

_SECRET_KEYS = frozenset({"token"})


class ServeConfigError(ValueError):
    """The serve config or an override is invalid; the message names the key and the value."""


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid serve config ({source}):"]
    valid = ", ".join(sorted(ServeSettings.model_fields))
    for issue in err.errors():
        key = ".".join(str(part) for part in issue["loc"]) or "<root>"
        message = issue["msg"].removeprefix("Value error, ")
        if issue["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (valid: {valid})")
        elif not issue["loc"]:
            lines.append(f"  {message}")
        elif issue["loc"][0] in _SECRET_KEYS:
            lines.append(f"  {key}: {message} (the value is not shown)")
        else:
            lines.append(f"  {key}: {message} (got {issue.get('input')!r})")
    return "\n".join(lines)


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML config file (an empty file is an empty mapping)."""
    p = Path(path)
    loaded = read_data_file(p, "serve config file", "YAML", error=ServeConfigError)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ServeConfigError(
            f"serve config file {str(p)!r} must hold a mapping of settings, "
            f"got {type(loaded).__name__}"
        )
    return loaded


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["idle_timeout_s=30", "pinned_env_kwargs.eprl/CodeExec-v0.sandbox=null"]`` -> a tree."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ServeConfigError(f"--set {item!r} is not of the form key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ServeConfigError(f"--set {key!r}: cannot parse value {raw!r}: {exc}") from None
        *parents, last = key.strip().split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ServeConfigError(f"--set {key!r}: {part!r} is set to a value already")
        node[last] = value
    return tree


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_serve_settings(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServeSettings:
    """The settings of ``path`` (None: the defaults) with ``overrides`` applied.

    Overrides whose value is None are left out (a flag not given). Without a token among the
    overrides, ``$EPRL_TOKEN`` (from ``environ``) overrides the file's.
    """
    environ = os.environ if environ is None else environ
    tree = read_config_file(path) if path is not None else {}
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    if "token" not in given and environ.get(TOKEN_ENV_VAR):
        given["token"] = environ[TOKEN_ENV_VAR]
    tree = _merge(tree, given)
    source = str(path) if path is not None else "arguments"
    try:
        return ServeSettings.model_validate(tree)
    except ValidationError as err:
        raise ServeConfigError(_format(err, source)) from None
