"""From a rollout batch to the episodes that train: what each step measures of its episodes,
and :func:`select_episodes`, the filters between the rollout and the learner, in order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from trainer.config import ObjectiveConfig


def cut_at_cap(episode) -> bool:
    """Whether the episode's last sampled turn ended at the token cap (finish reason "length")."""
    return bool(episode.finish_reasons) and episode.finish_reasons[-1] == "length"


def sampled_nll(episodes, skip_cut: bool = False) -> tuple[float, int]:
    """(sum of ``-log pi_sampler(token)``, number of tokens) over the sampled tokens of
    ``episodes``, without those cut at the token cap when ``skip_cut``. The mean estimates the
    per-token entropy the learner reports as ``entropy/mean``."""
    nll = [
        -logprob
        for ep in episodes
        if not (skip_cut and cut_at_cap(ep))
        for logprob, sampled in zip(ep.sampler_logprobs, ep.loss_mask, strict=True)
        if sampled
    ]
    return float(sum(nll)), len(nll)


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def is_trainable(episode) -> bool:
    """An episode the learner can use: no environment error and at least one sampled token."""
    return episode.error is None and episode.num_sampled_tokens > 0


def group_spread(episodes: Sequence) -> dict[str, float]:
    """The spread of the step across its groups (one task's K episodes each): the lowest and
    highest group mean reward (over every episode of the group) and sampler NLL per token (over
    the trainable ones; groups without a sampled token are left out). NaN without groups."""
    groups: dict[int, list] = {}
    for ep in episodes:
        groups.setdefault(ep.group_id, []).append(ep)
    rewards = [_mean(ep.reward for ep in group) for group in groups.values()]
    nlls = []
    for group in groups.values():
        nll, tokens = sampled_nll([ep for ep in group if is_trainable(ep)])
        if tokens:
            nlls.append(nll / tokens)
    nan = float("nan")
    return {
        "reward/group_min": min(rewards, default=nan),
        "reward/group_max": max(rewards, default=nan),
        "entropy/sampler_nll_group_min": min(nlls, default=nan),
        "entropy/sampler_nll_group_max": max(nlls, default=nan),
    }


def rollout_metrics(episodes: Sequence) -> dict[str, float]:
    """What a step reports of its rollout batch (``reward/mean`` over every episode, the
    response statistics over the trainable ones, the spread across groups)."""
    valid = [ep for ep in episodes if is_trainable(ep)]
    nll, tokens = sampled_nll(valid)
    return {
        **group_spread(episodes),
        "reward/mean": _mean(ep.reward for ep in episodes),
        "success/rate": _mean(float(ep.success) for ep in episodes),
        "episodes/errors": float(len(episodes) - len(valid)),
        "response/tokens_mean": _mean(ep.num_sampled_tokens for ep in valid),
        "response/stopped_frac": _mean(
            float(not cut_at_cap(ep)) for ep in valid if ep.finish_reasons
        ),
        # the sampler's side of the entropy: beside the learner's full-distribution entropy
        "entropy/sampler_nll": nll / tokens if tokens else float("nan"),
    }


@dataclass
class Selection:
    """The outcome of :func:`select_episodes`: the ``kept`` episodes with their ``advantages``,
    whether they carry a learning ``signal``, the trainable episodes they were chosen from
    (``valid``), and the counts to log."""

    valid: list
    kept: list
    advantages: torch.Tensor  # [len(kept)]
    signal: bool
    metrics: dict[str, float] = field(default_factory=dict)

    def batch(self, pad_id: int):
        """The learner's batch. A rank with nothing kept while other ranks learn takes part with
        its valid episodes at zero advantage (a zero gradient), so every rank steps together."""
        from trainer.learner import collate

        if self.kept:
            return collate(self.kept, self.advantages, pad_id)
        return collate(self.valid, torch.zeros(len(self.valid)), pad_id)


def select_episodes(
    episodes: Sequence, objective: ObjectiveConfig, skip_no_signal: bool
) -> Selection:
    """The episodes that train, and their advantages. In order:

    1. trainable episodes only (no environment error, at least one sampled token);
    2. advantages per group (``objective.advantage``) over all of those, so a filtered episode
       still counts in its group's baseline;
    3. LOOP's filter: drop ``|A| < objective.adv_filter_threshold`` (when > 0);
    4. DAPO's overlong filter: drop episodes cut at the token cap (``objective.overlong_filter``);
    5. the learning signal: with ``skip_no_signal``, a batch whose loss has no gradient
       (:func:`trainer.objectives.has_learning_signal`) makes no update.
    """
    from trainer.advantages import compute_advantages, loop_keep_mask
    from trainer.objectives import has_learning_signal

    valid = [ep for ep in episodes if is_trainable(ep)]
    if not valid:
        return Selection(valid, [], torch.zeros(0), signal=False)
    metrics: dict[str, float] = {}
    rewards = torch.tensor([ep.reward for ep in valid], dtype=torch.float64)
    groups = torch.tensor([ep.group_id for ep in valid])
    advantages = compute_advantages(objective.advantage, rewards, groups)
    keep = (
        loop_keep_mask(advantages, objective.adv_filter_threshold)
        if objective.adv_filter_threshold > 0
        else torch.ones_like(advantages, dtype=torch.bool)
    )
    if objective.overlong_filter:
        cut = torch.tensor([cut_at_cap(ep) for ep in valid])
        metrics["episodes/overlong"] = float(cut.sum())
        keep &= ~cut
    kept = [ep for ep, k in zip(valid, keep.tolist(), strict=True) if k]
    metrics["episodes/kept"] = float(len(kept))
    signal = bool(kept) and (not skip_no_signal or has_learning_signal(advantages[keep], objective))
    return Selection(valid, kept, advantages[keep], signal, metrics)
