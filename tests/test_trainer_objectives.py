"""Advantages, PPO-clip, aggregations, REPO, TIS/KL and the entropy controllers (issue 3).

Numbers are worked by hand in the comments; the tabular tests use an exact softmax policy over a
handful of actions (expectations by enumeration, float64), no model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.advantages import (
    compute_advantages,
    dr_grpo_advantages,
    grpo_advantages,
    loop_keep_mask,
    rloo_advantages,
)
from trainer.config import AdapoConfig, ObjectiveConfig, RepoConfig
from trainer.objectives import (
    EpsHighController,
    LossInputs,
    ZetaController,
    aggregate,
    has_learning_signal,
    k3_kl,
    loop_clip_eps,
    policy_loss,
    ppo_clip_token_loss,
    predicted_entropy_change,
    repo_shaped_advantages,
)

# ---------------------------------------------------------------- advantages
# groups: 7 -> rewards (1, 0, 0) (K=3), 3 -> (1, 0.5) (K=2), 9 -> (2,) (a group of one)
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.5, 2.0]
GROUPS = [7, 7, 7, 3, 3, 9]


def test_rloo_leave_one_out_by_hand():
    # group 7: 1 - (0+0)/2 = 1; 0 - (1+0)/2 = -0.5 (twice); group 3: 1 - 0.5, 0.5 - 1; singleton 0
    expected = torch.tensor([1.0, -0.5, -0.5, 0.5, -0.5, 0.0], dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(REWARDS, GROUPS), expected)
    # equals K/(K-1) (R - mean R): group 7: 3/2 * (1 - 1/3) = 1
    assert rloo_advantages(REWARDS, GROUPS)[0].item() == pytest.approx(1.5 * (1 - 1 / 3))


def test_grpo_std_normalised_by_hand():
    # group 7: mean 1/3, sample var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3; group 3: mean .75, var .125
    s7, s3 = math.sqrt(1 / 3), math.sqrt(0.125)
    eps = 1e-6
    expected = torch.tensor(
        [
            (2 / 3) / (s7 + eps),
            (-1 / 3) / (s7 + eps),
            (-1 / 3) / (s7 + eps),
            0.25 / (s3 + eps),
            -0.25 / (s3 + eps),
            0.0,
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(grpo_advantages(REWARDS, GROUPS), expected)
    # a group whose rewards are all equal gets 0, not 0/eps noise
    assert grpo_advantages([0.5, 0.5, 0.5], [1, 1, 1]).abs().max().item() == 0.0


def test_dr_grpo_centred_only_by_hand():
    expected = torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.25, -0.25, 0.0], dtype=torch.float64)
    torch.testing.assert_close(dr_grpo_advantages(REWARDS, GROUPS), expected)


@pytest.mark.parametrize("name", ["rloo", "grpo", "dr_grpo"])
def test_an_all_equal_group_of_non_dyadic_rewards_has_exactly_zero_advantage(name):
    """0.7 has no exact binary form: a group mean computed in float32 (or float64) is off by
    an ulp, which GRPO's division by a ~0 std blows up; equal rewards must give exactly 0."""
    rewards = [0.7] * 6 + [0.1, 0.3, 0.3]
    groups = [0] * 6 + [1, 1, 1]
    advantages = compute_advantages(name, torch.tensor(rewards, dtype=torch.float32), groups)
    assert advantages.dtype == torch.float64
    assert advantages[:6].tolist() == [0.0] * 6
    assert advantages[6:].abs().min() > 0.05
    with pytest.raises(ValueError, match=r"rewards must be finite, got \[nan\]"):
        compute_advantages(name, [1.0, float("nan")], [0, 0])


def test_estimators_ignore_group_order_and_labels():
    order = [4, 0, 5, 2, 3, 1]
    rewards = torch.tensor(REWARDS)[order]
    groups = torch.tensor([10 * g for g in GROUPS])[order]
    for name in ("rloo", "grpo", "dr_grpo"):
        torch.testing.assert_close(
            compute_advantages(name, rewards, groups),
            compute_advantages(name, REWARDS, GROUPS)[order],
        )


def test_compute_advantages_rejects_unknown_names_and_shapes():
    with pytest.raises(ValueError, match="'ppo'"):
        compute_advantages("ppo", REWARDS, GROUPS)
    with pytest.raises(ValueError, match="group_ids"):
        rloo_advantages(REWARDS, GROUPS[:-1])


def test_loop_filter_keeps_abs_advantage_at_least_threshold():
    advantages = torch.tensor([1.0, -0.5, 0.005, -0.0099, 0.01, 0.0])
    assert loop_keep_mask(advantages, 0.01).tolist() == [True, True, False, False, True, False]
    assert loop_keep_mask(advantages, 0.0).all()


# ---------------------------------------------------------------- aggregation
def test_aggregations_by_hand_with_masks_and_an_empty_row():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # token_mean: (1 + 2 + 4) / 3 tokens; the empty row adds nothing
    assert aggregate(per_token, mask, "token_mean").item() == pytest.approx(7 / 3)
    # seq_mean_token_mean: rows (1+2)/2 and 4/1, averaged over the 2 rows that have tokens
    assert aggregate(per_token, mask, "seq_mean_token_mean").item() == pytest.approx(2.75)
    # seq_mean_token_sum_norm: token sum 7 / (B=3 rows * T=3), or * max_tokens=7
    assert aggregate(per_token, mask, "seq_mean_token_sum_norm").item() == pytest.approx(7 / 9)
    assert aggregate(
        per_token, mask, "seq_mean_token_sum_norm", max_tokens=7
    ).item() == pytest.approx(7 / 21)
    assert aggregate(per_token, torch.zeros_like(mask), "token_mean").item() == 0.0
    with pytest.raises(ValueError, match="'sum'"):
        aggregate(per_token, mask, "sum")


def _inputs(logprobs, advantages, mask, **kw) -> LossInputs:
    logprobs = torch.as_tensor(logprobs, dtype=torch.float32).clone().requires_grad_()
    defaults = dict(
        entropy=torch.ones_like(logprobs),
        old_logprobs=logprobs.detach().clone(),
        sampler_logprobs=logprobs.detach().clone(),
    )
    defaults.update(kw)
    return LossInputs(
        logprobs=logprobs,
        advantages=torch.as_tensor(advantages, dtype=torch.float32),
        loss_mask=torch.as_tensor(mask),
        **defaults,
    )


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    # ratio 1 -> per-token loss -A: rows (-1, -1) and (-4); token_mean -6/3, seq means (-1, -4),
    # token sum -6 over B*T = 2*3
    [("token_mean", -2.0), ("seq_mean_token_mean", -2.5), ("seq_mean_token_sum_norm", -1.0)],
)
def test_policy_loss_broadcasts_episode_advantages_and_ignores_padding(aggregation, expected):
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # padded positions hold garbage old log-probs (a ratio of e^60 if it were not masked)
    old = torch.tensor([[0.0, 0.0, -60.0], [0.0, -60.0, -60.0]])
    inputs = _inputs(torch.zeros(2, 3), [1.0, 4.0], mask, old_logprobs=old)
    cfg = ObjectiveConfig(aggregation=aggregation)
    loss, metrics = policy_loss(inputs, cfg, zeta=0.0, eps_high=cfg.eps_high)
    assert loss.item() == pytest.approx(expected)
    assert metrics["ratio/max"] == pytest.approx(1.0)
    loss.backward()
    assert inputs.logprobs.grad[~mask.bool()].abs().max().item() == 0.0


# ---------------------------------------------------------------- PPO-clip
RATIOS = [0.5, 0.9, 1.0, 1.1, 1.25, 1.5]


def _clip_case(eps_high: float):
    ratios = torch.tensor([RATIOS, RATIOS])
    inputs = _inputs(ratios.log(), [1.0, -1.0], torch.ones(2, 6), old_logprobs=torch.zeros(2, 6))
    cfg = ObjectiveConfig(eps_low=0.2, eps_high=0.28)
    loss, metrics = policy_loss(inputs, cfg, zeta=0.0, eps_high=eps_high)
    loss.backward()
    return ratios, inputs.logprobs.grad, metrics


def test_ppo_clip_gradient_is_exactly_zero_where_the_clip_binds():
    ratios, grad, metrics = _clip_case(eps_high=0.28)
    # A=+1 row: only r=1.5 > 1.28 binds; A=-1 row: only r=0.5 < 0.8 binds
    binding = torch.tensor([[False] * 5 + [True], [True] + [False] * 5])
    assert grad[binding].tolist() == [0.0, 0.0]
    # elsewhere the unclipped term is the minimum: d(-r A / 12)/d logp = -r A / 12, including
    # A=+1, r=0.5 and A=-1, r=1.5 where the clip is inactive (the pessimistic term wins)
    advantages = torch.tensor([[1.0], [-1.0]]).expand(2, 6)
    expected = -ratios * advantages / 12
    torch.testing.assert_close(grad[~binding], expected[~binding])
    assert metrics["clip/low_frac"] == pytest.approx(1 / 12)
    assert metrics["clip/high_frac"] == pytest.approx(1 / 12)
    assert metrics["ratio/mean"] == pytest.approx(sum(RATIOS) / 6, rel=1e-6)
    assert metrics["ratio/max"] == pytest.approx(1.5, rel=1e-6)


def test_ppo_clip_uses_the_eps_high_passed_in():
    # ADAPO's eps_high=0.2 makes r=1.25 bind too (A=+1); the low side is unchanged
    _, grad, metrics = _clip_case(eps_high=0.2)
    assert grad[0, 4].item() == 0.0 and grad[0, 5].item() == 0.0
    assert metrics["clip/high_frac"] == pytest.approx(2 / 12)
    assert metrics["clip/low_frac"] == pytest.approx(1 / 12)
    assert metrics["adapo/eps_high"] == 0.2


def test_loop_bounds_as_asymmetric_eps():
    eps_low, eps_high = loop_clip_eps(0.1)
    assert 1 - eps_low == pytest.approx(1 / 1.1) and eps_high == 0.1
    ratio = torch.tensor([0.5, 2.0])
    clipped = -ppo_clip_token_loss(ratio.log(), torch.zeros(2), torch.ones(2), eps_low, eps_high)
    # A>0: min(r, clip(r)) -> 0.5 stays (pessimistic), 2.0 clips to 1.1
    torch.testing.assert_close(clipped, torch.tensor([0.5, 1.1]))
    clipped_neg = ppo_clip_token_loss(
        ratio.log(), torch.zeros(2), -torch.ones(2), eps_low, eps_high
    )
    # A<0: -min(-r, -clip(r)) = max(r, clip(r)) -> 0.5 clips up to 1/1.1, 2.0 stays
    torch.testing.assert_close(clipped_neg, torch.tensor([1 / 1.1, 2.0]))


# ---------------------------------------------------------------- metrics, TIS, KL, entropy
def test_metrics_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    logprobs = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    inputs = _inputs(
        logprobs,
        [3.0, -3.0],
        mask,
        entropy=torch.tensor([[1.0, 2.0, 50.0], [3.0, 50.0, 50.0]]),
        sampler_logprobs=logprobs + torch.tensor([[0.1, 0.3, 9.0], [0.2, 9.0, 9.0]]),
    )
    _, metrics = policy_loss(inputs, ObjectiveConfig(), zeta=0.5, eps_high=0.28)
    assert metrics["entropy/mean"] == pytest.approx(2.0)  # (1+2+3)/3
    assert metrics["mismatch/kl"] == pytest.approx(0.2)  # (0.1+0.3+0.2)/3
    assert metrics["adv/mean"] == pytest.approx(1.0)  # (3+3-3)/3
    assert metrics["adv/std"] == pytest.approx(math.sqrt(8.0))  # ((2^2)*2 + 4^2)/3 = 8
    # logp - mean = (1/6, -5/6, 2/3), A - mean = (2, 2, -4): (1/3 - 5/3 - 8/3) / 3
    assert metrics["entropy/cov_logp_adv"] == pytest.approx(-4 / 3)
    assert metrics["ratio/mean"] == 1.0 and metrics["clip/low_frac"] == 0.0
    assert metrics["repo/zeta"] == 0.0  # REPO off


def test_tis_weight_is_capped_and_carries_no_gradient():
    # old - sampler = log 3, log 1.5, 0, log 0.5 -> weights min(., 2) = 2, 1.5, 1, 0.5
    sampler = -torch.tensor([[math.log(3), math.log(1.5), 0.0, math.log(0.5)]])
    inputs = _inputs(torch.zeros(1, 4), [1.0], torch.ones(1, 4), sampler_logprobs=sampler)
    loss, _ = policy_loss(inputs, ObjectiveConfig(tis_cap=2.0), zeta=0.0, eps_high=0.28)
    assert loss.item() == pytest.approx(-(2 + 1.5 + 1 + 0.5) / 4)
    loss.backward()
    torch.testing.assert_close(inputs.logprobs.grad, -torch.tensor([[2.0, 1.5, 1.0, 0.5]]) / 4)


def test_k3_kl_by_hand_and_its_gradient():
    logprobs = torch.tensor([[0.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[0.0, -2.0]])
    # d = ref - logp = (0, -1): k3 = e^d - d - 1 = (0, e^-1)
    torch.testing.assert_close(k3_kl(logprobs, ref), torch.tensor([[0.0, math.exp(-1)]]))
    inputs = _inputs(logprobs.detach(), [0.0], torch.ones(1, 2), ref_logprobs=ref)
    loss, _ = policy_loss(inputs, ObjectiveConfig(kl_coef=0.5), zeta=0.0, eps_high=0.28)
    assert loss.item() == pytest.approx(0.5 * math.exp(-1) / 2)
    loss.backward()
    # d k3 / d logp = 1 - e^d -> (0, 1 - e^-1), times 0.5 / 2 tokens
    torch.testing.assert_close(
        inputs.logprobs.grad, torch.tensor([[0.0, 0.25 * (1 - math.exp(-1))]])
    )
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(
            _inputs(torch.zeros(1, 2), [0.0], torch.ones(1, 2)),
            ObjectiveConfig(kl_coef=0.5),
            0.0,
            0.28,
        )


def test_entropy_bonus_pushes_entropy_up():
    entropy = torch.tensor([[1.0, 2.0]], requires_grad=True)
    inputs = _inputs(torch.zeros(1, 2), [0.0], torch.ones(1, 2), entropy=entropy)
    loss, _ = policy_loss(inputs, ObjectiveConfig(entropy_coef=0.1), zeta=0.0, eps_high=0.28)
    assert loss.item() == pytest.approx(-0.1 * 1.5)
    loss.backward()
    torch.testing.assert_close(entropy.grad, torch.tensor([[-0.05, -0.05]]))


# ---------------------------------------------------------------- REPO
def test_repo_variants_by_hand_and_without_gradient():
    advantages = torch.tensor([[2.0, -2.0]])
    logprobs = torch.tensor([[-0.5, -3.0]], requires_grad=True)
    entropy = torch.tensor([[1.0, 1.0]], requires_grad=True)
    # L = logp + H = (0.5, -2.0), zeta = 0.1
    expected = {
        "const_beta": [2.0 - 0.1 * 0.5, -2.0 + 0.1 * 2.0],
        "r_submitted": [2.0 - 0.1 * 2.0 * 0.5, -2.0],
        "r_sym": [2.0 - 0.1 * 2.0 * 0.5, -2.0 + 0.1 * 2.0 * 2.0],
        "none": [2.0, -2.0],
    }
    for variant, values in expected.items():
        shaped = repo_shaped_advantages(advantages, logprobs, entropy, variant, 0.1)
        torch.testing.assert_close(shaped, torch.tensor([values]))
        assert not shaped.requires_grad
    with pytest.raises(ValueError, match="'x'"):
        repo_shaped_advantages(advantages, logprobs, entropy, "x", 0.1)


def test_repo_r_arxiv_form_by_hand_both_signs_both_clamps_and_its_bounds():
    """``A > 0: max(A (1 - zeta logp), 0)``, ``A < 0: min(A (1 + zeta logp), 0)`` with the raw
    log-prob (``r``) or the centred one (``r_centred``); zeta in [1e-4, 0.05] by default."""
    advantages = torch.tensor([[2.0, -2.0, 2.0, -2.0, 0.0]])
    logprobs = torch.tensor([[-0.5, -0.5, -30.0, -30.0, -1.0]])
    entropy = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]])
    raw = repo_shaped_advantages(advantages, logprobs, entropy, "r", 0.05)
    # rare correct token boosted, common one boosted less; the rare wrong token's penalty
    # 2 * (1 - 0.05 * 30) = -1 < 0 would flip its sign: clamped to 0
    expected = [2.0 * 1.025, -2.0 * 0.975, 2.0 * 2.5, 0.0, 0.0]
    torch.testing.assert_close(raw, torch.tensor([expected]))
    centred = repo_shaped_advantages(advantages, logprobs, entropy, "r_centred", 0.05)
    # L = logp + H = (0.5, 0.5, -29, -29, 0): a likely token (L > 0) is damped on both signs
    expected = [2.0 * 0.975, -2.0 * 1.025, 2.0 * 2.45, 0.0, 0.0]
    torch.testing.assert_close(centred, torch.tensor([expected]))
    # a large zeta cannot flip a positive advantage of a likely token either
    big = repo_shaped_advantages(
        torch.tensor([[2.0]]), torch.tensor([[-0.1]]), torch.tensor([[5.0]]), "r_centred", 1.0
    )
    assert big.item() == 0.0
    defaults = RepoConfig(variant="r")
    assert (defaults.zeta_min, defaults.zeta_max) == (1e-4, 0.05)
    with pytest.raises(ValueError, match="zeta_min <= zeta_init <= zeta_max"):
        RepoConfig(variant="r", zeta_init=0.1)


def test_faithful_controller_has_no_dead_band_and_no_smoothing():
    faithful = RepoConfig(variant="r", controller="faithful")
    assert faithful.dead_band == 0.0 and faithful.smoothing == 0.0
    controller = ZetaController(faithful)
    assert controller.step(1.0) == 0.02 and controller.target == 1.0  # the initial entropy
    assert controller.step(0.999) == 0.04  # any shortfall doubles: no band
    assert controller.step(1.001) == 0.02
    with pytest.raises(ValueError, match="controller 'faithful' has no smoothing"):
        RepoConfig(controller="faithful", smoothing=0.5)
    assert AdapoConfig(controller="faithful").dead_band == 0.0


def test_policy_loss_reports_repo_zeta_and_shaped_advantages():
    inputs = _inputs(
        torch.tensor([[-0.5, -3.0]]), [2.0], torch.ones(1, 2), entropy=torch.tensor([[1.0, 1.0]])
    )
    cfg = ObjectiveConfig(repo=RepoConfig(variant="r_submitted", zeta_max=1.0))
    _, metrics = policy_loss(inputs, cfg, zeta=0.1, eps_high=0.28)
    assert metrics["repo/zeta"] == 0.1
    # shaped: 2 - 0.1*2*0.5 = 1.9 and 2 - 0.1*2*(-2) = 2.4
    assert metrics["adv/mean"] == pytest.approx((1.9 + 2.4) / 2)


@pytest.mark.parametrize(
    "cfg",
    [
        ObjectiveConfig(),
        ObjectiveConfig(repo=RepoConfig(variant="r")),
        ObjectiveConfig(repo=RepoConfig(variant="r_centred")),
        ObjectiveConfig(repo=RepoConfig(variant="r_submitted")),
        ObjectiveConfig(repo=RepoConfig(variant="r_sym")),
        ObjectiveConfig(repo=RepoConfig(variant="d")),
        ObjectiveConfig(repo=RepoConfig(variant="const_beta")),
        ObjectiveConfig(entropy_coef=0.01),
    ],
    ids=["none", "r", "r_centred", "r_submitted", "r_sym", "d", "const_beta", "entropy_bonus"],
)
def test_has_learning_signal_says_whether_the_loss_has_a_gradient(cfg):
    """The predicate the loop uses to skip an update agrees with the loss's actual gradient for
    all-zero advantages, and any nonzero advantage is a signal."""
    logprobs = torch.tensor([[-0.5, -3.0, -1.0]])
    entropy = torch.tensor([[1.0, 0.7, 0.2]], requires_grad=True)
    inputs = _inputs(logprobs, [0.0], torch.ones(1, 3), entropy=entropy)
    loss, _ = policy_loss(inputs, cfg, zeta=0.1, eps_high=0.28)
    loss.backward()
    grads = [t.grad for t in (inputs.logprobs, entropy) if t.grad is not None]  # None: unused
    moves = any(bool(g.abs().sum() > 0) for g in grads)
    assert has_learning_signal(torch.zeros(4), cfg) == moves
    assert has_learning_signal(torch.tensor([0.0, 0.0, 0.5, -0.5]), cfg)


# tabular softmax policy over 6 actions; rewards favour the likely actions, so plain PG lowers H
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0], dtype=torch.float64)
ACTION_REWARDS = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits, -1)
    return -(log_probs.exp() * log_probs).sum()


def _expected_loss(logits: torch.Tensor, variant: str, zeta: float) -> torch.Tensor:
    """``E_{a ~ pi_old}[l(a)]`` by enumeration, with the ratio's old policy = the current one."""
    log_probs = torch.log_softmax(logits, -1)
    old = log_probs.detach()
    probs = old.exp()
    advantages = ACTION_REWARDS - (probs * ACTION_REWARDS).sum()
    entropy = _entropy(old).expand(6)
    shaped = repo_shaped_advantages(advantages, log_probs, entropy, variant, zeta)
    return (probs * ppo_clip_token_loss(log_probs, old, shaped, 0.2, 0.28)).sum()


def _gradient(variant: str, zeta: float) -> torch.Tensor:
    logits = LOGITS.clone().requires_grad_()
    (grad,) = torch.autograd.grad(_expected_loss(logits, variant, zeta), logits)
    return grad


@pytest.mark.parametrize(
    ("variant", "zeta"),
    [("const_beta", 0.1), ("r", 0.1), ("r_centred", 0.1), ("r_submitted", 0.1), ("r_sym", 0.1)]
    + [("d", 1.0)],
)
def test_repo_step_raises_entropy_relative_to_no_shaping(variant, zeta):
    step = 1.0
    plain = _entropy(LOGITS - step * _gradient("none", 0.0))
    shaped = _entropy(LOGITS - step * _gradient(variant, zeta))
    assert plain < _entropy(LOGITS)  # the unshaped step collapses entropy here
    assert shaped > plain + 1e-3


def test_const_beta_shaping_gradient_is_zeta_grad_entropy_by_enumeration():
    zeta = 0.1
    logits = LOGITS.clone().requires_grad_()
    (grad_entropy,) = torch.autograd.grad(_entropy(logits), logits)
    # descent on the loss moves the logits along -(g_shaped - g_plain) = +zeta grad H
    shaping = _gradient("const_beta", zeta) - _gradient("none", 0.0)
    torch.testing.assert_close(shaping, -zeta * grad_entropy, atol=1e-14, rtol=0)


def test_theorem1_entropy_change_matches_covariance():
    """``dH ~ -eta Cov_pi(log pi, pi A)`` for the logit step ``dz = eta pi A`` (A centred).

    Stated tolerance: 1e-4 relative at eta = 1e-3; the residual is second order (it shrinks 10x
    when eta does).
    """
    probs = torch.softmax(LOGITS, -1)
    log_probs = torch.log_softmax(LOGITS, -1)
    advantages = ACTION_REWARDS - (probs * ACTION_REWARDS).sum()
    cov = (probs * log_probs * probs * advantages).sum() - (probs * log_probs).sum() * (
        probs * probs * advantages
    ).sum()
    relative_errors = []
    for eta in (1e-2, 1e-3):
        step = -eta * _gradient("none", 0.0)  # the policy-gradient step from our loss
        torch.testing.assert_close(step, eta * probs * advantages, atol=1e-15, rtol=0)
        measured = _entropy(LOGITS + step) - _entropy(LOGITS)
        predicted = -eta * cov
        relative_errors.append(abs((measured - predicted) / predicted).item())
    assert relative_errors[1] < 1e-4
    assert 5 < relative_errors[0] / relative_errors[1] < 20


def test_repo_d_by_hand_opposes_the_predicted_entropy_change_without_flipping_a_sign():
    """``beta_t = -zeta dH_t = zeta L_t p_t A``, so ``A' = A (1 - zeta p_t L_t^2)``, clamped."""
    advantages = torch.tensor([[2.0, -2.0, 2.0, 0.0]])
    logprobs = torch.tensor([[-0.5, -3.0, -0.1, -1.0]])
    entropy = torch.tensor([[1.0, 1.0, 5.0, 1.0]])
    centred = logprobs + entropy  # (0.5, -2.0, 4.9, 0.0)
    dh = predicted_entropy_change(logprobs, entropy, advantages)
    torch.testing.assert_close(dh, -centred * logprobs.exp() * advantages)
    shaped = repo_shaped_advantages(advantages, logprobs, entropy, "d", 0.5)
    damp = 1.0 - 0.5 * logprobs.exp() * centred.square()
    # the third token: 1 - 0.5 * 0.905 * 24.01 < 0 would flip its sign: clamped to 0
    expected = [2.0 * damp[0, 0].item(), -2.0 * damp[0, 1].item(), 0.0, 0.0]
    torch.testing.assert_close(shaped, torch.tensor([expected]))
    assert torch.equal(repo_shaped_advantages(advantages, logprobs, entropy, "d", 0.0), advantages)


def test_predicted_entropy_change_is_theorem1_in_expectation_over_the_sampled_token():
    """Averaged over ``a ~ pi`` the one-sample estimate equals ``-Cov_pi(log pi, pi A)`` exactly,
    and times eta it predicts the measured change of a small step (the theorem's own test)."""
    probs = torch.softmax(LOGITS, -1)
    log_probs = torch.log_softmax(LOGITS, -1)
    advantages = ACTION_REWARDS - (probs * ACTION_REWARDS).sum()
    entropy = _entropy(LOGITS).expand(6)
    per_action = predicted_entropy_change(log_probs, entropy, advantages)
    cov = (probs * log_probs * probs * advantages).sum() - (probs * log_probs).sum() * (
        probs * probs * advantages
    ).sum()
    torch.testing.assert_close((probs * per_action).sum(), -cov, atol=1e-15, rtol=0)
    eta = 1e-3
    measured = _entropy(LOGITS + eta * probs * advantages) - _entropy(LOGITS)
    assert abs(measured - eta * (probs * per_action).sum()) < 1e-4 * abs(measured)


def _tabular_entropy_change(logits, advantages, variant, zeta, eta=1e-2):
    """The entropy change of one exact expected step (enumerating actions) under ``variant``."""
    logits = logits.clone().requires_grad_()
    log_probs = torch.log_softmax(logits, -1)
    probs = log_probs.detach().exp()
    entropy = _entropy(logits.detach()).expand(logits.shape[-1])
    shaped = repo_shaped_advantages(advantages, log_probs, entropy, variant, zeta)
    (grad,) = torch.autograd.grad((probs * shaped * log_probs).sum(), logits)
    return (_entropy(logits.detach() + eta * grad) - _entropy(logits.detach())).item()


def test_repo_d_damps_the_entropy_change_both_ways_and_more_with_larger_zeta():
    """On 300 random tabular policies (16 actions, centred random advantages) REPO-D's step moves
    the entropy less than the plain step in most draws, whether the plain step lowers or raises
    it, never reverses the direction at moderate zeta, and the damping grows with zeta."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(300):
        scale = 4.0 * torch.rand((), generator=generator, dtype=torch.float64)
        logits = scale * torch.randn(16, generator=generator, dtype=torch.float64)
        probs = torch.softmax(logits, -1)
        advantages = torch.randn(16, generator=generator, dtype=torch.float64)
        cases.append((logits, advantages - (probs * advantages).sum()))
    plain = torch.tensor([_tabular_entropy_change(z, a, "none", 0.0) for z, a in cases])
    ratios = {}
    for zeta in (0.5, 2.0):
        shaped = torch.tensor([_tabular_entropy_change(z, a, "d", zeta) for z, a in cases])
        ratio = shaped.abs() / plain.abs()
        for falling in (plain < 0, plain > 0):
            assert falling.sum() > 50  # both directions are well represented
            assert (ratio[falling] < 1).double().mean() > 0.85
        ratios[zeta] = ratio.median().item()
        if zeta == 0.5:
            assert ((shaped * plain) > 0).double().mean() > 0.99
    assert ratios[2.0] < ratios[0.5] < 1.0


# ---------------------------------------------------------------- controllers
def test_zeta_controller_direction_dead_band_and_bounds():
    cfg = RepoConfig(
        variant="const_beta",
        zeta_init=0.02,
        zeta_min=0.005,
        zeta_max=0.05,
        factor=2.0,
        dead_band=0.05,
    )
    controller = ZetaController(cfg)
    assert controller.step(1.0) == 0.02 and controller.target == 1.0  # first batch sets the target
    assert controller.step(0.9) == 0.04  # below target: doubled
    assert controller.step(0.9) == 0.05  # bounded by zeta_max
    assert controller.step(0.96) == 0.05 and controller.step(1.04) == 0.05  # inside the 5 % band
    assert [controller.step(1.2) for _ in range(4)] == [
        0.025,
        0.0125,
        0.00625,
        0.005,
    ]  # halved, floor


def test_zeta_controller_explicit_target_and_bad_entropy():
    controller = ZetaController(RepoConfig(zeta_init=0.02, target_entropy=2.0))
    assert controller.step(1.0) == 0.04
    with pytest.raises(ValueError, match="nan"):
        controller.step(float("nan"))


def test_smoothed_controller_acts_on_the_trend_not_on_one_noisy_batch():
    """Batch entropies alternating +-30 % around a level 10 % below the target: the raw rule
    halves and doubles zeta on alternate batches; the moving average (smoothing 0.8) sits below
    the dead band, so zeta only grows, as the trend says."""
    readings = [1.0] + [0.9 * (1.3 if i % 2 else 0.7) for i in range(8)]
    raw = ZetaController(RepoConfig(zeta_init=0.1, zeta_max=8.0, target_entropy=1.0))
    smooth = ZetaController(
        RepoConfig(zeta_init=0.1, zeta_max=8.0, target_entropy=1.0, smoothing=0.8)
    )
    raw_path = [raw.step(h) for h in readings]
    smooth_path = [smooth.step(h) for h in readings]
    assert max(raw_path) <= 0.2  # chatter: up, down, up, down
    assert smooth_path == sorted(smooth_path) and smooth_path[-1] >= 1.6  # monotone rise
    expected = 1.0
    for h in readings[1:]:
        expected = 0.8 * expected + 0.2 * h
    assert smooth.controlled == pytest.approx(expected)
    with pytest.raises(ValueError, match="smoothing"):
        RepoConfig(smoothing=1.0)


def test_eps_high_controller_direction_dead_band_and_bounds():
    cfg = AdapoConfig(enabled=True, factor=1.1, dead_band=0.05, eps_high_max=0.5)
    controller = EpsHighController(cfg, eps_low=0.2, eps_high_init=0.28)
    assert controller.step(1.0) == 0.28
    assert controller.step(0.5) == pytest.approx(0.308)  # entropy low: widen the upper clip
    assert controller.step(0.97) == pytest.approx(0.308)  # dead band
    assert [controller.step(0.5) for _ in range(20)][-1] == 0.5  # eps_high_max
    assert [controller.step(2.0) for _ in range(30)][-1] == 0.2  # floor = eps_low
    floor = EpsHighController(
        cfg.model_copy(update={"eps_high_min": 0.25}), eps_low=0.2, eps_high_init=0.28
    )
    assert [floor.step(x) for x in (1.0, 9.0, 9.0, 9.0)][-1] == 0.25
    with pytest.raises(ValueError, match="0.6"):
        EpsHighController(cfg, eps_low=0.2, eps_high_init=0.6)


@pytest.mark.parametrize(
    "make",
    [lambda: ZetaController(RepoConfig()), lambda: EpsHighController(AdapoConfig(), 0.2, 0.28)],
)
def test_controller_state_round_trip(make):
    controller = make()
    for entropy in (1.0, 0.7, 0.7):
        controller.step(entropy)
    saved = json.loads(json.dumps(controller.state_dict()))  # trainer state is plain JSON
    restored = make()
    restored.load_state_dict(saved)
    assert restored.state_dict() == controller.state_dict()
    assert restored.step(0.5) == controller.step(0.5)
    with pytest.raises(ValueError, match="target_entropy"):
        make().load_state_dict({"zeta": 0.1, "eps_high": 0.3})
