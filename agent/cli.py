"""`eprl rollout`: sample episodes with a policy and write them as JSONL, with a summary."""

from __future__ import annotations

import json
import random
from collections import Counter

from agent.backends import build_policy
from agent.chat import ChatFormat
from agent.config import PolicyConfig
from agent.rollout import RolloutRunner, write_jsonl


def rollout_cli(
    *,
    model: str,
    env: str,
    split: str,
    k: int,
    num_tasks: int,
    out: str,
    backend: str,
    max_turns: int,
    max_new_tokens: int,
    temperature: float,
    env_kwargs: str | None,
    seed: int,
    vllm: dict | None = None,
) -> list:
    import gymnasium
    from rich.console import Console
    from rich.table import Table

    import envs  # noqa: F401  (registers the ids)

    kwargs = json.loads(env_kwargs) if env_kwargs else {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"--env-kwargs must be a JSON object, got {env_kwargs!r}")
    if env not in gymnasium.registry:
        raise ValueError(f"unknown environment {env!r}; `eprl envs` lists them")

    def make_env():
        return gymnasium.make(env, **kwargs)

    probe = make_env()
    try:
        tasks = list(probe.unwrapped.task_ids(split))
    finally:
        probe.close()
    random.Random(seed).shuffle(tasks)
    tasks = tasks[:num_tasks]

    cfg = PolicyConfig(backend=backend, temperature=temperature, vllm=vllm or {})
    policy = build_policy(cfg, model, seed=seed)
    runner = RolloutRunner(
        policy,
        make_env,
        ChatFormat(policy.tokenizer),
        group_size=k,
        max_turns=max_turns,
        max_new_tokens=max_new_tokens,
        max_context_tokens=max(4096, max_new_tokens * (max_turns + 1) * 2),
        progress=True,
    )
    episodes = runner.run(tasks, seed=seed)
    write_jsonl(out, episodes)

    stats = runner.last_stats
    ends = Counter(
        ep.truncation_reason or ("error" if ep.error else "terminated") for ep in episodes
    )
    table = Table(title=f"{env} / {split}: {len(tasks)} tasks x {k}")
    table.add_column("metric")
    table.add_column("value")
    rows = [
        ("episodes", f"{len(episodes)}"),
        ("mean reward", f"{sum(ep.reward for ep in episodes) / len(episodes):.3f}"),
        ("success rate", f"{sum(ep.success for ep in episodes) / len(episodes):.3f}"),
        ("turns / episode", f"{stats.turns / len(episodes):.2f}"),
        ("sampled tokens / episode", f"{stats.sampled_tokens / len(episodes):.1f}"),
        ("episode ends", ", ".join(f"{k}: {v}" for k, v in sorted(ends.items()))),
        ("tokens / s", f"{stats.tokens_per_s:.1f}"),
        ("output", out),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    return episodes


def vllm_options(
    tensor_parallel_size: int | None = None,
    gpu_memory_utilization: float | None = None,
    dtype: str | None = None,
    max_model_len: int | None = None,
) -> dict:
    """The ``policy.vllm`` settings given on the command line (``eprl eval`` / ``eprl
    rollout``); unset ones keep :class:`agent.config.VLLMConfig`'s defaults. Validated here so a
    bad value fails before any model loads, naming the flag."""
    from pydantic import ValidationError

    from agent.config import VLLMConfig

    given = {
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "dtype": dtype,
        "max_model_len": max_model_len,
    }
    given = {key: value for key, value in given.items() if value is not None}
    try:
        VLLMConfig(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        flag = "--" + str(error["loc"][0]).replace("_", "-")
        raise ValueError(f"{flag} {given.get(str(error['loc'][0]))!r}: {error['msg']}") from None
    return given
