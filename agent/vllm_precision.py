"""Sampler/learner log-prob gap on fixed token sequences, for the fp32-head check.

Sampling noise would swamp a comparison of two engines that sample different tokens, so both
sides *score* the same sequences: vLLM through prompt log-probs, the learner through a forward
pass. ``fp32_head`` means the same thing on both sides: the last hidden states and the head
weight are cast to float32 for the one projection (what vLLM's ``head_dtype: float32`` does on
CPU; on CUDA it accumulates the bf16 inputs in fp32, which rounds the same way).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch


def learner_logprobs(model, sequence: Sequence[int], fp32_head: bool) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= 1 of ``sequence`` under a transformers model."""
    ids = torch.tensor([list(sequence)])
    with torch.no_grad():
        out = model(ids, output_hidden_states=fp32_head)
        if fp32_head:
            hidden = out.hidden_states[-1][0, :-1]  # after the final norm
            logits = hidden.float() @ model.get_output_embeddings().weight.float().T
        else:
            logits = out.logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(1, ids[0, 1:, None])[:, 0]


def engine_logprobs(llm, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The same quantity from a vLLM engine: prompt log-probs of each sequence."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False
    )
    result = []
    for sequence, output in zip(sequences, outputs, strict=True):
        steps = output.prompt_logprobs[1:]
        result.append(
            torch.tensor([s[t].logprob for t, s in zip(sequence[1:], steps, strict=True)])
        )
    return result


def score_gap(
    model_dir: str,
    learner,
    sequences: Sequence[Sequence[int]],
    *,
    fp32_head: bool,
    dtype: str = "bfloat16",
) -> dict[str, float]:
    """Start a ``dtype`` engine with or without the fp32 head, score ``sequences`` on it and on
    ``learner`` (same head precision), and return the mean / max absolute log-prob gap."""
    from agent.vllm_policy import VLLMPolicy

    longest = max(len(s) for s in sequences)
    policy = VLLMPolicy(
        model_dir, dtype=dtype, max_model_len=max(256, longest + 8), fp32_head=fp32_head
    )
    try:
        head = policy.llm.llm_engine.model_config.head_dtype
        want = torch.float32 if fp32_head else policy.dtype
        if head != want:
            raise RuntimeError(f"vLLM runs the head in {head}, asked for {want}")
        sampler = engine_logprobs(policy.llm, sequences)
    finally:
        del policy
        gc.collect()
    gaps = torch.cat(
        [
            (s - learner_logprobs(learner, seq, fp32_head)).abs()
            for s, seq in zip(sampler, sequences, strict=True)
        ]
    )
    return {"mean": gaps.mean().item(), "max": gaps.max().item(), "tokens": float(len(gaps))}
