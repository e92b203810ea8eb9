"""Checkpoints: ``checkpoints/step_N/`` holds HF safetensors + tokenizer (loadable by
transformers and vLLM as they are), ``trainer_state.pt`` (step, task cursor, controllers, RNGs)
and the learner's optimizer state. Each is written to a temporary folder renamed when complete,
so a run killed at any moment (SIGKILL included) resumes from its last complete checkpoint.

The weights are streamed: rank 0 writes ``model-0000i-of-0000N.safetensors`` shards of at most
``checkpoint.max_shard_gb`` as the learner's export yields them (a bucket of modules at a time
under ZeRO-3), so the host memory a checkpoint costs is one shard, not the model (64 GB in bf16
for 32B). The folder is what ``save_pretrained`` writes: config (dtype, architectures),
generation config, shards and their index (``model.safetensors`` alone when one shard holds
it). A model whose checkpoint format transformers converts on save (its conversion mapping is
not empty) is written by ``save_pretrained`` from the gathered weights instead.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from agent.io import replace_dir
from trainer.distributed import barrier, dist_info
from trainer.learner import hf_model

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.pt"
RANK_RNG = "rng_rank{rank}.pt"
WEIGHTS_INDEX = "model.safetensors.index.json"
GB = 10**9


def _step_dirs(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    return sorted(
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    )


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete ``checkpoints/step_N`` of a run, or None."""
    steps = _step_dirs(run_dir / "checkpoints")
    return steps[-1][1] if steps else None


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    learner,
    tokenizer,
    trainer_state: dict,
    save_optimizer: bool,
    keep_last: int,
    is_main: bool,
    max_shard_gb: float = 5.0,
) -> Path:
    """Write ``checkpoints/step_N`` atomically (every rank calls it: the learner's state may be
    sharded), then keep only the last ``keep_last`` checkpoints."""
    folder = run_dir / "checkpoints"
    final = folder / f"step_{step}"
    tmp = folder / f".tmp_step_{step}"
    # every rank gathers (ZeRO-3); with LoRA the weights are merged under the base names, and
    # the base model's class writes them, so transformers and vLLM load the folder as it is
    model = hf_model(learner.lm)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if _converts_on_save(model):
        weights = {}
        for name, tensor in learner.named_weights():
            if is_main:  # the other ranks only take part in the gathers
                weights[name] = tensor
        if is_main:
            model.save_pretrained(tmp, state_dict=weights, safe_serialization=True)
    else:
        # every rank drains the export (its gathers are collective); rank 0 writes the shards
        shard_bytes = max(1, int(max_shard_gb * GB))
        write_weights(model, learner.named_weights(), tmp if is_main else None, shard_bytes)
    if is_main:
        tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / TRAINER_STATE)
    barrier()
    # each rank's own RNG streams (its rollouts sample with them), so a resume on N ranks
    # continues every rank where it stopped, not all from rank 0's state
    rank, _ = dist_info()
    torch.save(rng_state(), tmp / RANK_RNG.format(rank=rank))
    if save_optimizer:
        learner.save_state(tmp)
    barrier()
    if is_main:
        replace_dir(tmp, final)
        for _, path in _step_dirs(folder)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    """The trainer state, with this rank's own RNG state where the checkpoint has one."""
    state = torch.load(checkpoint / TRAINER_STATE, weights_only=False)
    rank, _ = dist_info()
    own = checkpoint / RANK_RNG.format(rank=rank)
    if own.is_file():
        state["rng"] = torch.load(own, weights_only=False)
    return state


def has_learner_state(checkpoint: Path) -> bool:
    return (checkpoint / "learner.pt").exists() or (checkpoint / "deepspeed").exists()


def _converts_on_save(model) -> bool:
    """Whether ``save_pretrained`` would rewrite this model's weights into another checkpoint
    layout (transformers' conversion mapping, e.g. fused MoE experts): then only it can write
    them. Dense Qwen2/Qwen3/Llama have none. When the mapping cannot be read, assume it does."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:
        return True
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        conversions = get_model_conversion_mapping(model, add_legacy=False)
        conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    return bool(conversions)


def _tied_targets(model) -> dict[str, str]:
    """``{tied weight: the weight it is tied to}`` when the config ties them (as
    ``save_pretrained`` leaves the tied copy out: from_pretrained ties it again)."""
    text_config = model.config.get_text_config()
    if not getattr(text_config, "tie_word_embeddings", False):
        return {}
    tied = getattr(model, "_tied_weights_keys", None)
    return dict(tied) if isinstance(tied, dict) else {}


def write_weights(
    model, named: Iterable[tuple[str, torch.Tensor]], folder: Path | None, max_shard_bytes: int
) -> int:
    """Stream ``named`` (HF name, full tensor) into safetensors shards in ``folder`` as
    ``save_pretrained`` lays them out, holding at most one shard (or one larger tensor) at a
    time; with ``folder`` None only drain ``named`` (a rank that takes part in the gathers).
    A weight tied to one already written is left out, as ``save_pretrained`` leaves it. Writes
    the config and generation config too. Returns the most bytes held at once."""
    from safetensors.torch import save_file

    held: dict[str, torch.Tensor] = {}
    held_bytes = peak = total = 0
    shards: list[list[str]] = []

    def flush() -> None:
        nonlocal held, held_bytes
        if held:
            save_file(held, str(folder / f".shard_{len(shards)}"), metadata={"format": "pt"})
            shards.append(list(held))
            held, held_bytes = {}, 0

    tied = _tied_targets(model)
    seen: set[str] = set()
    for name, tensor in named:
        if folder is None:
            continue
        seen.add(name)
        if tied.get(name) in seen:  # a tied copy (lm_head of tied embeddings): re-tied on load
            continue
        size = tensor.numel() * tensor.element_size()
        if held and held_bytes + size > max_shard_bytes:
            flush()
        held[name] = tensor.contiguous()
        held_bytes += size
        total += size
        peak = max(peak, held_bytes)
    if folder is None:
        return 0
    flush()
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for index, name in enumerate(names):
        (folder / f".shard_{index}").rename(folder / name)
    if len(shards) > 1:
        weight_map = {key: names[i] for i, keys in enumerate(shards) for key in keys}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    # as save_pretrained records them: the weights' dtype and the class that loads them
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    return peak
