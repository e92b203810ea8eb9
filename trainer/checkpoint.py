"""Checkpoints: ``checkpoints/step_N/`` holds HF safetensors + tokenizer (loadable by
transformers and vLLM as they are), ``trainer_state.pt`` (step, task cursor, controllers, RNGs)
and the learner's optimizer state. Each is written to a temporary folder renamed when complete,
so a run killed at any moment (SIGKILL included) resumes from its last complete checkpoint."""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from agent.io import replace_dir
from trainer.distributed import barrier, dist_info
from trainer.learner import hf_model

_STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.pt"
RANK_RNG = "rng_rank{rank}.pt"


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
) -> Path:
    """Write ``checkpoints/step_N`` atomically (every rank calls it: the learner's state may be
    sharded), then keep only the last ``keep_last`` checkpoints."""
    folder = run_dir / "checkpoints"
    final = folder / f"step_{step}"
    tmp = folder / f".tmp_step_{step}"
    # every rank gathers (ZeRO-3); with LoRA the weights are merged under the base names, and
    # the base model's class writes them, so transformers and vLLM load the folder as it is
    weights = {}
    for name, tensor in learner.named_weights():
        if is_main:  # the other ranks only take part in the gathers
            weights[name] = tensor
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        hf_model(learner.lm).save_pretrained(tmp, state_dict=weights, safe_serialization=True)
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
