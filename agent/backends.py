"""Build a policy: every policy in eprl (training, ``eprl eval``, ``eprl rollout``, the demo,
the entropy study) is built by :func:`build_policy` from a :class:`agent.config.PolicyConfig`."""

from __future__ import annotations

import os
import sys
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
    - ``vllm``: a model name or folder; ``cfg.vllm`` sets the engine; ``max_model_len`` (an
      evaluation's context budget) applies unless ``cfg.vllm.max_model_len`` was set.
    - ``openai``: the server's URL, ``URL[#model=NAME&tokenizer=NAME_OR_FOLDER]``; the served
      model defaults to the first the server lists, the tokenizer to the served model's name.

    ``seed`` seeds vLLM's sampler; ``hf`` samples from torch's global RNG, which callers seed.
    Errors name the model and what was expected (:class:`ValueError`; a missing model raises
    :class:`agent.models.ModelNotFoundError`).
    """
    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown policy backend {cfg.backend!r}; expected one of {BACKENDS}")
    announce_backend(cfg)
    is_url = isinstance(model, str) and model.startswith(("http://", "https://"))
    if cfg.backend == "openai" and cfg.server.urls:
        return _server_policy(cfg, tokenizer)
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
            # policy.vllm.max_model_len when set (e.g. `eprl eval --max-model-len`), else the
            # caller's context budget, else the default
            max_model_len=(
                v.max_model_len
                if "max_model_len" in v.model_fields_set
                else max_model_len or v.max_model_len
            ),
            tensor_parallel_size=v.tensor_parallel_size,
            gpu_memory_utilization=v.gpu_memory_utilization,
            enforce_eager=v.enforce_eager,
            fp32_head=v.fp32_head,
            sleep_mode=v.sleep_mode,
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


def backend_reason(cfg: PolicyConfig) -> str:
    """Why ``cfg.backend`` is the backend: named in the config, or the default and why."""
    if "backend" in cfg.model_fields_set:
        return "set in the config / on the command line"
    if cfg.backend == "vllm":
        return "the default: vLLM is importable"
    from agent.vllm_policy import vllm_available

    if vllm_available():
        return "the default for a multi-rank run without CUDA: each rank samples with its learner"
    return "the default: vLLM is not installed (`make setup` installs it)"


def announce_backend(cfg: PolicyConfig) -> None:
    """One line on stderr saying which sampler runs and why, so a run's log shows it."""
    print(f"eprl: policy backend {cfg.backend} ({backend_reason(cfg)})", file=sys.stderr)


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


def _server_policy(cfg: PolicyConfig, tokenizer: Any):
    """Server mode: the servers of ``cfg.server`` (the learner's tokenizer, since both hold the
    same model), pushed new weights through ``cfg.server.weights_folder``."""
    from agent.openai_policy import OpenAIPolicy
    from agent.weight_sync import shm_folder

    if tokenizer is None:
        raise ValueError("policy.server: server mode needs the learner's tokenizer")
    s = cfg.server
    served = s.model or _served_model(s.urls[0])
    folder = s.weights_folder or str(shm_folder("server"))
    return OpenAIPolicy(
        s.urls,
        served,
        tokenizer,
        cfg.temperature,
        cfg.top_p,
        weights_folder=folder,
        weights_dtype=s.weights_dtype,
    )
