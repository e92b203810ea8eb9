"""Training curves with bands: the per-step spread across groups (trainer.episodes.group_spread),
the report's bands around reward and sampler NLL, the entropy study's bands across seeds."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from agent.rollout import Episode
from trainer.episodes import group_spread, rollout_metrics
from trainer.report import write_report


def episode(group, reward, logprob=-0.5, error=None, sampled=2):
    ep = Episode(task_id=f"task{group}", group_id=group, seed=0)
    ep.append([1, 2], sampled=False)
    if sampled:
        ep.append(list(range(sampled)), sampled=True, logprobs=[logprob] * sampled)
        ep.finish_reasons.append("eos")
    ep.reward, ep.success, ep.error = reward, reward == 1.0, error
    return ep


def test_group_spread_is_the_range_of_the_group_means():
    batch = [
        episode(0, 1.0, logprob=-0.2),
        episode(0, 0.0, logprob=-0.4),  # group 0: reward 0.5, NLL 0.3
        episode(1, 0.0, logprob=-1.0),
        episode(1, 0.0, error="step failed", sampled=0),  # counts in the reward, not the NLL
        episode(2, 1.0, logprob=-0.1),
    ]
    spread = group_spread(batch)
    assert spread == pytest.approx(
        {
            "reward/group_min": 0.0,
            "reward/group_max": 1.0,
            "entropy/sampler_nll_group_min": 0.1,
            "entropy/sampler_nll_group_max": 1.0,
        }
    )
    metrics = rollout_metrics(batch)
    assert metrics["reward/group_min"] <= metrics["reward/mean"] <= metrics["reward/group_max"]
    assert all(math.isnan(value) for value in group_spread([]).values())


@pytest.fixture
def bands(monkeypatch):
    """The (x, low, high) of every band matplotlib draws (``fill_between``), in order."""
    import matplotlib.axes

    drawn = []
    draw = matplotlib.axes.Axes.fill_between

    def spy(self, x, low, high, **kwargs):
        drawn.append((list(x), list(low), list(high)))
        return draw(self, x, low, high, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between", spy)
    return drawn


def test_the_report_draws_bands_around_reward_and_sampler_nll(tmp_path, bands):
    rows = [
        {
            "step": step,
            "reward/mean": 0.5,
            "reward/group_min": 0.25,
            "reward/group_max": 0.75 + step / 100,
            "entropy/sampler_nll": 0.8,
            "entropy/sampler_nll_group_min": 0.6,
            "entropy/sampler_nll_group_max": 1.0,
        }
        for step in (1, 2, 3)
    ]
    rows[1]["reward/group_max"] = float("nan")  # a step without the band: left out of it
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    # in the order of the plots: reward.png, then entropy.png
    assert len(bands) == 2
    assert bands[0] == ([1, 3], [0.25, 0.25], pytest.approx([0.76, 0.78]))
    assert bands[1] == ([1, 2, 3], [0.6] * 3, [1.0] * 3)


def test_the_study_figure_draws_the_spread_across_seeds(tmp_path, bands):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "entropy_study" / "analyze.py"
    spec = importlib.util.spec_from_file_location("entropy_study_analyze_bands", path)
    analyze = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(analyze)

    def run(entropy, evals):
        steps = list(range(1, len(entropy) + 1))
        return {"entropy_steps": steps, "entropy": entropy, "evals": evals, "k": 4}

    by_method = {
        "grpo": [run([1.0, 0.8, 0.6], [(3, 0.3, 0.5)]), run([1.0, 0.6, 0.4, 0.2], [(3, 0.5, 0.7)])],
        "repo_r": [run([1.0, 1.0, 1.0], [(3, 0.4, 0.6)])],  # one seed: no band
    }
    analyze.plot(by_method, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").stat().st_size > 10_000
    # GRPO: entropy on the steps both seeds have, then pass@1 and pass@k at step 3
    assert bands == [
        ([1, 2, 3], [1.0, 0.6, 0.4], [1.0, 0.8, 0.6]),
        ([3], [0.3], [0.5]),
        ([3], [0.5], [0.7]),
    ]
    steps, mean, low, high = analyze.seed_band([([1, 2], [1.0, 3.0]), ([2, 3], [5.0, 7.0])])
    assert (steps, mean, low, high) == ([2], [4.0], [3.0], [5.0])
