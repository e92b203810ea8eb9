"""The FP32 loss path: sampled-token log-probs and full-distribution entropy from the LM head.

methods.md ("Precision: where bf16 hurts"): mixed-precision models produce bf16 logits, and calling
``.float()`` on them is too late. Here the final hidden states ``[B, T, D]`` and the LM-head weight
``[V, D]`` (any dtypes; for SmolLM2 the weight is the tied ``embed_tokens.weight``, pass it as is)
are upcast, and the projection, log-softmax and entropy run in float32:

    z = h W^T + b                     logits of one position, [V]
    log pi(a) = z_a - logsumexp(z)    log-prob of the sampled token a
    H = -sum_v pi(v) log pi(v)        entropy of the full next-token distribution

:func:`token_logprobs_and_entropy` does this chunk by chunk over the tokens (``chunk_size`` rows of
``[chunk, V]`` logits at a time) so that the ``[B*T, V]`` logits never exist at once: the forward
keeps no logits, the backward recomputes each chunk's and accumulates the gradients of the hidden
states and of the weight (and bias), returned in those tensors' own dtypes. With
``p = softmax(z)`` and upstream gradients ``g_lp`` (of log pi(a)) and ``g_H`` (of H):

    d log pi(a) / dz = onehot(a) - p
    dH / dz          = -p * (log p + H)
    dL/dz = g_lp * (onehot(a) - p) - g_H * p * (log p + H)
    dL/dh = dL/dz W,   dL/dW = sum_tokens dL/dz^T h,   dL/db = sum_tokens dL/dz

``compute_dtype=torch.bfloat16`` runs the projection, log-softmax and entropy in bf16
(``precision.loss: bf16``): it exists only to reproduce the failure. ``torch.float16``
(``precision.loss: fp16``) runs them in fp16, whose 11-bit mantissa rounds 8x finer than bf16's
(the "FP16 fix" one public summary names for the paper's headline row); its backward multiplies
the upstream gradients by a static loss scale before they meet fp16 and divides it out in
float32, so small per-token gradients do not flush to zero (an overflow gives a non-finite
gradient, which the learner skips). ``torch.float64`` is accepted for tests.
:func:`reference_logprobs_and_entropy` is the plain, unchunked autograd version.

On CPU the 16-bit products are formed as a GPU's GEMM forms them, by :func:`half_matmul`:
16-bit operands, float32 accumulation, the result rounded once to 16 bits. (torch's CPU bf16 GEMM
computes the same numbers, ~15x slower on CPUs without bf16 units: a learner step of the entropy
study took 430 s instead of 25.)

The caller aligns the positions: ``hidden[b, t]`` is the state that predicts ``target_ids[b, t]``
(the usual shift by one); padded positions need any valid token id and are masked by the loss.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from trainer.config import PrecisionConfig

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HALF_DTYPES = (torch.bfloat16, torch.float16)
# the static loss scale of the fp16 loss path's backward (a power of two: exact to apply/remove)
FP16_LOSS_SCALE = 1024.0


def loss_compute_dtype(cfg: PrecisionConfig) -> torch.dtype:
    """``precision.loss`` -> the dtype of the loss path: fp32 -> float32, bf16 -> bfloat16,
    fp16 -> float16."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.loss]


def _output_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    # 16-bit results are returned upcast (exactly) to float32 so that ratios and losses downstream
    # see the 16-bit rounding but no further rounding of their own.
    return torch.float32 if compute_dtype in _HALF_DTYPES else compute_dtype


def _check_inputs(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    bias: Tensor | None,
    compute_dtype: torch.dtype,
) -> None:
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {compute_dtype}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden [..., D] and weight [V, D] must share D, got hidden {tuple(hidden.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != target_ids.shape:
        raise ValueError(
            f"target_ids must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
            f"got {tuple(target_ids.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(
            f"bias must have shape [V] = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}"
        )


class FusedLinearLogprobEntropy(torch.autograd.Function):
    """Chunked fused ``linear -> log-softmax -> (gather, entropy)`` with a recomputing backward.

    Inputs: hidden [N, D], weight [V, D], bias [V] or None, target_ids [N] (long), chunk_size,
    compute_dtype, temperature. Outputs: logprobs [N], entropy [N]. Peak extra memory: two
    ``[chunk_size, V]`` tensors in compute_dtype, an upcast copy of the weight when its dtype is
    not compute_dtype, and in the backward one ``[V, D]`` gradient accumulator (float32, or
    float64 for float64). Nothing of size ``[N, V]`` is kept between forward and backward.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        target_ids: Tensor,
        chunk_size: int,
        compute_dtype: torch.dtype,
        temperature: float,
    ) -> tuple[Tensor, Tensor]:
        num_tokens = hidden.shape[0]
        out_dtype = _output_dtype(compute_dtype)
        logprobs = torch.empty(num_tokens, dtype=out_dtype, device=hidden.device)
        entropy = torch.empty(num_tokens, dtype=out_dtype, device=hidden.device)
        head = weight.to(compute_dtype)
        head_bias = None if bias is None else bias.to(compute_dtype)
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            log_probs = _chunk_log_probs(
                hidden[start:end], head, head_bias, compute_dtype, temperature
            )
            logprobs[start:end] = log_probs.gather(1, target_ids[start:end, None]).squeeze(1)
            # H = -sum_v p log p; the product is formed in place of p (a pairwise-summed reduction:
            # a bmm dot product here loses ~1e-5 in fp32 over a 2000-token vocabulary)
            entropy[start:end] = -log_probs.exp().mul_(log_probs).sum(dim=-1)
            del log_probs
        # the backward reuses H (exactly what it would recompute) to save a [chunk, V] temporary
        ctx.save_for_backward(hidden, weight, bias, target_ids, entropy.to(compute_dtype))
        ctx.chunk_size = chunk_size
        ctx.compute_dtype = compute_dtype
        ctx.temperature = temperature
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs: Tensor, grad_entropy: Tensor):
        hidden, weight, bias, target_ids, entropy = ctx.saved_tensors
        compute_dtype, temperature = ctx.compute_dtype, ctx.temperature
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        accumulate_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
        head = weight.to(compute_dtype)
        head_bias = None if bias is None else bias.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device)
            if need_weight
            else None
        )
        grad_bias = (
            torch.zeros(weight.shape[:1], dtype=accumulate_dtype, device=weight.device)
            if need_bias
            else None
        )
        # fp16's smallest normal is 6e-5: scale the (often ~1e-5) per-token gradients up before
        # they meet fp16, and divide the scale out again in float32
        scale = FP16_LOSS_SCALE if compute_dtype == torch.float16 else 1.0
        g_logprob = (grad_logprobs * scale).to(compute_dtype)
        g_entropy = (grad_entropy * scale).to(compute_dtype)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            h = hidden[start:end].to(compute_dtype)
            log_probs = _chunk_log_probs(h, head, head_bias, compute_dtype, temperature)
            probs = log_probs.exp()
            g_lp = g_logprob[start:end, None]
            g_h = g_entropy[start:end, None]
            # dL/dz = -g_H p (log p + H) - g_lp p + g_lp onehot, built in place in log_probs
            grad_logits = log_probs.add_(entropy[start:end, None]).mul_(probs).mul_(-g_h)
            grad_logits.addcmul_(probs, g_lp, value=-1)
            del probs
            grad_logits.scatter_add_(1, target_ids[start:end, None], g_lp)
            if temperature != 1.0:
                grad_logits.div_(temperature)
            if need_hidden:
                grad_h = _matmul(grad_logits, head, compute_dtype)
                if scale != 1.0:
                    grad_h = grad_h.float().div_(scale)
                grad_hidden[start:end] = grad_h.to(hidden.dtype)
            if need_weight:
                if compute_dtype == accumulate_dtype:
                    grad_weight.addmm_(grad_logits.T, h)
                else:
                    grad_weight.add_(_matmul(grad_logits.T, h, compute_dtype).to(accumulate_dtype))
            if need_bias:
                grad_bias.add_(grad_logits.sum(0).to(accumulate_dtype))
            del grad_logits, log_probs  # the same tensor: free it before the next chunk
        if grad_weight is not None:
            grad_weight = grad_weight.div_(scale).to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.div_(scale).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def half_matmul(
    a: Tensor, b: Tensor, bias: Tensor | None = None, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """``a @ b (+ bias)`` with 16-bit (``dtype``: bf16 or fp16) operands as a GPU GEMM computes
    it, on CPU: the (exact) float32 products of the 16-bit values summed in float32, plus the
    bias, rounded once to ``dtype``; the same numbers as torch's CPU 16-bit matmul up to
    summation order, without its slow kernels."""
    a32, b32 = a.to(dtype).float(), b.to(dtype).float()
    if bias is not None:
        return torch.addmm(bias.to(dtype).float(), a32, b32).to(dtype)
    return (a32 @ b32).to(dtype)


def bf16_matmul(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """:func:`half_matmul` in bf16."""
    return half_matmul(a, b, bias, torch.bfloat16)


def _matmul(a: Tensor, b: Tensor, compute_dtype: torch.dtype, bias: Tensor | None = None) -> Tensor:
    """The loss path's products: 16-bit ones on CPU through :func:`half_matmul`, the rest (and
    every product on CUDA, cuBLAS's 16-bit GEMMs included) natively."""
    if compute_dtype in _HALF_DTYPES and a.device.type == "cpu":
        return half_matmul(a, b, bias, compute_dtype)
    return a @ b if bias is None else torch.addmm(bias, a, b)


def _chunk_log_probs(
    hidden: Tensor,
    head: Tensor,
    head_bias: Tensor | None,
    compute_dtype: torch.dtype,
    temperature: float,
) -> Tensor:
    """One chunk: ``log softmax((h W^T + b) / temperature)`` [C, V]; the logits are freed early."""
    h = hidden.to(compute_dtype)
    logits = _matmul(h, head.T, compute_dtype, head_bias)
    if temperature != 1.0:
        logits.div_(temperature)
    log_probs = torch.log_softmax(logits, dim=-1)
    del logits
    return log_probs


def token_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    bias: Tensor | None = None,
    *,
    chunk_size: int = 1024,
    compute_dtype: torch.dtype = torch.float32,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Log-probs of ``target_ids`` and full-distribution entropies, chunked and fused.

    Shapes: hidden ``[B, T, D]`` (any leading shape ``[...]``), weight ``[V, D]``, bias ``[V]``,
    target_ids ``[B, T]``. Returns ``(logprobs [B, T], entropy [B, T])`` in float32 (for
    ``compute_dtype`` float32, bfloat16 or float16; float64 for float64). Gradients flow to hidden, weight
    and bias, chunk by chunk (see the module docstring for the formulas). ``temperature`` divides
    the logits, matching a sampler that sampled at that temperature.
    """
    _check_inputs(hidden, weight, target_ids, bias, compute_dtype)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    leading_shape = target_ids.shape
    logprobs, entropy = FusedLinearLogprobEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        target_ids.reshape(-1).long(),
        chunk_size,
        compute_dtype,
        float(temperature),
    )
    return logprobs.reshape(leading_shape), entropy.reshape(leading_shape)


def reference_logprobs_and_entropy(
    hidden: Tensor,
    weight: Tensor,
    target_ids: Tensor,
    bias: Tensor | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Unchunked plain-autograd version of :func:`token_logprobs_and_entropy` (for tests).

    It materialises the ``[B, T, V]`` logits (and autograd keeps more of that size), so use it
    only on small inputs; ``compute_dtype=torch.float64`` gives the reference the tests compare to.
    """
    _check_inputs(hidden, weight, target_ids, bias, compute_dtype)
    logits = torch.nn.functional.linear(
        hidden.to(compute_dtype),
        weight.to(compute_dtype),
        None if bias is None else bias.to(compute_dtype),
    )
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    logprobs = log_probs.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    out_dtype = _output_dtype(compute_dtype)
    return logprobs.to(out_dtype), entropy.to(out_dtype)
