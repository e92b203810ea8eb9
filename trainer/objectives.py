"""Policy losses: token-level PPO-clip, REPO advantage shaping, TIS, KL, entropy bonus (methods.md).

Notation (per sampled token t): ``logp_t`` the learner's log-prob (float32, with grad), ``H_t``
the entropy of the full next-token distribution, ``r_t = exp(logp_t - logp_old_t)``, ``A`` the
advantage. Every function is a pure function of ``[B, T]`` tensors; :func:`policy_loss` composes
them for one micro-batch and returns the loss and the design.md metrics. The two controllers,
:class:`ZetaController` (REPO) and :class:`EpsHighController` (ADAPO), are stepped by the learner
once per optimizer step with that step's ``entropy/mean``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from trainer.config import AdapoConfig, ObjectiveConfig, RepoConfig


@dataclass
class LossInputs:
    """One micro-batch of B episodes (rows) padded to T tokens.

    ``old_logprobs`` is the denominator of the PPO ratio: the learner's recomputed log-probs
    (``objective.old_logprobs: learner``, LOOP) or the sampler's (``sampler``); the learner fills
    it accordingly. ``max_tokens`` is the constant normaliser of ``seq_mean_token_sum_norm``
    (None -> T); pass the same value for every micro-batch, e.g. the rollout's token budget.
    """

    logprobs: Tensor  # [B, T] learner log-probs of the sampled tokens, float32, requires grad
    entropy: Tensor  # [B, T] full-distribution entropy (its grad is used by the entropy bonus)
    old_logprobs: Tensor  # [B, T] PPO ratio denominator, no grad
    sampler_logprobs: Tensor  # [B, T] log-probs the sampler reported, no grad
    advantages: Tensor  # [B] episode-level or [B, T] per token
    loss_mask: Tensor  # [B, T] bool/float, 1 exactly on sampled tokens
    ref_logprobs: Tensor | None = None  # [B, T] reference policy, needed when objective.kl_coef > 0
    max_tokens: int | None = None


def loop_clip_eps(eps: float) -> tuple[float, float]:
    """LOOP's ratio bounds ``[1/(1+eps), 1+eps]`` as ``(eps_low, eps_high)``.

    ``1 - eps_low = 1/(1+eps)``  =>  ``eps_low = 1 - 1/(1+eps) = eps/(1+eps)``; eps=0.1 gives
    (0.0909..., 0.1), i.e. ``objective.eps_low=0.0909 objective.eps_high=0.1``.
    """
    return 1.0 - 1.0 / (1.0 + eps), eps


def broadcast_advantages(advantages: Tensor, shape: torch.Size) -> Tensor:
    """Episode advantages [B] -> per-token [B, T] (a [B, T] input is returned as is)."""
    if advantages.shape == shape:
        return advantages
    if advantages.dim() == 1 and advantages.shape[0] == shape[0]:
        return advantages[:, None].expand(shape)
    raise ValueError(
        f"advantages must have shape [B]={shape[0]} or [B, T]={tuple(shape)}, got {tuple(advantages.shape)}"
    )


REPO_VARIANTS = ("none", "r", "r_centred", "r_submitted", "r_sym", "d", "const_beta")


def predicted_entropy_change(logprobs: Tensor, entropy: Tensor, advantages: Tensor) -> Tensor:
    """Theorem 1's entropy change per state, estimated from the one sampled token, in units of
    the step size: ``dH_t / eta ~ -L_t p_t A_t`` with ``L_t = logp_t + H_t``, ``p_t = exp(logp_t)``.

    Theorem 1 (methods.md): ``dH(s) ~ -eta Cov_{a~pi}(log pi(a|s), pi(a|s) A(s,a))``. Because
    ``E_pi[log pi] = -H`` is known exactly, ``Cov(X, Y) = E_pi[(X - E X) Y] = E_pi[L pi A]``, and
    the sampled token ``a_t ~ pi`` gives the unbiased one-sample estimate ``L_t p_t A_t``. The
    theorem wants A centred per state (``E_pi[A] = 0``); one sample cannot centre it, so the
    episode's group-centred advantage (RLOO, GRPO) stands in. Detached; shapes [B, T].
    """
    with torch.no_grad():
        logp = logprobs.detach()
        return -(logp + entropy.detach()) * logp.exp() * advantages


def repo_shaped_advantages(
    advantages: Tensor, logprobs: Tensor, entropy: Tensor, variant: str, zeta: float
) -> Tensor:
    """REPO's advantage shaping (Petrenko et al., 2026; methods.md), per sampled token.

    With ``logp_t`` the detached log-prob of the sampled token and ``L_t = logp_t + H_t`` its
    centred form (``E_pi[L] = 0``):

    - ``r`` (REPO-R, arXiv version, its Appendix D.2 as cited publicly): ``beta = zeta |A|`` on
      both signs with the raw log-prob, and sign clamps, so no advantage changes sign:
      ``A > 0: A' = max(A (1 - zeta logp_t), 0)``; ``A < 0: A' = min(A (1 + zeta logp_t), 0)``.
      Rare correct tokens are boosted, common ones damped, penalties on rare wrong tokens
      softened. The default; its zeta bounds default to [1e-4, 0.05].
    - ``r_centred``: the same with ``L_t`` in place of ``logp_t`` (whether the paper used the
      raw or the centred log-prob is not certain).
    - ``r_submitted`` (REPO-R, the submitted version): positive advantages only,
      ``A' = A - zeta max(A, 0) L_t``.
    - ``r_sym``: ``A' = A - zeta |A| L_t`` (both signs, centred, no clamps).
    - ``d`` (REPO-D as a reviewer of the submitted version describes it: ``beta = zeta dH``, the
      entropy change predicted for the step). eprl's reading: ``dH_t`` is
      :func:`predicted_entropy_change` (Theorem 1 per state from ``logp_t``, ``H_t`` and ``A``,
      the step size folded into zeta), and beta is signed to *oppose* it,
      ``beta_t = -zeta dH_t = zeta L_t p_t A``, since with ``zeta >= 0`` the literal
      ``+zeta dH`` would push entropy further the way it is already predicted to move. Then
      ``A' = A - beta_t L_t = A (1 - zeta p_t L_t^2)``, clamped so no advantage changes sign:
      every token's contribution to the predicted change is damped by ``1 - zeta p_t L_t^2``,
      most where ``p_t L_t^2`` is large. It damps entropy changes in both directions (a fall
      under GRPO-like signals, a rise under clip-higher) rather than pushing toward a level;
      the controller raises zeta while entropy is below target. Useful zeta is larger than
      REPO-R's (``p_t L_t^2`` is often < 1): e.g. bounds [1e-2, 4].
    - ``const_beta``: ``A' = A - zeta L_t``, a constant beta (called REPO-D in earlier eprl; it
      is not REPO-D as described).
    - ``none``: ``A' = A``.

    Since ``E_pi[grad log pi * L] = -grad H``, subtracting ``beta L`` adds ``beta grad H`` to the
    policy gradient in expectation, with no full-vocabulary term in the loss. Computed under
    no_grad from the same fp32 log-probs the loss uses. Shapes: all [B, T].
    """
    if variant == "none":
        return advantages
    if variant not in REPO_VARIANTS:
        raise ValueError(f"unknown REPO variant {variant!r}; expected one of {REPO_VARIANTS}")
    with torch.no_grad():
        logp = logprobs.detach()
        centred = logp + entropy.detach()
        if variant == "d":
            beta = -zeta * predicted_entropy_change(logp, entropy, advantages)
            return _same_sign(advantages, advantages - beta * centred)
        if variant in ("r", "r_centred"):
            log_term = logp if variant == "r" else centred
            return _same_sign(advantages, advantages * (1.0 - zeta * log_term * advantages.sign()))
        scale = {
            "r_submitted": advantages.clamp(min=0),
            "r_sym": advantages.abs(),
            "const_beta": torch.ones_like(advantages),
        }[variant]
        return advantages - zeta * scale * centred


def _same_sign(advantages: Tensor, shaped: Tensor) -> Tensor:
    """``shaped`` clamped to ``>= 0`` where ``A > 0``, ``<= 0`` where ``A < 0``, 0 where ``A = 0``."""
    positive, negative = shaped.clamp(min=0), shaped.clamp(max=0)
    return torch.where(advantages > 0, positive, torch.where(advantages < 0, negative, 0))


def has_learning_signal(advantages: Tensor, cfg: ObjectiveConfig) -> bool:
    """Whether :func:`policy_loss` can have a nonzero gradient for episodes with these
    advantages [B].

    False only when every advantage is exactly 0 (e.g. every group's rewards were equal) and no
    term of the loss acts without one: the REPO-R variants scale by ``A`` (or ``|A|``), so their
    shaped advantage is 0 too, while constant-beta shaping, an entropy bonus and a KL penalty act
    on every token. A batch without signal should not step the
    optimizer: AdamW keeps moving the weights along its momentum on a zero gradient.
    """
    if cfg.repo.variant == "const_beta" or cfg.entropy_coef != 0.0 or cfg.kl_coef > 0.0:
        return True
    return bool((advantages != 0).any())


def ppo_clip_token_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> Tensor:
    """Token-level PPO-clip with asymmetric bounds (Schulman et al., 2017; DAPO clip-higher).

    ``l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)``, ``r_t = exp(logp_t -
    logp_old_t)``. The gradient is exactly zero where the clip binds: ``A > 0, r > 1 + eps_high``
    or ``A < 0, r < 1 - eps_low``. Shapes: all [B, T]; returns [B, T].
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    return -torch.min(unclipped, clipped)


def clip_masks(
    ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """Where the low and the high clip bind (bool [B, T] each).

    Low: ``A < 0 and r < 1 - eps_low``; high: ``A > 0 and r > 1 + eps_high``. Elsewhere the clip
    is inactive or not the minimum.
    """
    low = (advantages < 0) & (ratio < 1.0 - eps_low)
    high = (advantages > 0) & (ratio > 1.0 + eps_high)
    return low, high


def tis_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling weight ``min(exp(logp_old_learner - logp_sampler), C)``.

    Corrects for the sampler/learner mismatch (Yao et al., 2025); no gradient. [B, T].
    """
    with torch.no_grad():
        return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token KL(pi || pi_ref) by Schulman's k3 estimator on tokens sampled from pi.

    ``k3_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1``: unbiased, always >= 0, with
    gradient ``1 - exp(logp_ref_t - logp_t)`` w.r.t. ``logp_t``. [B, T].
    """
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def aggregate(
    per_token: Tensor, loss_mask: Tensor, mode: str, max_tokens: int | None = None
) -> Tensor:
    """Reduce a per-token loss [B, T] over the masked tokens to a scalar.

    With ``m_bt`` the mask, ``n_b = sum_t m_bt``:
    - ``token_mean`` (DAPO): ``sum_bt m l / sum_bt m``
    - ``seq_mean_token_mean`` (GRPO): ``mean over rows with n_b > 0 of (sum_t m l / n_b)``
    - ``seq_mean_token_sum_norm`` (Dr. GRPO): ``sum_bt m l / (B * max_tokens)`` with a constant
      normaliser ``max_tokens`` (default T, the padded width) instead of each row's length.
    An empty mask gives 0 (still attached to the graph).
    """
    mask = loss_mask.bool()
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    if mode == "token_mean":
        return masked.sum() / mask.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        row_tokens = mask.sum(dim=-1)
        row_means = masked.sum(dim=-1) / row_tokens.clamp(min=1)
        return row_means.sum() / (row_tokens > 0).sum().clamp(min=1)
    if mode == "seq_mean_token_sum_norm":
        norm = per_token.shape[-1] if max_tokens is None else max_tokens
        if norm < 1:
            raise ValueError(f"max_tokens must be >= 1, got {norm}")
        return masked.sum() / (per_token.shape[0] * norm)
    raise ValueError(
        f"unknown aggregation {mode!r}; expected token_mean, seq_mean_token_mean or seq_mean_token_sum_norm"
    )


def policy_loss(
    inputs: LossInputs, cfg: ObjectiveConfig, zeta: float, eps_high: float
) -> tuple[Tensor, dict[str, float]]:
    """The loss of one micro-batch and its metrics.

    ``l_t = w_t * ppo_clip(r_t, A'_t; eps_low, eps_high) - c_H H_t + c_KL k3_t``, aggregated by
    ``cfg.aggregation`` over the masked tokens, where ``A'`` is the REPO-shaped advantage
    (``cfg.repo.variant``, coefficient ``zeta``), ``w_t`` the TIS weight (1 unless
    ``cfg.tis_cap``), ``c_H = cfg.entropy_coef`` and ``c_KL = cfg.kl_coef``. ``eps_high`` is
    passed in (ADAPO's controller or ``cfg.eps_high``); ``eps_low`` is ``cfg.eps_low``.

    Metrics (floats, over masked tokens): entropy/mean, clip/low_frac, clip/high_frac,
    ratio/mean, ratio/max, mismatch/kl (mean of ``sampler_logprobs - logprobs``), adv/mean and
    adv/std (population std) of the advantage the loss used (after shaping),
    entropy/cov_logp_adv (the covariance over the masked tokens of the sampled tokens' log-prob
    and that advantage: Theorem 1's driver of the entropy change, positive when likely tokens
    get the higher advantages, which lowers the entropy), repo/zeta (0 when
    REPO is off), adapo/eps_high, and kl/ref (mean k3 estimate of KL(pi || ref)) when
    ``cfg.kl_coef > 0``.
    """
    logprobs = inputs.logprobs
    shape = logprobs.shape
    for name in ("entropy", "old_logprobs", "sampler_logprobs", "loss_mask"):
        if getattr(inputs, name).shape != shape:
            raise ValueError(
                f"{name} must have the logprobs' shape {tuple(shape)}, got {tuple(getattr(inputs, name).shape)}"
            )
    mask = inputs.loss_mask.bool()
    detached = logprobs.detach()
    # padded positions may hold anything: give them log-ratios of 0 so nothing overflows there
    old_logprobs = torch.where(mask, inputs.old_logprobs, detached)
    advantages = broadcast_advantages(inputs.advantages.to(logprobs.dtype), shape)
    advantages = repo_shaped_advantages(
        advantages, logprobs, inputs.entropy, cfg.repo.variant, zeta
    )

    per_token = ppo_clip_token_loss(logprobs, old_logprobs, advantages, cfg.eps_low, eps_high)
    if cfg.tis_cap is not None:
        sampler_logprobs = torch.where(mask, inputs.sampler_logprobs, old_logprobs)
        per_token = per_token * tis_weights(old_logprobs, sampler_logprobs, cfg.tis_cap)
    if cfg.entropy_coef != 0.0:
        per_token = per_token - cfg.entropy_coef * inputs.entropy
    if cfg.kl_coef > 0.0:
        if inputs.ref_logprobs is None:
            raise ValueError(
                f"objective.kl_coef={cfg.kl_coef} needs LossInputs.ref_logprobs, got None"
            )
        kl = k3_kl(logprobs, torch.where(mask, inputs.ref_logprobs, detached))
        per_token = per_token + cfg.kl_coef * kl
    loss = aggregate(per_token, mask, cfg.aggregation, inputs.max_tokens)

    with torch.no_grad():
        ratio = torch.exp(detached - old_logprobs)
        low, high = clip_masks(ratio, advantages, cfg.eps_low, eps_high)
        metrics = _masked_metrics(
            mask,
            logprobs=detached,
            entropy=inputs.entropy.detach(),
            ratio=ratio,
            advantages=advantages,
            low=low,
            high=high,
            mismatch=inputs.sampler_logprobs - detached,
        )
    metrics["repo/zeta"] = float(zeta) if cfg.repo.variant != "none" else 0.0
    metrics["adapo/eps_high"] = float(eps_high)
    if cfg.kl_coef > 0.0:
        metrics["kl/ref"] = float((kl.detach() * mask).sum() / mask.sum().clamp(min=1))
    return loss, metrics


def _masked_metrics(
    mask: Tensor,
    *,
    logprobs: Tensor,
    entropy: Tensor,
    ratio: Tensor,
    advantages: Tensor,
    low: Tensor,
    high: Tensor,
    mismatch: Tensor,
) -> dict[str, float]:
    """Means over the masked tokens (0 when there are none), fetched with one device sync."""
    weights = mask.to(entropy.dtype)
    count = weights.sum().clamp(min=1)

    def mean(values: Tensor) -> Tensor:
        return (
            torch.where(mask, values.to(weights.dtype), torch.zeros_like(weights))
        ).sum() / count

    adv_mean = mean(advantages)
    logp_mean = mean(logprobs)
    ratio_max = (
        torch.where(mask, ratio, torch.zeros_like(ratio)).max()
        if mask.numel()
        else ratio.new_zeros(())
    )
    values = torch.stack(
        [
            mean(entropy),
            mean(low),
            mean(high),
            mean(ratio),
            ratio_max.to(weights.dtype),
            mean(mismatch),
            adv_mean,
            mean((advantages - adv_mean).square()).sqrt(),
            mean((logprobs - logp_mean) * (advantages - adv_mean)),
        ]
    ).tolist()
    names = (
        "entropy/mean",
        "clip/low_frac",
        "clip/high_frac",
        "ratio/mean",
        "ratio/max",
        "mismatch/kl",
        "adv/mean",
        "adv/std",
        "entropy/cov_logp_adv",
    )
    return dict(zip(names, values, strict=True))


class _EntropyRegulator:
    """A coefficient regulated toward a target entropy with multiplicative steps.

    After each optimizer step, with ``H`` the controlled entropy and ``band`` the relative dead
    band: ``H < (1 - band) * target`` -> ``value *= factor``; ``H > (1 + band) * target`` ->
    ``value /= factor``; otherwise unchanged; then clipped to ``[lower, upper]``. A target of
    None is set to the first step's entropy (the first batch's, ``entropy/initial``).

    ``H`` is the step's mean entropy, or with ``smoothing = s > 0`` its exponential moving
    average ``H <- s * H + (1 - s) * H_step`` (started at the first step's value). A batch of a
    few groups measures entropy with a spread of tens of percent from step to step (which tasks
    it drew, how many responses ran to the cap); the raw rule then halves and doubles the
    coefficient on that noise instead of on the trend (measured: the quick start's zeta stayed
    at <= 0.1 for 12 steps while held-out entropy fell 40 %).
    """

    _value_key = "value"

    def __init__(
        self,
        value: float,
        lower: float,
        upper: float,
        factor: float,
        dead_band: float,
        target: float | None,
        smoothing: float = 0.0,
    ) -> None:
        if not lower <= value <= upper:
            raise ValueError(f"need {lower} <= initial {self._value_key} <= {upper}, got {value}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.value = value
        self.lower = lower
        self.upper = upper
        self.factor = factor
        self.dead_band = dead_band
        self.target = target
        self.smoothing = smoothing
        self.controlled: float | None = None  # the (smoothed) entropy the last step acted on

    def step(self, entropy: float) -> float:
        """Update from this step's mean entropy and return the new value."""
        entropy = float(entropy)
        if not math.isfinite(entropy):
            raise ValueError(
                f"entropy must be finite to step the {self._value_key} controller, got {entropy}"
            )
        if self.controlled is None:
            self.controlled = entropy
        else:
            self.controlled = self.smoothing * self.controlled + (1.0 - self.smoothing) * entropy
        if self.target is None:
            self.target = entropy
        if self.controlled < (1.0 - self.dead_band) * self.target:
            self.value = min(self.value * self.factor, self.upper)
        elif self.controlled > (1.0 + self.dead_band) * self.target:
            self.value = max(self.value / self.factor, self.lower)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {
            self._value_key: self.value,
            "target_entropy": self.target,
            "controlled_entropy": self.controlled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {self._value_key, "target_entropy"} - set(state)
        if missing:
            raise ValueError(
                f"{type(self).__name__} state lacks {sorted(missing)}; got keys {sorted(state)}"
            )
        self.value = float(state[self._value_key])
        target = state["target_entropy"]
        self.target = None if target is None else float(target)
        controlled = state.get("controlled_entropy")  # absent in checkpoints before smoothing
        self.controlled = None if controlled is None else float(controlled)


class ZetaController(_EntropyRegulator):
    """REPO's zeta toward a target entropy, like PPO's adaptive KL coefficient (methods.md).

    ``H < target`` (beyond the dead band) -> ``zeta *= factor`` (more entropy push);
    ``H > target`` -> ``zeta /= factor``; bounds ``[zeta_min, zeta_max]``. Defaults
    (``objective.repo``): zeta_init 0.02, factor 2, dead band 5 %, bounds [1e-4, 0.05] (the
    arXiv version's), target = the first batch's entropy. ``controller: faithful`` is the
    paper's rule as described: no dead band, no smoothing, target = the initial entropy.
    """

    _value_key = "zeta"

    def __init__(self, cfg: RepoConfig) -> None:
        super().__init__(
            cfg.zeta_init,
            cfg.zeta_min,
            cfg.zeta_max,
            cfg.factor,
            cfg.dead_band,
            cfg.target_entropy,
            cfg.smoothing,
        )

    @property
    def zeta(self) -> float:
        return self.value


class EpsHighController(_EntropyRegulator):
    """ADAPO: the upper clip ``eps_high`` toward a target entropy (methods.md; rule ours).

    The paper's exact rule is not public. Ours: ``H < target`` (beyond the dead band) ->
    ``eps_high *= factor`` (a wider upper clip lets entropy grow, as clip-higher does);
    ``H > target`` -> ``eps_high /= factor``; bounds ``[eps_high_min or eps_low, eps_high_max]``.
    Defaults (``objective.adapo``): start at ``objective.eps_high`` (0.28), factor 1.1, dead band
    5 %, bounds [eps_low = 0.2, 0.5], target = the first batch's entropy.
    """

    _value_key = "eps_high"

    def __init__(self, cfg: AdapoConfig, eps_low: float, eps_high_init: float) -> None:
        lower = eps_low if cfg.eps_high_min is None else cfg.eps_high_min
        super().__init__(
            eps_high_init,
            lower,
            cfg.eps_high_max,
            cfg.factor,
            cfg.dead_band,
            cfg.target_entropy,
            cfg.smoothing,
        )

    @property
    def eps_high(self) -> float:
        return self.value
