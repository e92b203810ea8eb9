"""Build a policy backend by name: the one place that maps `hf | vllm | openai` to a class."""

from __future__ import annotations

from agent.models import load_model, load_tokenizer, resolve_model

BACKENDS = ("hf", "vllm", "openai")


def build_policy(
    backend: str,
    model: str,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    device: str = "auto",
    seed: int = 0,
    tokenizer_name: str | None = None,
    served_model: str | None = None,
):
    """``model`` is a model name/folder for hf and vllm, or the server URL for openai (then
    ``tokenizer_name`` names the tokenizer, default the embedded model's, and ``served_model``
    the name the server knows the model by)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown policy backend {backend!r}; expected one of {BACKENDS}")
    if backend == "openai":
        from agent.openai_policy import OpenAIPolicy

        tokenizer = load_tokenizer(tokenizer_name or "smollm2-135m-instruct")
        return OpenAIPolicy(model, served_model or "default", tokenizer, temperature, top_p)
    if backend == "vllm":
        from agent.vllm_policy import VLLMPolicy

        return VLLMPolicy(resolve_model(model), temperature, top_p, seed=seed)
    import torch

    from agent.policy import HFPolicy

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return HFPolicy(
        load_model(model, device=device), load_tokenizer(model), temperature, top_p, seed=seed
    )
