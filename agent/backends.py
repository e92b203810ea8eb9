"""Build a policy: every policy in eprl (training, ``eprl eval``, ``eprl rollout``, the demo,
the entropy study) is built by :func:`build_policy` from a :class:`agent.config.PolicyConfig`."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs

from agent.config import BACKENDS, PolicyConfig


def build_policy(
    cfg: PolicyConfig,
    model: Any,
    *,
    tokenizer: Any = None,
    seed: int = 0,
    max_model_len: int | None = None,
):
    """The policy ``cfg.backend`` names, sampling at ``cfg.temperature`` / ``cfg.top_p``.

    ``model`` is, by backend:

    - ``hf``: a loaded ``transformers`` module (then ``tokenizer`` is required; a training run
      passes the learner's own module, so pushing weights costs nothing), or a model name or
      folder, loaded on the GPU when there is one.
    - ``vllm``: a model name or folder; ``cfg.vllm`` sets the engine, ``max_model_len``
      overrides ``cfg.vllm.max_model_len`` (an evaluation's context budget).
    - ``openai``: the server's URL, ``URL[#model=NAME&tokenizer=NAME_OR_FOLDER]``; the served
      model defaults to the first the server lists, the tokenizer to the served model's name.

    ``seed`` seeds vLLM's sampler; ``hf`` samples from torch's global RNG, which callers seed.
    Errors name the model and what was expected (:class:`ValueError`; a missing model raises
    :class:`agent.models.ModelNotFoundError`).
    """
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown policy backend {cfg.backend!r}; expected one of {BACKENDS}")
    is_url = isinstance(model, str) and model.startswith(("http://", "https://"))
    if cfg.backend == "openai":
        if not is_url:
            raise ValueError(
                f"the openai backend needs the server's http(s) URL as the model, got {model!r}"
            )
        return _openai_policy(cfg, model)
    if is_url:
        raise ValueError(f"model {model!r} is a URL: use the openai backend for a served model")
    if cfg.backend == "vllm":
        from agent.models import resolve_model
        from agent.vllm_policy import VLLMPolicy

        if not isinstance(model, str | os.PathLike):
            raise ValueError("the vllm backend loads a model name or folder, not a loaded module")
        v = cfg.vllm
        return VLLMPolicy(
            resolve_model(str(model)),
            cfg.temperature,
            cfg.top_p,
            dtype=v.dtype,
            max_model_len=max_model_len or v.max_model_len,
            tensor_parallel_size=v.tensor_parallel_size,
            gpu_memory_utilization=v.gpu_memory_utilization,
            enforce_eager=v.enforce_eager,
            fp32_head=v.fp32_head,
            seed=seed,
        )
    from agent.policy import HFPolicy

    if isinstance(model, str | os.PathLike):
        import torch

        from agent.models import load_model, load_tokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        tokenizer = tokenizer or load_tokenizer(str(model))
        model = load_model(str(model), device=device)
    elif tokenizer is None:
        raise ValueError("build_policy: a loaded hf model needs its tokenizer")
    return HFPolicy(model, tokenizer, cfg.temperature, cfg.top_p)


def parse_openai_target(url: str) -> tuple[str, str | None, str | None]:
    """``URL[#model=NAME&tokenizer=NAME_OR_FOLDER]`` -> (base URL, served model, tokenizer)."""
    base, _, fragment = url.partition("#")
    options = {key: values[-1] for key, values in parse_qs(fragment).items()}
    unknown = set(options) - {"model", "tokenizer"}
    if unknown:
        raise ValueError(
            f"model {url!r}: unknown option(s) {sorted(unknown)} after '#'; "
            "expected model=NAME and/or tokenizer=NAME_OR_FOLDER"
        )
    return base, options.get("model"), options.get("tokenizer")


def _served_model(base: str) -> str:
    import httpx

    try:
        response = httpx.get(base.rstrip("/") + "/models", timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except Exception as exc:
        raise ValueError(
            f"model {base!r}: could not list the served models at {base.rstrip('/')}/models "
            f"({exc}); name it with '#model=NAME'"
        ) from None


def _openai_policy(cfg: PolicyConfig, url: str):
    from agent.models import load_tokenizer
    from agent.openai_policy import OpenAIPolicy

    base, served, tokenizer_name = parse_openai_target(url)
    served = served or _served_model(base)
    try:
        tokenizer = load_tokenizer(tokenizer_name or served)
    except Exception as exc:
        raise ValueError(
            f"model {url!r}: no tokenizer {tokenizer_name or served!r} here "
            f"({type(exc).__name__}); name a local folder or the embedded model with "
            "'#tokenizer=NAME_OR_FOLDER'"
        ) from None
    return OpenAIPolicy(base, served, tokenizer, cfg.temperature, cfg.top_p)
