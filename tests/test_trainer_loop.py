"""End-to-end training runs with a tiny model: artifacts, learning, resume, weight push."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium
import pytest
import torch

from trainer.checkpoint import latest_checkpoint
from trainer.config import load_config
from trainer.loop import Trainer, run_training

REPO = Path(__file__).resolve().parents[1]
DESIGN_METRICS = [
    "reward/mean",
    "success/rate",
    "entropy/mean",
    "entropy/initial",
    "clip/low_frac",
    "clip/high_frac",
    "ratio/mean",
    "ratio/max",
    "mismatch/kl",
    "adv/mean",
    "adv/std",
    "repo/zeta",
    "adapo/eps_high",
    "grad/norm",
    "perf/tokens_per_s",
    "perf/rollout_s",
    "perf/learn_s",
]


def tiny_overrides(model_dir, runs_root, **extra):
    base = {
        "model.name": model_dir,
        # these tests check what an update does to the learner's own module (the hf sampler)
        "policy.backend": "hf",
        "steps": 2,
        "rollout.tasks_per_step": 2,
        "rollout.group_size": 2,
        "rollout.max_new_tokens": 8,
        "rollout.max_context_tokens": 512,
        "eval.num_tasks": 2,
        "eval.k": 2,
        "eval.at_start": True,
        "checkpoint.every": 1,
        "checkpoint.keep_last": 2,
        "logging.runs_root": str(runs_root),
        "logging.run_name": "run",
        "logging.progress": False,
        "trainer.micro_batch_size": 2,
        # the untrained tiny model earns no reward on CodeExec: without this its batches have no
        # signal and make no update, and these tests are about what an update does
        "trainer.skip_no_signal": False,
        # it rarely stops within max_new_tokens either: the overlong filter would drop every
        # episode; and a measured target costs a rollout these tests do not need
        "objective.overlong_filter": False,
        "objective.target_entropy_tasks": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_few_step_run_writes_every_artifact(tiny_model_dir, tmp_path):
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml", tiny_overrides(tiny_model_dir, tmp_path)
    )
    run_training(cfg, tmp_path / "run")
    check_artifacts(cfg, tmp_path / "run")


@pytest.mark.slow
def test_few_step_smollm2_run_writes_every_artifact(tmp_path):
    """The quick start's config with its own model (SmolLM2-135M-Instruct), shrunk to 2 steps of
    2 tasks x 2 episodes of 48 tokens, its controller target measured on 2 tasks. The overlong
    filter is off and every step updates (trainer.skip_no_signal=false): at 48 tokens most
    answers are cut, and the test needs the learner's metrics of step 1."""
    overrides = tiny_overrides("smollm2-135m-instruct", tmp_path, **{"rollout.max_new_tokens": 48})
    overrides = [o for o in overrides if not o.startswith("objective.")]
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        [*overrides, "objective.target_entropy_tasks=2", "objective.overlong_filter=false"],
    )
    run_training(cfg, tmp_path / "run")
    check_artifacts(cfg, tmp_path / "run")
    steps = rows(tmp_path / "run")[1:]
    assert 0.1 < steps[0]["entropy/target"] < 3.0  # a measured target, in nats
    assert steps[1]["entropy/target"] == steps[0]["entropy/target"]


def check_artifacts(cfg, run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert load_config(run_dir / "config.yaml") == cfg
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == [0, 1, 2]
    for key in DESIGN_METRICS:
        assert key in metrics[1], key
    assert "eval/dev/pass@1" in metrics[0] and "eval/dev/pass@k" in metrics[2]
    for row in (metrics[0], metrics[2]):  # every evaluation score with its interval and count
        for name in ("pass@1", "pass@k", "reward"):
            key = f"eval/dev/{name}"
            assert row[f"{key}_lo"] <= row[key] <= row[f"{key}_hi"], (key, row)
            assert row[f"{key}_tasks"] == cfg.eval.num_tasks
    # each evaluation's per-task records, for task-by-task comparisons of runs afterwards
    for step, row in ((0, metrics[0]), (2, metrics[2])):
        saved = json.loads((run_dir / "evals" / f"dev_step{step:05d}.json").read_text())
        assert saved["step"] == step and saved["k"] == cfg.eval.k
        assert len(saved["records"]) == cfg.eval.num_tasks
        successes = [ep["success"] for rec in saved["records"] for ep in rec["episodes"]]
        assert len(successes) == cfg.eval.num_tasks * cfg.eval.k
        assert sum(successes) / len(successes) == pytest.approx(row["eval/dev/pass@1"])
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    for name in ("report.md", "reward.png", "entropy.png", "clip.png", "success.png"):
        assert (run_dir / name).stat().st_size > 0, name
    checkpoint = latest_checkpoint(run_dir)
    assert checkpoint.name == "step_2"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1", "step_2"]
    # the checkpoint is a plain HF folder
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(checkpoint)
    assert (checkpoint / "trainer_state.pt").exists() and (checkpoint / "learner.pt").exists()
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and state["zeta"]["target_entropy"] == pytest.approx(
        metrics[1]["entropy/target"]
    )
    assert model.config.vocab_size > 0


class DigitRewardEnv(gymnasium.Env):
    """A trivially learnable task for the reward-only sanity check: the reward is the share of
    lowercase ASCII letters in the reply (a dense signal any causal LM can pick up in a few
    steps, even a randomly initialised one)."""

    observation_space = gymnasium.spaces.Text(max_length=100)
    action_space = gymnasium.spaces.Text(max_length=10_000)

    def __init__(self):
        self.splits = ["train", "dev"]

    def task_ids(self, split):
        return [f"{split}-{i}" for i in range(8)]

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.task = (options or {}).get("task_id", "train-0")
        return "Say some numbers.", {"task_id": self.task, "turn": 0}

    def step(self, action):
        reward = sum("a" <= c <= "z" for c in action) / max(len(action), 1)
        return (
            "",
            reward,
            True,
            False,
            {
                "task_id": self.task,
                "turn": 1,
                "success": reward > 0.5,
                "tests_passed": 0,
                "tests_total": 0,
            },
        )


def use_test_env(env_class) -> dict[str, str]:
    """Register ``env_class`` with gymnasium (as ``eprl-test/<Name>-v0``) and return the config
    overrides that train on it."""
    env_id = f"eprl-test/{env_class.__name__.removesuffix('Env')}-v0"
    gymnasium.register(env_id, entry_point=env_class, disable_env_checker=True)
    return {"env.id": env_id, "env.kwargs": "{}"}


def peaked_copy(model_dir, out_dir):
    """The tiny model with embeddings scaled up: its next-token distributions are peaked on a few
    tokens (like a trained LM's), so a policy gradient reranks tokens it actually samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return str(out_dir)


def test_mean_reward_rises_on_a_trivially_learnable_task(tiny_model_dir, tmp_path):
    overrides = tiny_overrides(
        peaked_copy(tiny_model_dir, tmp_path / "peaked"),
        tmp_path,
        **{
            **use_test_env(DigitRewardEnv),
            "steps": 12,
            "rollout.tasks_per_step": 4,
            "rollout.group_size": 4,
            "rollout.max_new_tokens": 6,
            "trainer.lr": 3e-3,
            "eval.at_start": False,
            "checkpoint.every": 100,
            "objective.repo.variant": "none",
            "logging.tensorboard": False,
        },
    )
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    run_training(cfg, tmp_path / "run")
    rewards = [r["reward/mean"] for r in rows(tmp_path / "run") if r["step"] > 0]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards


class SwitchRewardEnv(DigitRewardEnv):
    """DigitRewardEnv whose reward can be switched to a constant (``SwitchRewardEnv.constant``):
    then every group's rewards are equal, every RLOO advantage is 0, and a batch has no
    signal."""

    constant: float | None = None

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        if SwitchRewardEnv.constant is not None:
            reward = SwitchRewardEnv.constant
        return obs, reward, terminated, truncated, info


def _weights(trainer):
    return {n: t.clone() for n, t in trainer.learner.named_weights()}


def set_up_trainer(model_dir, tmp_path, **extra):
    """The quick-start config with :func:`tiny_overrides` and ``extra``, and a set-up
    :class:`Trainer` on it writing to ``tmp_path / "run"`` (the caller cleans it up)."""
    cfg = load_config(
        REPO / "configs" / "quickstart.yaml", tiny_overrides(model_dir, tmp_path, **extra)
    )
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    return cfg, trainer


@pytest.mark.parametrize("skip", [True, False])
def test_a_batch_without_signal_makes_no_update(tiny_model_dir, tmp_path, skip):
    """After a step with signal, a batch whose advantages are all 0 leaves the weights, the
    optimizer and zeta as they were (train/no_signal 1); without trainer.skip_no_signal AdamW
    moves the weights on that zero gradient along its momentum."""
    _, trainer = set_up_trainer(
        tiny_model_dir,
        tmp_path,
        **{
            **use_test_env(SwitchRewardEnv),
            "trainer.lr": 1e-3,
            "trainer.mini_batches": 1,
            "trainer.skip_no_signal": skip,
            "eval.at_start": False,
        },
    )
    try:
        SwitchRewardEnv.constant = None
        trainer.step = 1
        first = trainer.train_step()
        assert first["train/no_signal"] == 0.0 and "entropy/mean" in first
        before, zeta = _weights(trainer), trainer.zeta.zeta
        SwitchRewardEnv.constant = 0.5
        trainer.step = 2
        second = trainer.train_step()
        after = _weights(trainer)
    finally:
        SwitchRewardEnv.constant = None
        trainer.cleanup()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    if skip:
        assert second["train/no_signal"] == 1.0 and "entropy/mean" not in second
        assert changed == [] and trainer.zeta.zeta == zeta
        assert trainer.learner.scheduler.last_epoch == 1  # one optimizer step in all
    else:
        assert second["train/no_signal"] == 0.0 and second["adv/std"] == 0.0
        assert changed, "AdamW did not move the weights on a zero gradient"


def test_overlong_filter_leaves_truncated_episodes_out_of_the_loss(tiny_model_dir, tmp_path):
    """objective.overlong_filter: episodes cut at max_new_tokens keep their reward in the RLOO
    baseline but are not trained on; a batch cut entirely makes no update."""
    from trainer.episodes import cut_at_cap

    _, trainer = set_up_trainer(
        tiny_model_dir,
        tmp_path,
        **{
            **use_test_env(DigitRewardEnv),
            "rollout.max_new_tokens": 4,  # the tiny model does not stop within 4 tokens
            "objective.overlong_filter": True,
            "trainer.skip_no_signal": True,
            "eval.at_start": False,
        },
    )
    try:
        episodes = trainer._rollout(trainer.train_tasks[:2], seed=3)
        assert all(cut_at_cap(ep) for ep in episodes)
        assert len({ep.reward for ep in episodes}) > 1  # there would be a signal
        before = _weights(trainer)
        trainer.step = 1
        metrics = trainer.train_step()
        assert metrics["episodes/overlong"] == 4 and metrics["episodes/kept"] == 0
        assert metrics["train/no_signal"] == 1.0
        assert all(torch.equal(before[n], t) for n, t in _weights(trainer).items())
        with pytest.raises(RuntimeError, match="no sampled tokens"):
            trainer.cfg.objective.target_entropy_tasks = 2
            trainer.zeta.target = None
            trainer.measure_target_entropy()  # truncated episodes are left out here too
    finally:
        trainer.cleanup()
    stopped = type(episodes[0])(task_id="t", group_id=0, seed=0, finish_reasons=["length", "stop"])
    assert not cut_at_cap(stopped) and not cut_at_cap(
        type(stopped)(task_id="t", group_id=0, seed=0)
    )


def test_kl_penalty_is_zero_at_the_reference_and_grows_after_an_update(tiny_model_dir, tmp_path):
    """objective.kl_coef: the learner holds the initial model as a frozen reference. Its first
    update (policy = reference) equals the update without the penalty; a second update on the
    same batch sees a positive KL and a loss larger than without it by kl_coef * KL."""
    from agent.models import load_model
    from trainer.learner import TorchLearner, collate

    cfg, trainer = set_up_trainer(tiny_model_dir, tmp_path, **{"trainer.lr": 1e-2})
    episodes = trainer._runner(2).run(trainer.train_tasks[:2])
    trainer.cleanup()
    batch = collate(episodes, torch.tensor([1.0, -1.0, 0.5, -0.5]), trainer.tokenizer.pad_token_id)
    kl_cfg = cfg.model_copy(deep=True)
    kl_cfg.objective.kl_coef = 0.5
    plain = TorchLearner(load_model(tiny_model_dir), cfg, torch.device("cpu"), 4)
    with pytest.raises(ValueError, match="kl_coef=0.5 needs a reference model"):
        TorchLearner(load_model(tiny_model_dir), kl_cfg, torch.device("cpu"), 4)
    kl = TorchLearner(
        load_model(tiny_model_dir), kl_cfg, torch.device("cpu"), 4, load_model(tiny_model_dir)
    )
    first_plain, first_kl = plain.update(batch, 0.0, 0.28), kl.update(batch, 0.0, 0.28)
    assert first_kl["kl/ref"] == 0.0 and "kl/ref" not in first_plain
    assert first_kl["loss/total"] == pytest.approx(first_plain["loss/total"], abs=1e-6)
    for (name, a), (_, b) in zip(plain.named_weights(), kl.named_weights(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    second = kl.update(batch, 0.0, 0.28)
    assert second["kl/ref"] > 1e-4
    assert second["loss/total"] == pytest.approx(
        plain.update(batch, 0.0, 0.28)["loss/total"] + 0.5 * second["kl/ref"], rel=1e-4
    )
    # the reference is frozen: two updates did not move it
    initial = load_model(tiny_model_dir).state_dict()
    for name, value in kl.reference.lm.state_dict().items():
        assert torch.equal(value, initial[name]), name


def test_resumed_run_keeps_the_initial_model_as_kl_reference(tiny_model_dir, tmp_path):
    from agent.models import load_model

    overrides = tiny_overrides(
        tiny_model_dir,
        tmp_path,
        **{
            **use_test_env(DigitRewardEnv),  # a reward with signal: the update moves weights
            "steps": 1,
            "eval.at_start": False,
            "objective.kl_coef": 0.1,
            "trainer.lr": 1e-2,
            "trainer.mini_batches": 1,
        },
    )
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    run_training(cfg, tmp_path / "run")
    (row,) = rows(tmp_path / "run")
    assert row["kl/ref"] == 0.0  # one update per batch: measured before it, at the reference
    resumed = Trainer(cfg.model_copy(update={"steps": 2}), tmp_path / "run", resume=True)
    resumed.setup()
    try:
        assert resumed.step == 1
        initial = load_model(tiny_model_dir).state_dict()
        trained = resumed.learner.lm.state_dict()
        assert any(not torch.equal(trained[n], initial[n]) for n in initial)
        for name, value in resumed.learner.reference.lm.state_dict().items():
            assert torch.equal(value, initial[name]), name
    finally:
        resumed.cleanup()


def test_resume_after_sigkill_continues_from_the_last_checkpoint(tiny_model_dir, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, tmp_path, steps=4, **{"eval.at_start": False})
    command = [
        sys.executable,
        "-m",
        "eprl",
        "train",
        str(REPO / "configs" / "quickstart.yaml"),
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    run_dir = tmp_path / "run"
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoints" / "step_2").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(run_dir).name in ("step_2", "step_3")
    resumed_from = int(latest_checkpoint(run_dir).name.split("_")[1])

    subprocess.run(
        [sys.executable, "-m", "eprl", "train", "--resume", str(run_dir)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    steps = [r["step"] for r in rows(run_dir)]
    assert steps == [1, 2, 3, 4], steps
    assert latest_checkpoint(run_dir).name == "step_4"
    state = torch.load(run_dir / "checkpoints" / "step_4" / "trainer_state.pt", weights_only=False)
    assert state["cursor"]["position"] == 8 % 2400 and resumed_from >= 2

    # an uninterrupted run with the same config gives the same steps after the resume point
    straight = tiny_overrides(
        tiny_model_dir, tmp_path / "straight", steps=4, **{"eval.at_start": False}
    )
    run_training(
        load_config(REPO / "configs" / "quickstart.yaml", straight), tmp_path / "straight" / "run"
    )
    for a, b in zip(rows(run_dir), rows(tmp_path / "straight" / "run"), strict=True):
        assert a["reward/mean"] == pytest.approx(b["reward/mean"])
        assert a["entropy/mean"] == pytest.approx(b["entropy/mean"], rel=1e-4)


def test_weight_push_makes_policy_logprobs_equal_the_learners(tiny_model_dir, tmp_path):
    from agent.models import load_model
    from agent.policy import HFPolicy
    from trainer.learner import collate

    _, trainer = set_up_trainer(tiny_model_dir, tmp_path, **{"trainer.lr": 1e-2})
    episodes = trainer._runner(2).run(trainer.train_tasks[:2])
    batch = collate(episodes, torch.tensor([1.0, -1.0, 0.5, -0.5]), trainer.tokenizer.pad_token_id)
    batch.old_logprobs, _ = trainer.learner.logprobs(batch)
    trainer.learner.update(batch, zeta=0.0, eps_high=0.28)

    separate = HFPolicy(load_model(tiny_model_dir), trainer.tokenizer, temperature=1.0)
    before = separate.generate([episodes[0].token_ids[: episodes[0].prompt_len]], 8)[0]
    separate.update_weights(trainer.learner.named_weights())
    prompt = episodes[0].token_ids[: episodes[0].prompt_len]
    torch.manual_seed(0)
    gen = separate.generate([prompt], 8)[0]
    sampled = type(episodes[0])(task_id="x", group_id=0, seed=0)
    sampled.append(prompt, sampled=False)
    sampled.append(gen.token_ids, sampled=True, logprobs=gen.logprobs)
    check = collate([sampled], torch.zeros(1), trainer.tokenizer.pad_token_id)
    learner_logprobs, _ = trainer.learner.logprobs(check)
    mask = check.loss_mask.bool()
    assert torch.allclose(learner_logprobs[mask], torch.tensor(gen.logprobs), atol=1e-4)
    assert (
        before.logprobs != gen.logprobs[: len(before.logprobs)] or before.token_ids != gen.token_ids
    )
    trainer.cleanup()


def test_step_larger_than_max_parallel_episodes_rolls_out_in_parts(tiny_model_dir, tmp_path):
    """A step of 3 tasks x K=2 with at most 4 episodes at once (AppWorld's server pool is such a
    bound) runs in parts, keeps every group's label and gets the seeds an unsplit step gets."""
    _, trainer = set_up_trainer(tiny_model_dir, tmp_path, **{"rollout.max_parallel_episodes": 4})
    calls = []
    runner_factory = trainer._runner

    def counting_runner(group_size):
        runner = runner_factory(group_size)
        run = runner.run

        def counted(tasks, seed=0):
            calls.append(len(tasks) * group_size)
            return run(tasks, seed=seed)

        runner.run = counted
        return runner

    trainer._runner = counting_runner
    tasks = trainer.train_tasks[:3]
    episodes = trainer._rollout(tasks, seed=100)
    trainer.cleanup()
    assert calls == [4, 2]
    assert [ep.group_id for ep in episodes] == [0, 0, 1, 1, 2, 2]
    assert [ep.task_id for ep in episodes] == [t for t in tasks for _ in range(2)]
    assert [ep.seed for ep in episodes] == list(range(100, 106))
    assert all(ep.num_sampled_tokens > 0 for ep in episodes)


def test_single_update_reads_old_logprobs_off_its_own_forward(tiny_model_dir, tmp_path):
    """With one update per batch the loop skips the separate old-log-prob pass: the update must
    equal the one made with precomputed old log-probs (same loss, same new weights)."""
    from agent.models import load_model
    from trainer.learner import TorchLearner, collate

    overrides = {
        "trainer.lr": 1e-3,
        "trainer.mini_batches": 1,
        "objective.old_logprobs": "learner",
    }
    cfg, trainer = set_up_trainer(tiny_model_dir, tmp_path, **overrides)
    episodes = trainer._runner(2).run(trainer.train_tasks[:2])
    trainer.cleanup()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    results = []
    for precompute in (True, False):
        learner = TorchLearner(load_model(tiny_model_dir), cfg, torch.device("cpu"), 4)
        batch = collate(episodes, advantages, trainer.tokenizer.pad_token_id)
        if precompute:
            batch.old_logprobs, _ = learner.logprobs(batch)
        out = learner.update(batch, zeta=0.05, eps_high=0.28)
        results.append((out, dict(learner.named_weights())))
    (with_pass, weights_a), (shortcut, weights_b) = results
    assert shortcut["loss/total"] == pytest.approx(with_pass["loss/total"], rel=1e-5, abs=1e-7)
    assert shortcut["ratio/mean"] == pytest.approx(1.0, abs=1e-6)
    initial = load_model(tiny_model_dir).state_dict()
    assert any(not torch.equal(weights_a[n], initial[n]) for n in weights_a), "nothing changed"
    for name in weights_a:
        assert torch.allclose(weights_a[name], weights_b[name], atol=1e-6), name


def test_target_entropy_is_measured_before_step_one_without_moving_the_cursor(
    tiny_model_dir, tmp_path
):
    """``objective.target_entropy_tasks``: the controllers' target is the untrained policy's
    mean sampled-token NLL over that many train tasks (an entropy estimate: for the tiny model
    within a few percent of the learner's full-distribution entropy on the same tokens); the
    training cursor does not move, a resumed run does not measure again."""
    from trainer.learner import collate

    overrides = tiny_overrides(
        tiny_model_dir,
        tmp_path,
        **{
            "steps": 1,
            "eval.at_start": False,
            "objective.target_entropy_tasks": 3,
            "objective.repo.smoothing": 0.5,
        },
    )
    cfg = load_config(REPO / "configs" / "quickstart.yaml", overrides)
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    cursor = trainer.cursor.state_dict()
    target = trainer.measure_target_entropy()
    assert trainer.cursor.state_dict() == cursor
    assert trainer.zeta.target == target
    episodes = trainer._rollout(trainer.train_tasks[:3], seed=5)
    _, entropy = trainer.learner.logprobs(
        collate(episodes, torch.zeros(len(episodes)), trainer.tokenizer.pad_token_id)
    )
    mask = collate(episodes, torch.zeros(len(episodes)), 0).loss_mask
    learner_entropy = float((entropy * mask).sum() / mask.sum())
    assert target == pytest.approx(learner_entropy, rel=0.05)
    trainer.cleanup()

    trainer = Trainer(cfg, tmp_path / "run2")
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    (row,) = rows(tmp_path / "run2")
    assert row["entropy/target"] == pytest.approx(target)  # same seed: the same measurement
    assert row["entropy/controlled"] == pytest.approx(row["entropy/mean"])  # first step: raw
    assert row["entropy/initial"] == pytest.approx(row["entropy/mean"])
    assert row["entropy/target"] != row["entropy/initial"]
    # the measurement leaves the RNGs as it found them: step 1 samples what it samples without it
    plain = load_config(
        REPO / "configs" / "quickstart.yaml", [*overrides, "objective.target_entropy_tasks=0"]
    )
    trainer = Trainer(plain, tmp_path / "run3")
    trainer.setup()
    trainer.train()
    trainer.cleanup()
    (unmeasured,) = rows(tmp_path / "run3")
    for key in ("entropy/mean", "reward/mean", "response/tokens_mean", "loss/total"):
        assert unmeasured[key] == row[key], key


def test_demo_trains_then_compares_on_stratified_held_out_tasks(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """`eprl demo` end to end with a tiny model: both evaluations, the summary file and the
    printed table (pass@1, held-out and train entropy before and after)."""
    from trainer.demo import run_demo
    from trainer.tasks import held_out_tasks

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the table's labels in a narrow terminal
    ids = [f"proc/{fam}/L{lvl}/{i}" for fam in ("a", "b") for lvl in (1, 2) for i in range(5)]
    chosen = held_out_tasks(ids, 6)
    assert len(chosen) == 6 and len({t.rpartition("/")[0] for t in chosen}) == 4
    summary = run_demo(
        str(REPO / "configs" / "quickstart.yaml"),
        num_tasks=2,
        k=2,
        overrides=tiny_overrides(
            tiny_model_dir,
            tmp_path,
            steps=1,
            **{"eval.at_start": False, "objective.target_entropy_tasks": 2},
        ),
    )
    run_dir = Path(summary["run_dir"])
    saved = json.loads((run_dir / "demo_summary.json").read_text())
    for side in ("before", "after"):
        assert saved[side]["tasks"] == 2 and 0 <= saved[side]["pass@1"] <= 1
        assert saved[side]["entropy/sampled"] > 0
        assert "entropy/sampled_stopped" in saved[side]
    assert math.isfinite(saved["held_out_entropy_change"])
    # with a measured controller target, the train entropy's start is that target
    (row,) = rows(run_dir)
    assert saved["entropy_start_from"] == "untrained policy (target)"
    assert saved["entropy_start"] == row["entropy/target"] != row["entropy/mean"]
    assert not any("eval/" in key for row in rows(run_dir) for key in row)  # no dev pass at the end
    printed = capsys.readouterr().out
    assert "entropy of sampled tokens (held-out)" in printed and "untrained" in printed
    assert "answers that stop (held-out)" in printed


def test_median_is_the_middle_value_never_the_best_draw():
    from trainer.demo import median

    assert median([0.1, 0.9, 0.3]) == 0.3
    assert median([0.4, 0.1, 0.3, 0.2]) == pytest.approx(0.25)
    assert median([None, math.nan, 0.5]) == 0.5
    assert median([None]) is None


def test_demo_over_seeds_reports_each_seed_and_the_median_and_resumes(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """`eprl demo --seeds 2`: one run folder per seed, each seed's numbers read from its own
    demo summary, their median, a JSON written after every seed, and a rerun that skips the seeds
    it has and refuses other settings."""
    from trainer.demo import SEED_NUMBERS, median, run_seeds

    monkeypatch.setenv("COLUMNS", "200")
    overrides = tiny_overrides(
        tiny_model_dir, tmp_path / "runs", steps=1, **{"eval.at_start": False}
    )
    out = tmp_path / "seeds.json"
    config = str(REPO / "configs" / "quickstart.yaml")
    report = run_seeds(config, [3, 4], out, num_tasks=2, k=2, overrides=overrides)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["seeds"] == [3, 4]
    for seed in (3, 4):
        row = report["per_seed"][str(seed)]
        run_dir = Path(row["run_dir"])
        assert run_dir.name == f"run_s{seed}"
        saved = json.loads((run_dir / "demo_summary.json").read_text())
        assert row["pass@1 trained"] == saved["after"]["pass@1"]
        assert row["held-out entropy change"] == saved["held_out_entropy_change"]
    # different seeds sample different held-out answers
    entropies = [report["per_seed"][s]["held-out entropy change"] for s in ("3", "4")]
    assert entropies[0] != entropies[1]
    for name in SEED_NUMBERS:
        assert report["median"][name] == median([report["per_seed"][s][name] for s in ("3", "4")])
    printed = capsys.readouterr().out
    assert "median" in printed and "seed 3" in printed and "seed 4" in printed

    # a rerun with one more seed runs only that one
    before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    again = run_seeds(config, [3, 4, 5], out, num_tasks=2, k=2, overrides=overrides)
    after = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert sorted(set(after) - set(before)) == ["run_s5"]
    assert again["per_seed"]["3"] == report["per_seed"]["3"]
    with pytest.raises(ValueError, match="other settings"):
        run_seeds(config, [3], out, num_tasks=2, k=1, overrides=overrides)


def test_sampled_entropy_over_all_answers_and_over_those_that_stop(tiny_model_dir):
    """What the demo prints as held-out entropy: the summariser's entropy/sampled and
    entropy/sampled_stopped."""
    from agent.models import load_tokenizer
    from agent.rollout import Episode
    from trainer.evaluation.metrics import summarize_episodes

    tokenizer = load_tokenizer(tiny_model_dir)

    def sampled_entropy(episodes, stopped_only=False):
        key = "entropy/sampled_stopped" if stopped_only else "entropy/sampled"
        return summarize_episodes(episodes, 1, tokenizer)[key]

    def episode(logprobs, reason):
        ep = Episode(task_id="t", group_id=0, seed=0, finish_reasons=[reason])
        ep.append([1, 2], sampled=False)  # the prompt: not counted
        ep.append(list(range(len(logprobs))), sampled=True, logprobs=logprobs)
        return ep

    stopped = episode([-0.1, -0.3], "stop")
    cut = episode([-2.0, -3.0, -4.0], "length")
    assert sampled_entropy([stopped, cut]) == pytest.approx((0.1 + 0.3 + 2 + 3 + 4) / 5)
    assert sampled_entropy([stopped, cut], stopped_only=True) == pytest.approx(0.2)
    assert sampled_entropy([cut], stopped_only=True) is None


def test_resume_with_a_learning_signal_is_bit_for_bit_and_needs_the_optimizer_state(
    tiny_model_dir, tmp_path
):
    """A run on a task the tiny model learns (a real gradient), REPO-R and ADAPO on: 2 steps,
    then a resume to 4, equals 4 steps straight bit for bit (loss, grad norm, zeta, eps_high,
    final weights); resuming without the optimizer state does not (AdamW's moments matter)."""
    model = peaked_copy(tiny_model_dir, tmp_path / "peaked")

    def config(root, steps):
        overrides = tiny_overrides(
            model,
            root,
            **{
                **use_test_env(DigitRewardEnv),
                "steps": steps,
                "rollout.max_new_tokens": 6,
                "trainer.lr": 3e-3,
                "eval.at_start": False,
                "eval.at_end": False,
                "logging.tensorboard": False,
                "objective.repo.variant": "r",
                "objective.adapo.enabled": True,
            },
        )
        return load_config(REPO / "configs" / "quickstart.yaml", overrides)

    def final(run_dir):
        trainer_state = torch.load(
            run_dir / "checkpoints" / "step_4" / "trainer_state.pt", weights_only=False
        )
        from safetensors.torch import load_file

        return trainer_state, load_file(run_dir / "checkpoints" / "step_4" / "model.safetensors")

    run_training(config(tmp_path / "straight", 4), tmp_path / "straight" / "run")
    run_training(config(tmp_path / "resumed", 2), tmp_path / "resumed" / "run")
    run_training(config(tmp_path / "resumed", 4), tmp_path / "resumed" / "run", resume=True)
    straight, resumed = rows(tmp_path / "straight" / "run"), rows(tmp_path / "resumed" / "run")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert any(r["grad/norm"] > 0 for r in straight)  # the check has a gradient to lose
    for a, b in zip(straight, resumed, strict=True):
        for key in ("loss/total", "grad/norm", "repo/zeta", "adapo/eps_high", "reward/mean"):
            assert a[key] == b[key], (a["step"], key)
    (state_a, weights_a), (state_b, weights_b) = (
        final(tmp_path / "straight" / "run"),
        final(tmp_path / "resumed" / "run"),
    )
    assert state_a["zeta"] == state_b["zeta"] and state_a["eps_high"] == state_b["eps_high"]
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)

    # the same resume without the optimizer state: AdamW restarts its moments, the run diverges
    lost = tmp_path / "lost" / "run"
    run_training(config(tmp_path / "lost", 2), lost)
    (lost / "checkpoints" / "step_2" / "learner.pt").unlink()
    run_training(config(tmp_path / "lost", 4), lost, resume=True)
    _, weights_lost = final(lost)
    assert not all(torch.equal(weights_a[k], weights_lost[k]) for k in weights_a)
