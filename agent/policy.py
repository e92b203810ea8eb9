"""Policy backends: generate token ids with per-token sampler log-probs, and take new weights.

Every backend implements the same two calls (a structural interface, see :class:`Policy`):

* ``generate(prompts, max_new_tokens, stop)``: ``prompts`` are token-id lists (token-in); each
  result holds the sampled ids, the log-prob of each under the distribution actually sampled from
  (after temperature and top-p), and why the turn ended (token-out).
* ``update_weights(named_tensors)``: load new weights in place, named as in the HF state dict.

This module holds the transformers backend (``hf``), the embedded default;
``agent.vllm_policy`` and ``agent.openai_policy`` hold the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Generation:
    """One sampled turn. ``logprobs[i]`` is log pi_sampler(token_ids[i] | context)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop string), "eos", or "length" (the token cap)


class Policy(Protocol):
    tokenizer: object

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[Generation]: ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def sampling_logprobs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Log-probs of the distribution sampled from: softmax(logits / T) restricted to the top-p
    nucleus and renormalised. Tokens outside the nucleus get -inf. T == 0 (greedy) reports the
    untempered log-softmax. Computed in float32.

    logits: [B, V] -> [B, V]
    """
    scores = logits.float()
    if temperature > 0:
        scores = scores / temperature
    logp = torch.log_softmax(scores, dim=-1)
    if top_p < 1.0 and temperature > 0:
        sorted_logp, order = torch.sort(logp, dim=-1, descending=True)
        cumulative = sorted_logp.exp().cumsum(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (cumulative - sorted_logp.exp()) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)
    return logp


class _SamplerRecorder:
    """A logits processor that *is* the sampling distribution and records each sampled token's
    log-prob.

    transformers applies user logits processors before its own temperature/top-p warpers, so we
    generate with T=1, top_p=1, top_k=0 and let this processor return the final log-probs
    (sampling from softmax(log_softmax(x)) is sampling from softmax(x)). Only one [B, V] step is
    kept: the log-prob of the token sampled at step t is read at step t+1 from input_ids.
    """

    def __init__(self, temperature: float, top_p: float) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.previous: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.collect(input_ids[:, -1])
        self.previous = sampling_logprobs(scores, self.temperature, self.top_p)
        return self.previous

    def collect(self, sampled: torch.Tensor) -> None:
        if self.previous is not None:
            self.steps.append(self.previous.gather(1, sampled[:, None]).squeeze(1))
            self.previous = None


class _StopOnStrings:
    """Stops each row once its generated text contains a stop string; remembers where."""

    def __init__(self, tokenizer, stop: Sequence[str], prompt_width: int, batch: int) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.prompt_width = prompt_width
        self.stop_at: list[int | None] = [None] * batch
        # enough trailing tokens to hold the longest stop string (a token has >= 1 char)
        self.window = max((len(s) for s in self.stop), default=0) + 2

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stop:
            return done
        generated = input_ids[:, self.prompt_width :]
        for row in range(input_ids.shape[0]):
            if self.stop_at[row] is not None:
                done[row] = True
                continue
            tail = generated[row, -self.window :].tolist()
            text = self.tokenizer.decode(tail, skip_special_tokens=False)
            if any(s in text for s in self.stop):
                self.stop_at[row] = generated.shape[1]
                done[row] = True
        return done


class HFPolicy:
    """transformers generation, batched across episodes (left padding), on CPU or GPU.

    ``model`` may be the learner's own module (single-process training): then a weight update
    is a no-op because the parameters are shared.
    """

    def __init__(
        self,
        model,
        tokenizer,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 32,
        seed: int | None = None,
    ) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.model = model
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.top_p = top_p
        self.batch_size = batch_size
        self.generator_seed = seed
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.eos_ids = _eos_ids(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop: Sequence[str] = ()
    ) -> list[Generation]:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        results: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            results.extend(
                self._generate_batch(prompts[start : start + self.batch_size], max_new_tokens, stop)
            )
        return results

    @torch.no_grad()
    def _generate_batch(
        self, prompts, max_new_tokens: int, stop: Sequence[str]
    ) -> list[Generation]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            attention[row, width - len(prompt) :] = 1

        recorder = _SamplerRecorder(self.temperature, self.top_p)
        stopper = _StopOnStrings(self.tokenizer, stop, width, len(prompts))
        config = GenerationConfig(
            do_sample=self.temperature > 0,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            output = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                generation_config=config,
                logits_processor=LogitsProcessorList([recorder]),
                stopping_criteria=StoppingCriteriaList([stopper]),
            )
        finally:
            self.model.train(was_training)
        recorder.collect(output[:, -1])
        generated = output[:, width:].cpu()
        logprobs = torch.stack(recorder.steps, dim=1).cpu()

        results = []
        for row in range(len(prompts)):
            ids = generated[row].tolist()
            end, reason = len(ids), "length"
            for pos, token in enumerate(ids):
                if token in self.eos_ids:
                    end, reason = pos + 1, "eos"
                    break
            if stopper.stop_at[row] is not None and stopper.stop_at[row] <= end:
                end, reason = stopper.stop_at[row], "stop"
            results.append(Generation(ids[:end], logprobs[row, :end].tolist(), reason))
        return results

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # state_dict names every alias of a tied weight (lm_head.weight and embed_tokens.weight)
        params = self.model.state_dict(keep_vars=True)
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"update_weights: the policy model has no parameter {name!r}")
            target = params[name]
            if target.data_ptr() != tensor.data_ptr():
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    if not ids:
        raise ValueError("the tokenizer defines no eos token; set tokenizer.eos_token")
    return sorted(ids)
