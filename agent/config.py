"""The policy's typed settings, shared by training (``policy:`` in a run config) and by
``eprl eval`` / ``eprl rollout``, so one :func:`agent.backends.build_policy` serves all of them.

Plain pydantic models with no heavy imports: ``trainer.config`` composes them into a run config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BACKENDS = ("hf", "vllm", "openai")
# A turn ends at the end of the agent's code cell (EOS also ends it): the protocol of every eprl
# environment, and the default stop of rollouts, evaluations and `rollout.stop`.
DEFAULT_STOP: tuple[str, ...] = ("\n```\n",)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VLLMConfig(_Section):
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    max_model_len: int = Field(4096, ge=128)
    enforce_eager: bool = True
    # ask vLLM for an fp32 LM head (hf_overrides head_dtype) so sampler log-probs match the learner
    fp32_head: bool = True
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # offload weights and free the KV cache while the learner trains (CUDA; skipped on CPU)
    sleep_mode: bool = False


class ServerConfig(_Section):
    """Server mode (``policy.backend=openai`` in training): vLLM servers started apart from the
    trainer (``VLLM_SERVER_DEV_MODE=1``). After every update the trainer writes its weights to
    ``weights_folder`` (which every server must be able to read: /dev/shm on one machine, a
    shared filesystem across machines), has each server reload them and reset its prefix cache,
    and waits for all before the next rollout."""

    urls: list[str] = []  # http://host:port/v1 of each server (one model, several replicas)
    model: str | None = None  # the served model name; None: the first the server lists
    weights_folder: str | None = None  # None: /dev/shm/eprl-weights-server-<pid>
    weights_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def default_backend() -> str:
    """``vllm`` where vLLM imports (the production sampler), else ``hf``; also ``hf`` for a
    multi-rank run without CUDA (``WORLD_SIZE`` > 1, as torchrun sets it): one vLLM engine per
    CPU rank is not a verified setup, while every rank sharing its learner's module is."""
    import importlib.util
    import os

    if importlib.util.find_spec("vllm") is None:
        return "hf"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _cuda():
        return "hf"
    return "vllm"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class PolicyConfig(_Section):
    """The sampler that generates rollouts. ``backend`` defaults to ``vllm`` where vLLM imports
    and to ``hf`` (the learner's own module: no sampler/learner mismatch) elsewhere; ``openai``
    (a served checkpoint) is for evaluation only: a run config refuses it, since its weights
    cannot follow the learner's."""

    backend: Literal["hf", "vllm", "openai"] = Field(default_factory=default_backend)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    vllm: VLLMConfig = VLLMConfig()
    server: ServerConfig = ServerConfig()
