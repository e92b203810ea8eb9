"""Moving the learner's weights into a sampler without holding a second copy of the model.

The learner hands out ``(hf_name, tensor)`` pairs as a stream (a DeepSpeed learner gathers one
ZeRO-3 partition at a time), so everything here consumes its input lazily, one tensor at a time:

* :func:`engine_stream` casts each tensor to the engine's dtype as it passes (an fp32 learner
  feeding a bf16 engine never materialises a bf16 copy of the whole model);
* :func:`write_shards` writes the stream as a folder of safetensors files of bounded size, the
  form an engine in *another process* can load (vLLM workers under tensor parallelism, or a
  separately started ``vllm`` server, reload from ``weights_path``). Only one bucket is in
  memory at a time.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

# 256 MiB per file: small enough to bound the writer's memory, large enough that a 7B model
# is ~60 files rather than thousands
DEFAULT_BUCKET_BYTES = 256 << 20


def engine_stream(
    named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs detached, on CPU-or-same device, contiguous and in ``dtype``,
    produced one at a time as the consumer asks for them."""
    for name, tensor in named_tensors:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"weight sync expects (name, tensor) pairs, got ({type(name).__name__}, "
                f"{type(tensor).__name__})"
            )
        out = tensor.detach()
        if out.is_floating_point() and out.dtype != dtype:
            out = out.to(dtype)
        yield name, out.contiguous()


def write_shards(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    folder: str | os.PathLike[str],
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> tuple[int, int]:
    """Write the stream as ``folder/shard-NNNNN.safetensors`` files of about ``bucket_bytes``
    each, replacing what the folder held; returns (tensors, bytes). Files are written under a
    temporary name and renamed, so a reader never sees half a file; the folder is emptied first
    so weights of an earlier update cannot mix in."""
    from safetensors.torch import save_file

    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    bucket: dict[str, torch.Tensor] = {}
    seen: set[str] = set()
    size = shards = count = total = 0

    def flush() -> None:
        nonlocal bucket, size, shards
        if not bucket:
            return
        tmp = folder / f".shard-{shards:05d}.tmp"
        # tied weights share storage: save_file refuses shared tensors, so each gets its own
        save_file({k: v.cpu().clone() for k, v in bucket.items()}, str(tmp))
        tmp.rename(folder / f"shard-{shards:05d}.safetensors")
        bucket, size, shards = {}, 0, shards + 1

    for name, tensor in named_tensors:
        if name in seen:
            raise ValueError(f"weight {name!r} appears twice in the stream")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            flush()
        bucket[name] = tensor
        size += nbytes
        count += 1
        total += nbytes
    flush()
    if count == 0:
        raise ValueError("weight sync got an empty stream: no tensors to load")
    return count, total


def shm_folder(tag: str) -> Path:
    """A per-process folder in shared memory (``/dev/shm`` where it exists) for weight files."""
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return root / f"eprl-weights-{tag}-{os.getpid()}"
