"""The FP32 loss path (issue 3): accuracy against float64, chunking, gradients, the bf16 failure.

No model: a random LM head (weights in bf16, like a bf16 checkpoint) and random hidden states.
"""

from __future__ import annotations

import pytest
import torch

from trainer.config import PrecisionConfig
from trainer.precision import (
    FusedLinearLogprobEntropy,
    bf16_matmul,
    loss_compute_dtype,
    reference_logprobs_and_entropy,
    token_logprobs_and_entropy,
)


def _bf16_head(batch=2, tokens=64, dim=128, vocab=2000, seed=0):
    """bf16 hidden states [B, T, D] and weight [V, D] with logits of std ~3 (peaked, LLM-like),
    and targets sampled from the float64 distribution (sampled tokens are the likely ones)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, tokens, dim, generator=generator).bfloat16()
    weight = (torch.randn(vocab, dim, generator=generator) * 3 / dim**0.5).bfloat16()
    probs = torch.softmax(hidden.double() @ weight.double().T, -1)
    targets = torch.multinomial(probs.reshape(-1, vocab), 1, generator=generator).reshape(
        batch, tokens
    )
    return hidden, weight, targets


def _errors_against_float64(hidden, weight, targets, dtypes):
    """Per loss dtype, the largest absolute error of the chunked path's log-probs and entropies
    against the float64 reference; every path returns float32 whatever it computes in."""
    ref_logprobs, ref_entropy = reference_logprobs_and_entropy(
        hidden, weight, targets, compute_dtype=torch.float64
    )
    errors = {}
    for dtype in dtypes:
        logprobs, entropy = token_logprobs_and_entropy(
            hidden, weight, targets, chunk_size=40, compute_dtype=dtype
        )
        assert logprobs.dtype == entropy.dtype == torch.float32
        errors[dtype] = (
            (logprobs.double() - ref_logprobs).abs().max().item(),
            (entropy.double() - ref_entropy).abs().max().item(),
        )
    return errors


def test_fp32_path_matches_float64_within_1e5_and_bf16_is_orders_of_magnitude_worse():
    errors = _errors_against_float64(*_bf16_head(), (torch.float32, torch.bfloat16))
    fp32_logprob_error, fp32_entropy_error = errors[torch.float32]
    bf16_logprob_error, bf16_entropy_error = errors[torch.bfloat16]
    assert fp32_logprob_error < 1e-5 and fp32_entropy_error < 1e-5
    assert bf16_logprob_error > 100 * fp32_logprob_error and bf16_logprob_error > 1e-3
    assert bf16_entropy_error > 100 * fp32_entropy_error and bf16_entropy_error > 1e-3


def test_cpu_bf16_matmul_gives_the_numbers_of_torchs_bf16_gemm():
    """The CPU stand-in for a bf16 GEMM (float32 sums of bf16 products, one rounding) returns
    what torch's own bf16 matmul returns, up to summation order: at most one bf16 step apart
    (2^-7 relative), and almost always identical; with and without a bias, and for the
    transposed views the backward passes."""
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(37, 300, generator=generator).bfloat16()
    w = torch.randn(500, 300, generator=generator).bfloat16()
    bias = torch.randn(500, generator=generator).bfloat16()
    g = torch.randn(37, 500, generator=generator).bfloat16()
    for ours, native in (
        (bf16_matmul(a, w.T), a @ w.T),
        (bf16_matmul(a, w.T, bias), torch.addmm(bias, a, w.T)),
        (bf16_matmul(g, w), g @ w),
        (bf16_matmul(g.T, a), g.T @ a),
    ):
        assert ours.dtype == torch.bfloat16 and ours.shape == native.shape
        diff = (ours.float() - native.float()).abs()
        assert (diff <= native.float().abs() * 2**-7).all()
        assert (diff == 0).float().mean() > 0.99
    # and it is not a float32 product: rounding to bf16 is what it must keep
    full = a.float() @ w.float().T
    assert not torch.equal(bf16_matmul(a, w.T).float(), full)


@pytest.mark.parametrize("chunk_size", [1, 7, 128, 1000])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_unchunked_values_and_gradients(chunk_size, weight_dtype):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 43, 32, generator=generator).to(weight_dtype)
    weight = (torch.randn(300, 32, generator=generator) / 4).to(weight_dtype)
    bias = torch.randn(300, generator=generator).to(weight_dtype)
    targets = torch.randint(0, 300, (3, 43), generator=generator)
    upstream_lp, upstream_h = torch.randn(2, 3, 43, generator=generator)
    results = []
    for fn, kwargs in (
        (token_logprobs_and_entropy, {"chunk_size": chunk_size}),
        (reference_logprobs_and_entropy, {}),
    ):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        logprobs, entropy = fn(leaves[0], leaves[1], targets, leaves[2], **kwargs)
        ((logprobs * upstream_lp).sum() + (entropy * upstream_h).sum()).backward()
        results.append((logprobs, entropy, *(leaf.grad for leaf in leaves)))
    chunked, unchunked = results
    for name, a, b in zip(
        ("logprobs", "entropy", "hidden", "weight", "bias"), chunked, unchunked, strict=True
    ):
        assert a.dtype == b.dtype, name
        if weight_dtype == torch.float32 or name in ("logprobs", "entropy"):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5, msg=name)
        else:  # bf16 gradients: one rounding of the same float32 number, so within one bf16 ulp
            torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=8e-3, msg=name)


def test_backward_is_exact_by_gradcheck_with_temperature():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(7, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, 11, (7,), generator=generator)
    for temperature in (1.0, 0.7):
        assert torch.autograd.gradcheck(
            lambda h, w, b, t=temperature: FusedLinearLogprobEntropy.apply(
                h, w, b, targets, 3, torch.float64, t
            ),
            (hidden, weight, bias),
            fast_mode=True,
        )


def test_tied_embedding_weight_gets_both_gradients():
    """SmolLM2 ties lm_head to embed_tokens: pass that one weight; its grad sums both uses."""
    grads = []
    for fn in (token_logprobs_and_entropy, reference_logprobs_and_entropy):
        torch.manual_seed(3)
        embed = torch.nn.Embedding(50, 16)
        ids = torch.randint(0, 50, (2, 9))
        hidden = torch.tanh(embed(ids))
        logprobs, entropy = fn(hidden[:, :-1], embed.weight, ids[:, 1:])
        (logprobs.sum() + 0.1 * entropy.sum()).backward()
        grads.append(embed.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-5)


def test_bf16_importance_ratio_on_identical_logits_is_biased_upward():
    """Same fp32 logits z for sampler and learner; the learner's log-prob computed in bf16.

    ``r = exp(logp_bf16(a) - logp_fp32(a))`` with ``a ~ softmax(z)``. Measured (torch 2.13 CPU,
    LLM-like peaked logits, entropy ~0.7 nats): the expected ratio ``E_a[r] = sum_a
    p_bf16(a)`` exceeds 1 by about 2e-4 (z-score > 10 over the rows), and about 54 % of sampled
    tokens get ``r > 1`` (the likely token's log-prob is rounded up, often to exactly 0), while
    the mean log-ratio is negative (the tokens pushed down move further). We assert those signs.
    """
    generator = torch.Generator().manual_seed(4)
    rows, vocab = 20000, 1024
    logits = torch.randn(rows, vocab, generator=generator) * 10
    log_probs = torch.log_softmax(logits, -1)
    probs = log_probs.exp()
    sampled = torch.multinomial(probs, 1, generator=generator)

    # the bf16 loss path computes exactly torch's bf16 log-softmax of these logits: feed them
    # through an identity head (a bf16 matmul by the identity is exact)
    some = slice(0, 1000)
    path_logprobs, _ = token_logprobs_and_entropy(
        logits[some],
        torch.eye(vocab),
        sampled[some, 0],
        compute_dtype=torch.bfloat16,
        chunk_size=256,
    )
    bf16_log_probs = torch.log_softmax(logits.bfloat16(), -1).float()
    assert torch.equal(path_logprobs, bf16_log_probs[some].gather(1, sampled[some]).squeeze(1))

    expected_ratio = bf16_log_probs.exp().sum(-1)  # E_{a~p}[p_bf16(a) / p(a)], per row, exact
    excess = expected_ratio - 1
    assert excess.mean() > 5 * excess.std() / rows**0.5
    sampled_ratio = (bf16_log_probs.gather(1, sampled) - log_probs.gather(1, sampled)).exp()
    assert (sampled_ratio > 1).float().mean() > 0.51
    mean_log_ratio = (probs * (bf16_log_probs - log_probs)).sum(-1)  # E_{a~p}[log r], per row
    assert mean_log_ratio.mean() < -3 * mean_log_ratio.std() / rows**0.5
    # the fp32 path on the same logits has no such gap
    fp32_logprobs, _ = token_logprobs_and_entropy(
        logits[some], torch.eye(vocab), sampled[some, 0], chunk_size=256
    )
    assert (fp32_logprobs - log_probs[some].gather(1, sampled[some]).squeeze(1)).abs().max() < 1e-5


def test_input_errors_name_the_shapes_and_config_maps_to_dtypes():
    hidden, weight = torch.zeros(2, 3, 8), torch.zeros(10, 8)
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        token_logprobs_and_entropy(hidden, weight, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(10, 7\)"):
        token_logprobs_and_entropy(hidden, torch.zeros(10, 7), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="compute_dtype must be one of .* got torch.int32"):
        token_logprobs_and_entropy(
            hidden, weight, torch.zeros(2, 3, dtype=torch.long), compute_dtype=torch.int32
        )
    assert loss_compute_dtype(PrecisionConfig()) == torch.float32
    assert loss_compute_dtype(PrecisionConfig(loss="bf16")) == torch.bfloat16


@pytest.mark.gpu
def test_fp32_path_on_cuda_matches_float64_with_bf16_weights():
    """The same accuracy on a GPU, where cuBLAS's bf16 kernels would otherwise round the logits:
    bf16 hidden states and head on CUDA, log-probs and entropies within 1e-5 of float64."""
    hidden, weight, targets = (t.cuda() for t in _bf16_head())
    ref_logprobs, ref_entropy = reference_logprobs_and_entropy(
        hidden, weight, targets, compute_dtype=torch.float64
    )
    logprobs, entropy = token_logprobs_and_entropy(
        hidden, weight, targets, chunk_size=32, compute_dtype=torch.float32
    )
    assert logprobs.dtype == torch.float32 and logprobs.is_cuda
    assert (logprobs.double() - ref_logprobs).abs().max() < 1e-5
    assert (entropy.double() - ref_entropy).abs().max() < 1e-5


def test_fp16_path_error_is_bounded_and_between_fp32_and_bf16():
    """``precision.loss: fp16``: log-probs within 2e-2 of float64 (fp16 rounds the logits to
    11 bits), several times closer than bf16's, and its loss-scaled backward gives gradients
    within 2 % of float64's even for per-token gradients of 1e-5 (fp16's normal range ends at
    6e-5: unscaled, most of them would flush to zero)."""
    hidden, weight, targets = _bf16_head()
    errors = _errors_against_float64(hidden, weight, targets, (torch.float16, torch.bfloat16))
    fp16_logprob_error, bf16_logprob_error = errors[torch.float16][0], errors[torch.bfloat16][0]
    assert fp16_logprob_error < 2e-2
    assert bf16_logprob_error > 4 * fp16_logprob_error
    assert loss_compute_dtype(PrecisionConfig(loss="fp16")) == torch.float16

    upstream = torch.full(targets.shape, 1e-5, dtype=torch.float64)
    grads = {}
    for dtype in (torch.float16, torch.float64):
        h = hidden.double().requires_grad_() if dtype == torch.float64 else hidden.clone()
        h = h.requires_grad_()
        logprobs, _ = token_logprobs_and_entropy(
            h, weight, targets, chunk_size=40, compute_dtype=dtype
        )
        (logprobs.double() * upstream).sum().backward()
        grads[dtype] = h.grad.double()
    relative = (grads[torch.float16] - grads[torch.float64]).norm() / grads[torch.float64].norm()
    assert relative < 2e-2
