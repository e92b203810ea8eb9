"""What the training loop needs of torch.distributed: the rank's device, rank and world size,
and the few collectives every rank must call together (a flag or-ed, metrics averaged)."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import torch


def pick_device(choice: str) -> torch.device:
    """cpu, or this rank's GPU (LOCAL_RANK, set by the deepspeed launcher and torchrun)."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is available")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_info() -> tuple[int, int]:
    """(rank, world size): from the process group, else the launcher's variables, else (0, 1)."""
    if is_distributed():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if is_distributed() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def collective_device() -> torch.device:
    """Where the process group's collectives take their tensors: the rank's GPU for NCCL (which
    rejects CPU tensors), the CPU for gloo. Every collective of the loop goes through here."""
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """``values`` reduced over the ranks (``op`` sum or max) on :func:`collective_device`,
    returned on the CPU; the values themselves in a single process."""
    if not is_distributed():
        return values
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}
    if op not in reduce_op:
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    on_device = values.to(collective_device())
    torch.distributed.all_reduce(on_device, op=reduce_op[op])
    return on_device.cpu()


def gather_objects(value: object) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank; ``[value]`` alone."""
    if not is_distributed():
        return [value]
    out: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def any_rank(flag: bool) -> bool:
    """``flag`` or-ed over the data-parallel ranks (itself in a single process)."""
    return bool(all_reduce(torch.tensor([float(flag)]), "max").item())


def reduce_metrics(metrics: dict[str, float], weight: float | None = None) -> dict[str, float]:
    """Average metrics over data-parallel ranks (maxima for ``*/max``), on every rank.

    With ``weight`` (this rank's token count, say) the mean is weighted, so per-token means
    cover every rank's tokens. A rank leaves a key out of the mean and the maximum where it
    has weight 0, where its value is NaN (nothing measured) or where it lacks the key (a rank
    without episodes reports fewer): the keys are the union over ranks, so ranks need not
    agree on them, and a key no rank measured is NaN."""
    if not is_distributed():
        return metrics
    world = torch.distributed.get_world_size()
    if world == 1:
        return metrics
    keys = sorted(set().union(*gather_objects(sorted(metrics))))
    if not keys:
        return {}
    local = torch.tensor([metrics.get(k, math.nan) for k in keys], dtype=torch.float64)
    w = 1.0 if weight is None else float(weight)
    counted = ~torch.isnan(local) & (w > 0)
    numerator = torch.where(counted, local * w, torch.zeros_like(local))
    denominator = torch.where(counted, torch.full_like(local, w), torch.zeros_like(local))
    sums = all_reduce(torch.cat([numerator, denominator]), "sum")
    maxima = all_reduce(torch.where(counted, local, torch.full_like(local, -math.inf)), "max")
    out = {}
    for i, k in enumerate(keys):
        if k.endswith("/max"):
            out[k] = float(maxima[i]) if maxima[i] > -math.inf else math.nan
        else:
            total = float(sums[len(keys) + i])
            out[k] = float(sums[i]) / total if total > 0 else math.nan
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
