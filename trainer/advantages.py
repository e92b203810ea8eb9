"""Episode-level advantage estimators over groups of K episodes of the same task (methods.md).

Every estimator takes ``rewards [B]`` and ``group_ids [B]`` (any integer labels; groups may have
unequal sizes and need not be contiguous) and returns ``advantages [B]`` in float64: rewards and
advantages stay in float64 until they meet the loss (in float32 an all-equal group of 0.7s gets
a GRPO advantage of up to 0.056, and the no-signal skip misfires). An episode alone in its group,
or in a group whose rewards are all equal, has nothing to be compared with: its advantage is
exactly 0. Rewards must be finite (the rollout marks an episode with a non-finite reward as an
environment error, so it never reaches here). The episode advantage is later broadcast to every
sampled token of the episode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

GRPO_EPS = 1e-6


def _as_rewards(rewards: Tensor | Sequence[float]) -> Tensor:
    rewards = torch.as_tensor(rewards).to(torch.float64)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape [B], got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        bad = rewards[~torch.isfinite(rewards)].tolist()
        raise ValueError(f"rewards must be finite, got {bad}")
    return rewards


def _has_spread(rewards: Tensor, group_index: Tensor) -> Tensor:
    """For each episode, whether its group holds at least two different rewards [B] bool: an
    all-equal group gets an advantage of exactly 0, whatever the rounding of its mean."""
    groups = int(group_index.max()) + 1 if len(group_index) else 0
    high = torch.full((groups,), -torch.inf, dtype=rewards.dtype)
    low = torch.full((groups,), torch.inf, dtype=rewards.dtype)
    high = high.scatter_reduce(0, group_index, rewards, reduce="amax")
    low = low.scatter_reduce(0, group_index, rewards, reduce="amin")
    return (high > low)[group_index]


def _group_index(rewards: Tensor, group_ids: Tensor | Sequence[int]) -> Tensor:
    """Dense group index [B] in 0..G-1 of each episode."""
    group_ids = torch.as_tensor(group_ids, device=rewards.device)
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids must have the rewards' shape {tuple(rewards.shape)}, got {tuple(group_ids.shape)}"
        )
    return torch.unique(group_ids, return_inverse=True)[1]


def _group_sum(values: Tensor, group_index: Tensor) -> Tensor:
    """For each episode, the sum of ``values`` over its group [B] (G <= B, so a [B] buffer holds
    the G sums)."""
    return torch.zeros_like(values).index_add_(0, group_index, values)[group_index]


def rloo_advantages(rewards: Tensor | Sequence[float], group_ids: Tensor | Sequence[int]) -> Tensor:
    """RLOO / LOOP leave-one-out advantage, no std normalisation (Chen et al., 2025).

    ``A_k = R_k - 1/(K-1) * sum_{i != k} R_i  =  K/(K-1) * (R_k - mean_i R_i)``;
    ``A_k = 0`` for a group of one.
    """
    rewards = _as_rewards(rewards)
    group_index = _group_index(rewards, group_ids)
    sizes, sums = (
        _group_sum(torch.ones_like(rewards), group_index),
        _group_sum(rewards, group_index),
    )
    others_mean = (sums - rewards) / (sizes - 1).clamp(min=1)
    keep = (sizes > 1) & _has_spread(rewards, group_index)
    return torch.where(keep, rewards - others_mean, torch.zeros_like(rewards))


def grpo_advantages(
    rewards: Tensor | Sequence[float], group_ids: Tensor | Sequence[int], eps: float = GRPO_EPS
) -> Tensor:
    """GRPO's std-normalised advantage (Shao et al., 2024).

    ``A_k = (R_k - mean R) / (std R + eps)`` with eps = 1e-6 and the sample std (Bessel's
    correction, K-1 in the denominator, as ``torch.std`` and TRL use); a group whose rewards are
    all equal gets 0, and so does a group of one.
    """
    rewards = _as_rewards(rewards)
    group_index = _group_index(rewards, group_ids)
    sizes = _group_sum(torch.ones_like(rewards), group_index)
    centred = rewards - _group_sum(rewards, group_index) / sizes
    squares = _group_sum(centred.square(), group_index)
    std = (squares / (sizes - 1).clamp(min=1)).sqrt()
    keep = (sizes > 1) & _has_spread(rewards, group_index)
    return torch.where(keep, centred / (std + eps), torch.zeros_like(rewards))


def dr_grpo_advantages(
    rewards: Tensor | Sequence[float], group_ids: Tensor | Sequence[int]
) -> Tensor:
    """Dr. GRPO's advantage (Liu et al., 2025): ``A_k = R_k - mean R``, no std normalisation.

    Pair it with the ``seq_mean_token_sum_norm`` aggregation (no length normalisation).
    """
    rewards = _as_rewards(rewards)
    group_index = _group_index(rewards, group_ids)
    centred = rewards - _group_sum(rewards, group_index) / _group_sum(
        torch.ones_like(rewards), group_index
    )
    return torch.where(_has_spread(rewards, group_index), centred, torch.zeros_like(rewards))


def loop_keep_mask(advantages: Tensor, threshold: float) -> Tensor:
    """LOOP's filter: keep an episode only if ``|A_k| >= threshold`` (LOOP uses 0.01).

    Returns a bool mask [B]; threshold 0 keeps every episode.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    return advantages.abs() >= threshold


ADVANTAGE_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "rloo": rloo_advantages,
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
}


def compute_advantages(
    name: str, rewards: Tensor | Sequence[float], group_ids: Tensor | Sequence[int]
) -> Tensor:
    """Advantages [B] by the estimator ``objective.advantage`` names: rloo, grpo or dr_grpo."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; expected one of {sorted(ADVANTAGE_ESTIMATORS)}"
        )
    return ADVANTAGE_ESTIMATORS[name](rewards, group_ids)
