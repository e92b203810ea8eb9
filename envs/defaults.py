"""The budgets an environment declares for agents that run it: ``env.unwrapped.defaults``.

Every eprl environment has a ``defaults`` mapping with these keys (see each environment's
docstring for where its numbers come from); evaluation, rollouts and the environment service read
it instead of keeping a table of environment ids:

- ``max_turns``: agent turns per episode;
- ``max_new_tokens``: tokens the agent may generate per turn;
- ``max_context_tokens``: the conversation's token budget (capped by the model's window);
- ``max_parallel_episodes``: episodes that can run at once (None: no limit of the env's own,
  e.g. AppWorld's server pool bounds it).
"""

from __future__ import annotations

from typing import Any

DEFAULT_KEYS = ("max_turns", "max_new_tokens", "max_context_tokens", "max_parallel_episodes")


def generic_defaults(max_turns: int | None) -> dict[str, int | None]:
    """Budgets for an environment that declares none: 512 new tokens per turn, a context of
    2048 tokens for a single-turn environment and 16384 otherwise, no parallel limit."""
    turns = int(max_turns or 1)
    return {
        "max_turns": turns,
        "max_new_tokens": 512,
        "max_context_tokens": 2048 if turns == 1 else 16384,
        "max_parallel_episodes": None,
    }


def env_defaults(env: Any) -> dict[str, int | None]:
    """``env.unwrapped.defaults`` checked for its keys, or :func:`generic_defaults` for an
    environment (anyone's Gymnasium env) that declares none."""
    inner = getattr(env, "unwrapped", env)
    declared = getattr(inner, "defaults", None)
    if declared is None:
        return generic_defaults(getattr(inner, "max_turns", None))
    missing = [key for key in DEFAULT_KEYS if key not in declared]
    if missing:
        raise ValueError(
            f"{type(inner).__name__}.defaults lacks {missing}; expected the keys {list(DEFAULT_KEYS)}"
        )
    return {key: declared[key] for key in DEFAULT_KEYS}
