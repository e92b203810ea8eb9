"""``eprl eval``: check the arguments, build the policy, run the evaluation resumably, print it.

The budgets (turns, new tokens per turn, context) are those the environment declares
(``env.unwrapped.defaults``, :mod:`envs.defaults`), the context capped by the model's window.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from agent.chat import ChatFormat
from agent.config import BACKENDS, PolicyConfig
from agent.rollout import parallel_episodes
from envs.defaults import env_defaults
from trainer.evaluation.intervals import Bootstrap
from trainer.evaluation.report import print_compare, print_result
from trainer.evaluation.runner import run_evaluation


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def default_out(model: str, env: str, split: str, k: int, env_kwargs: dict | None) -> Path:
    """``evals/<model>__<env>__<split>__k<K>[__kw<hash>].json``; a checkpoint folder
    ``runs/R/checkpoints/step_N`` is named ``R-step_N``."""
    if model.startswith(("http://", "https://")):
        name = model.split("://", 1)[1].split("#", 1)[0]
    else:
        path = Path(model)
        name = path.name
        if re.fullmatch(r"step_\d+", name) and path.parent.name == "checkpoints":
            name = f"{path.parent.parent.name}-{name}"
    parts = [_slug(name), _slug(env.split("/")[-1]), _slug(split), f"k{k}"]
    if env_kwargs:
        parts.append(
            "kw" + hashlib.sha1(json.dumps(env_kwargs, sort_keys=True).encode()).hexdigest()[:8]
        )
    return Path("evals") / ("__".join(parts) + ".json")


def _load_policy(
    model: str,
    backend: str,
    temperature: float,
    top_p: float,
    seed: int,
    max_context: int,
    vllm: dict | None = None,
):
    """The policy of ``--backend`` for ``--model``; errors name the flag and what was expected."""
    from agent.backends import build_policy
    from agent.models import ModelNotFoundError

    is_url = model.startswith(("http://", "https://"))
    if backend == "openai" and not is_url:
        raise ValueError(
            f"--backend openai needs --model to be the server's http(s) URL, got {model!r}"
        )
    if backend != "openai" and is_url:
        raise ValueError(f"--model {model!r} is a URL: use --backend openai for a served model")
    cfg = PolicyConfig(backend=backend, temperature=temperature, top_p=top_p, vllm=vllm or {})
    try:
        return build_policy(cfg, model, seed=seed, max_model_len=max_context)
    except ModelNotFoundError as exc:
        raise ValueError(str(exc)) from None
    except (OSError, ImportError) as exc:
        raise ValueError(f"cannot load model {model!r} with backend {backend!r}: {exc}") from None


def _model_window(policy) -> int | None:
    config = getattr(getattr(policy, "model", None), "config", None)
    return getattr(config, "max_position_embeddings", None)


def evaluate_cli(
    model: str,
    env: str,
    split: str,
    k: int,
    backend: str,
    out: str | None,
    num_tasks: int | None,
    env_kwargs: str | None,
    compare: list[str] | None,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    confidence: float = 0.95,
    resamples: int = 2000,
    vllm: dict | None = None,
) -> dict[str, Any] | str:
    """`eprl eval`: evaluate (resumably) and write ``out`` + ``.md``; or, with ``compare``,
    print the side-by-side table of those result files with the paired differences from the
    first and return its Markdown. Intervals: ``confidence``, ``resamples`` bootstrap replicates
    (:mod:`trainer.evaluation.intervals`)."""
    import gymnasium

    import envs  # noqa: F401  (registers the ids)

    try:
        boot = Bootstrap(confidence=confidence, resamples=resamples)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None
    if compare:
        return print_compare(compare, boot)
    if backend not in BACKENDS:
        raise ValueError(f"unknown --backend {backend!r}; expected one of {BACKENDS}")
    if k < 1:
        raise ValueError(f"--k must be >= 1, got {k}")
    if num_tasks is not None and num_tasks < 1:
        raise ValueError(f"--num-tasks must be >= 1, got {num_tasks}")
    try:
        kwargs = json.loads(env_kwargs) if env_kwargs else {}
    except json.JSONDecodeError as exc:
        raise ValueError(f"--env-kwargs {env_kwargs!r} is not valid JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--env-kwargs must be a JSON object, got {env_kwargs!r}")
    if env not in gymnasium.registry:
        known = sorted(name for name in gymnasium.registry if name.startswith("eprl/"))
        raise ValueError(
            f"unknown environment {env!r}; expected one of {known} (`eprl envs` lists them)"
        )

    def make_env():
        return gymnasium.make(env, **kwargs)

    try:
        probe = make_env()
    except TypeError as exc:
        raise ValueError(f"--env-kwargs {kwargs} do not fit {env}: {exc}") from None
    try:
        splits = list(getattr(probe.unwrapped, "splits", []))
        if splits and split not in splits:
            raise ValueError(f"unknown split {split!r} for {env}; expected one of {splits}")
        task_ids = list(probe.unwrapped.task_ids(split))
        budget = env_defaults(probe)
    finally:
        probe.close()
    if not task_ids:
        raise ValueError(f"split {split!r} of {env} has no tasks")
    task_ids = task_ids[:num_tasks] if num_tasks else task_ids

    max_turns, max_new_tokens = budget["max_turns"], budget["max_new_tokens"]
    max_context = budget["max_context_tokens"]
    policy = _load_policy(model, backend, temperature, top_p, seed, max_context, vllm)
    tokenizer = policy.tokenizer
    window = _model_window(policy)
    if window:
        max_context = min(max_context, window)
    if max_context <= max_new_tokens:
        raise ValueError(
            f"model {model!r} has a context of {max_context} tokens, not more than "
            f"the {max_new_tokens} new tokens per turn {env} needs"
        )
    out_path = Path(out) if out else default_out(model, env, split, k, kwargs)
    settings = {
        "model": model,
        "env": env,
        "split": split,
        "backend": backend,
        "env_kwargs": kwargs,
        "temperature": temperature,
        "top_p": top_p,
        "vocab_size": len(tokenizer),
    }
    result = run_evaluation(
        policy,
        make_env,
        ChatFormat(tokenizer),
        task_ids,
        k,
        out_path,
        settings,
        max_turns=max_turns,
        max_new_tokens=max_new_tokens,
        max_context_tokens=max_context,
        seed=seed,
        max_episodes=parallel_episodes(backend, budget["max_parallel_episodes"]),
        progress=progress,
        bootstrap=boot,
    )
    print_result(result, out_path)
    return result
