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


class PolicyConfig(_Section):
    """The sampler that generates rollouts. ``openai`` (a served checkpoint) is for evaluation
    only: a run config refuses it, since its weights cannot follow the learner's."""

    backend: Literal["hf", "vllm", "openai"] = "hf"
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    vllm: VLLMConfig = VLLMConfig()
