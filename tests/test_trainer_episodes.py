"""What a step trains on (trainer.episodes.select_episodes) and the run's durable files
(agent.io, trainer.logger.read_metrics), by hand."""

import json
import os

import pytest
import torch

from agent.io import append_line, atomic_write_text
from agent.rollout import Episode
from trainer.config import ObjectiveConfig
from trainer.episodes import rollout_metrics, select_episodes
from trainer.logger import read_metrics


def episode(task, group, reward, *, finish="eos", error=None, sampled=3):
    ep = Episode(task_id=task, group_id=group, seed=0)
    ep.append([1, 2], sampled=False)
    if sampled:
        ep.append(list(range(sampled)), sampled=True, logprobs=[-0.5] * sampled)
        ep.finish_reasons.append(finish)
    ep.reward, ep.success, ep.error = reward, reward == 1.0, error
    return ep


def test_select_episodes_applies_its_filters_in_order():
    batch = [
        episode("a", 0, 1.0),
        episode("a", 0, 0.0, finish="length"),  # cut at the cap: in the baseline, not the loss
        episode("a", 0, 0.0),
        episode("a", 0, 0.0, error="step failed"),  # an env error: not trainable at all
        episode("b", 1, 1.0),
        episode("b", 1, 1.0),  # a group without spread: |A| = 0, dropped by LOOP's filter
    ]
    objective = ObjectiveConfig(advantage="rloo", adv_filter_threshold=0.01, overlong_filter=True)
    chosen = select_episodes(batch, objective, skip_no_signal=True)
    assert chosen.valid == batch[:3] + batch[4:]
    assert chosen.kept == [batch[0], batch[2]]
    # RLOO over the 3 trainable episodes of group a (the cut one included): 1 - 0, 0 - 0.5
    assert chosen.advantages.tolist() == pytest.approx([1.0, -0.5])
    assert chosen.metrics == {"episodes/overlong": 1.0, "episodes/kept": 2.0}
    assert chosen.signal


def test_a_batch_of_equal_rewards_has_no_signal_and_a_rank_without_kept_ones_trains_at_zero():
    batch = [episode("a", 0, 1.0), episode("a", 0, 1.0)]
    chosen = select_episodes(batch, ObjectiveConfig(), skip_no_signal=True)
    assert chosen.kept == batch and not chosen.signal
    filtered = select_episodes(
        batch, ObjectiveConfig(adv_filter_threshold=0.01), skip_no_signal=True
    )
    assert filtered.kept == [] and not filtered.signal
    zero = filtered.batch(pad_id=0)
    assert len(zero) == 2 and torch.all(zero.advantages == 0)
    assert not select_episodes([], ObjectiveConfig(), skip_no_signal=True).signal


def test_a_non_finite_reward_is_an_environment_error_that_leaves_other_groups_alone():
    import gymnasium

    from agent.rollout import RolloutRunner

    class NaNReward(gymnasium.Env):  # a test double for an environment fault
        def task_ids(self, split):
            return ["x"]

        def reset(self, seed=None, options=None):
            return "Say hi.", {"task_id": options["task_id"], "turn": 0}

        def step(self, action):
            return "", float("nan"), True, False, {"task_id": "x", "turn": 1}

    class OneToken:
        tokenizer = None

        def generate(self, prompts, max_new_tokens, stop=(), *, temperature=None):
            from agent.policy import Generation

            return [Generation([7], [-0.1], "eos") for _ in prompts]

    class Chat:
        tokenizer = type("T", (), {"decode": staticmethod(lambda ids, **_: "hi")})()

        def prompt_ids(self, text):
            return [1, 2]

    (bad,) = RolloutRunner(OneToken(), NaNReward, Chat(), group_size=1).run(["x"])
    assert bad.error == "step returned a non-finite reward nan" and bad.reward == 0.0
    good = [episode("b", 1, 1.0), episode("b", 1, 0.0)]
    bad.group_id = 0
    alone = select_episodes(good, ObjectiveConfig(), skip_no_signal=True)
    mixed = select_episodes([bad, *good], ObjectiveConfig(), skip_no_signal=True)
    assert mixed.kept == good and torch.equal(mixed.advantages, alone.advantages)
    assert rollout_metrics([bad, *good])["episodes/errors"] == 1.0


def test_rollout_metrics_count_errors_apart_and_report_the_sampler_nll():
    batch = [episode("a", 0, 1.0), episode("a", 0, 0.0, error="reset failed", sampled=0)]
    metrics = rollout_metrics(batch)
    assert metrics["episodes/errors"] == 1.0 and metrics["reward/mean"] == 0.5
    assert metrics["entropy/sampler_nll"] == pytest.approx(0.5)
    assert metrics["response/tokens_mean"] == 3.0


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "results.json", "old")

    def failing_fsync(fd):  # a test double for a disk that fails mid-write
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left
    assert atomic_write_text(path, "new").read_text() == "new"


def test_read_metrics_drops_a_torn_last_line_and_names_a_broken_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"step": 1, "loss/total": 0.5}))
    append_line(path, json.dumps({"step": 2, "loss/total": 0.25}))
    with path.open("a") as handle:
        handle.write('{"step": 3, "loss/to')  # killed mid-write
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]
    assert read_metrics(tmp_path / "absent") == []
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metrics(path)
