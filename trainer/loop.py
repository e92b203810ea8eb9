"""The RL training loop (`eprl train CONFIG.yaml`).

Lifecycle (torchtune-style): ``setup`` -> ``train`` -> ``save_checkpoint`` (every N steps and at
the end) -> ``cleanup`` (report and plots). One step:

    rollout a batch of groups -> advantages (+ LOOP filter) -> old log-probs -> E epochs of
    mini-batch updates (REPO shaping / ADAPO eps_high inside the objective) -> controllers ->
    push weights to the policy -> log -> (evaluate on the eval split) -> (checkpoint)

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl`` (one object per step, key
``step``), TensorBoard events under ``tb/``, ``checkpoints/step_N/`` (HF safetensors + tokenizer
+ trainer state), ``report.md`` and PNG plots. Checkpoints are written to a temporary folder and
renamed, so a run killed at any moment (SIGKILL included) resumes from its last complete
checkpoint with ``--resume RUN_DIR``, continuing the same metrics file.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from trainer.config import RunConfig, load_config, save_config

_STEP_DIR = re.compile(r"^step_(\d+)$")


def pick_device(choice: str) -> torch.device:
    """cpu, or this rank's GPU (LOCAL_RANK, set by the deepspeed launcher and torchrun)."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is available")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def make_env_factory(cfg: RunConfig, extra_kwargs: dict | None = None):
    """A callable returning a fresh environment: local, or remote when ``env.urls`` is set."""
    import gymnasium

    import envs  # noqa: F401  (registers the ids)

    kwargs = {**cfg.env.kwargs, **(extra_kwargs or {})}
    if cfg.env.urls:
        token = os.environ.get(cfg.env.token_env)
        urls = list(cfg.env.urls)
        return lambda: gymnasium.make(
            "eprl/Remote-v0", url=urls, env_id=cfg.env.id, env_kwargs=kwargs, token=token
        )
    return lambda: gymnasium.make(cfg.env.id, **kwargs)


def split_task_ids(make_env, split: str) -> list[str]:
    env = make_env()
    try:
        return list(env.unwrapped.task_ids(split))
    finally:
        env.close()


class TaskCursor:
    """Draws tasks from a split in seeded random order, epoch after epoch; its state (epoch,
    position) is saved with each checkpoint so a resumed run sees the same tasks."""

    def __init__(self, task_ids: list[str], seed: int) -> None:
        if not task_ids:
            raise ValueError("the training split has no tasks")
        self.task_ids = task_ids
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[str]:
        order = list(self.task_ids)
        random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            order = self._order()
            take = order[self.position : self.position + n - len(out)]
            out.extend(take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class RunLogger:
    """metrics.jsonl (+ TensorBoard, + W&B when enabled) with the design.md metric names."""

    def __init__(
        self, cfg: RunConfig, run_dir: Path, resume_step: int | None, enabled: bool
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # steps after the checkpoint are redone: drop their rows, keep the file
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(run_dir / "tb"), purge_step=(resume_step + 1) if resume_step else None
            )
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=run_dir.name,
                config=cfg.model_dump(mode="json"),
                resume="allow",
                id=run_dir.name,
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    ]
    return max(steps)[1] if steps else None


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


def _any_rank(flag: bool) -> bool:
    """``flag`` or-ed over the data-parallel ranks (itself in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([float(flag)])
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _reduce_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Average metrics over data-parallel ranks (maxima for */max)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return metrics
    world = torch.distributed.get_world_size()
    if world == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    maxima = values.clone()
    torch.distributed.all_reduce(values)
    torch.distributed.all_reduce(maxima, op=torch.distributed.ReduceOp.MAX)
    return {
        k: float(maxima[i] if k.endswith("/max") else values[i] / world) for i, k in enumerate(keys)
    }


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.resume = resume
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.initial_entropy: float | None = None

    # ---------------------------------------------------------------- setup
    def setup(self) -> None:
        from agent.chat import ChatFormat
        from agent.models import load_model, load_tokenizer, resolve_model
        from trainer.advantages import compute_advantages  # noqa: F401  (fail early on import)
        from trainer.objectives import EpsHighController, ZetaController

        cfg = self.cfg
        self.device = pick_device(cfg.trainer.device)
        if cfg.trainer.learner == "deepspeed":
            from trainer.deepspeed_learner import init_distributed

            init_distributed(self.device)
        self.rank, self.world = dist_info()
        self.is_main = self.rank == 0
        _seed_everything(cfg.seed + self.rank)

        checkpoint = latest_checkpoint(self.run_dir) if self.resume else None
        if self.resume and checkpoint is None:
            print(f"eprl: {self.run_dir} has no complete checkpoint; starting from step 0")
        self.resume_from = checkpoint
        weights = str(checkpoint) if checkpoint is not None else cfg.model.name
        self.model_path = resolve_model(weights)
        self.tokenizer = load_tokenizer(weights)
        lm = load_model(weights, dtype="float32", device="cpu")
        if cfg.trainer.lora.enabled:
            lm = _apply_lora(lm, cfg)

        self.make_env = make_env_factory(cfg)
        self.train_tasks = split_task_ids(self.make_env, cfg.env.train_split)
        self.eval_tasks = split_task_ids(self.make_env, cfg.eval.split)
        overlap = set(self.train_tasks) & set(self.eval_tasks)
        if overlap:
            raise ValueError(
                f"env.train_split={cfg.env.train_split!r} and eval.split={cfg.eval.split!r} share "
                f"{len(overlap)} tasks (e.g. {sorted(overlap)[0]!r}); the evaluation split must be held out"
            )
        if cfg.eval.num_tasks:
            self.eval_tasks = self.eval_tasks[: cfg.eval.num_tasks]
        self.cursor = TaskCursor(self.train_tasks, cfg.seed)

        updates = cfg.steps * cfg.trainer.epochs * cfg.trainer.mini_batches
        # objective.kl_coef's reference is the initial model, also when resuming a checkpoint
        reference = (
            load_model(cfg.model.name, dtype="float32", device="cpu")
            if cfg.objective.kl_coef > 0
            else None
        )
        if cfg.trainer.learner == "deepspeed":
            from trainer.deepspeed_learner import DeepSpeedLearner

            self.learner = DeepSpeedLearner(lm, cfg, self.device, updates, reference)
        else:
            from trainer.learner import TorchLearner

            self.learner = TorchLearner(lm, cfg, self.device, updates, reference)
        self.chat = ChatFormat(self.tokenizer)
        self.policy = self._make_policy()

        self.zeta = ZetaController(cfg.objective.repo)
        # ADAPO's controller exists only when enabled (its bounds need not contain eps_high otherwise)
        self.eps = (
            EpsHighController(cfg.objective.adapo, cfg.objective.eps_low, cfg.objective.eps_high)
            if cfg.objective.adapo.enabled
            else None
        )

        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        if checkpoint is not None:
            self._restore(checkpoint)
        self.logger = RunLogger(cfg, self.run_dir, self.step if checkpoint else None, self.is_main)

    def _make_policy(self):
        cfg = self.cfg
        if cfg.policy.backend == "hf":
            from agent.policy import HFPolicy

            # the policy shares the learner's parameters: pushing weights costs nothing
            return HFPolicy(
                self.learner.lm,
                self.tokenizer,
                cfg.policy.temperature,
                cfg.policy.top_p,
                seed=cfg.seed,
            )
        if cfg.policy.backend == "vllm":
            from agent.vllm_policy import VLLMPolicy

            v = cfg.policy.vllm
            return VLLMPolicy(
                self.model_path,
                cfg.policy.temperature,
                cfg.policy.top_p,
                dtype=v.dtype,
                max_model_len=v.max_model_len,
                tensor_parallel_size=v.tensor_parallel_size,
                gpu_memory_utilization=v.gpu_memory_utilization,
                enforce_eager=v.enforce_eager,
                fp32_head=v.fp32_head,
                seed=cfg.seed + self.rank,
            )
        raise ValueError(
            f"policy.backend={cfg.policy.backend!r} cannot be trained (it is for evaluation); use hf or vllm"
        )

    def _runner(self, group_size: int):
        from agent.rollout import RolloutRunner

        r = self.cfg.rollout
        return RolloutRunner(
            self.policy,
            self.make_env,
            self.chat,
            group_size=group_size,
            max_turns=r.max_turns,
            max_new_tokens=r.max_new_tokens,
            max_context_tokens=r.max_context_tokens,
            stop=r.stop,
            env_workers=r.env_workers,
            progress=False,
        )

    def _rollout(self, tasks: list[str], seed: int) -> list:
        """K episodes per task, at most ``rollout.max_parallel_episodes`` at once. Episode ``j`` of
        task ``g`` gets group id ``g`` and seed ``seed + g * K + j`` however the step is split, so
        an AppWorld step larger than the server pool runs in parts instead of waiting forever."""
        from trainer.evaluate import batch_episodes

        r = self.cfg.rollout
        limit = r.max_parallel_episodes or batch_episodes(
            self.cfg.policy.backend, self.cfg.env.id, self.cfg.env.kwargs
        )
        if len(tasks) * r.group_size <= limit:
            return self._runner(r.group_size).run(tasks, seed=seed)
        samples = [(g, task) for g, task in enumerate(tasks) for _ in range(r.group_size)]
        runner = self._runner(1)
        episodes = []
        for first in range(0, len(samples), limit):
            part = samples[first : first + limit]
            ran = runner.run([task for _, task in part], seed=seed + first)
            for (g, _), episode in zip(part, ran, strict=True):
                episode.group_id = g
            episodes.extend(ran)
        return episodes

    # ---------------------------------------------------------------- train
    def train(self) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        if self.step == 0 and cfg.objective.target_entropy_tasks and self._needs_target():
            self.measure_target_entropy()
        progress = _TrainProgress(cfg.logging.progress and self.is_main, cfg.steps, self.step)
        with progress:
            if self.step == 0 and cfg.eval.at_start:
                self._log(0, self.evaluate())
            while self.step < cfg.steps:
                self.step += 1
                metrics = self.train_step()
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.steps:
                    metrics.update(self.evaluate())
                if self.step == cfg.steps and cfg.eval.at_end:
                    metrics.update(self.evaluate())
                self._log(self.step, metrics)
                last = metrics
                progress.update(self.step, metrics)
                if self.step % cfg.checkpoint.every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
                if self.nonfinite_in_a_row >= cfg.trainer.max_nonfinite_in_a_row:
                    raise RuntimeError(
                        f"stopping: {self.nonfinite_in_a_row} steps in a row had a non-finite loss or "
                        f"gradient (trainer.max_nonfinite_in_a_row={cfg.trainer.max_nonfinite_in_a_row}); "
                        f"try a lower trainer.lr (now {cfg.trainer.lr})"
                    )
        return last

    def _controllers(self) -> list:
        out = [self.zeta] if self.cfg.objective.repo.variant != "none" else []
        return out + ([self.eps] if self.eps is not None else [])

    def _needs_target(self) -> bool:
        return any(c.target is None for c in self._controllers())

    def measure_target_entropy(self) -> float:
        """Set the entropy controllers' unset targets to the untrained policy's entropy on
        ``objective.target_entropy_tasks`` train tasks x ``rollout.group_size`` samples (no
        update; the training cursor does not move). The estimate is the mean negative log-prob
        of the sampled tokens, whose expectation is the per-token entropy the learner reports
        as ``entropy/mean``; from ~10x the samples of one batch, so the controllers do not
        regulate toward one batch's noise. With ``objective.overlong_filter`` the episodes cut
        at the token cap are left out, as they are left out of the learner's batches."""
        n = min(self.cfg.objective.target_entropy_tasks, len(self.train_tasks))
        tasks = random.Random(self.cfg.seed * 7919 + 17).sample(self.train_tasks, n)
        # sampling draws from the global RNGs: restore them, so that training samples exactly
        # what a run without the measurement samples (the study compares methods on one seed)
        rng = _rng_state()
        try:
            episodes = self._rollout(tasks[self.rank :: self.world], seed=self.cfg.seed + 271_828)
        finally:
            _set_rng_state(rng)
        overlong = self.cfg.objective.overlong_filter  # measure what the learner will see
        nll, tokens = sampled_nll([ep for ep in episodes if ep.error is None], overlong)
        sums = _reduce_metrics({"nll": nll, "tokens": float(tokens)})
        if sums["tokens"] == 0:
            cut = sum(cut_at_cap(ep) for ep in episodes) if overlong else 0
            why = (
                f" ({cut} cut at the token cap, left out by objective.overlong_filter)"
                if cut
                else ""
            )
            raise RuntimeError(
                f"measuring the target entropy: no sampled tokens in {len(episodes)} episodes{why}"
            )
        target = sums["nll"] / sums["tokens"]
        for controller in self._controllers():
            if controller.target is None:
                controller.target = target
        if self.is_main:
            print(
                f"eprl: target entropy {target:.3f} (untrained policy, {n} train tasks x "
                f"{self.cfg.rollout.group_size} samples, {int(sums['tokens'] * self.world)} tokens)"
            )
        return target

    def train_step(self) -> dict[str, float]:
        from trainer.advantages import compute_advantages, loop_keep_mask
        from trainer.learner import MetricAccumulator, collate
        from trainer.objectives import has_learning_signal

        cfg = self.cfg
        tasks = self.cursor.next(cfg.rollout.tasks_per_step)[self.rank :: self.world]
        t0 = time.perf_counter()
        episodes = self._rollout(
            tasks, seed=cfg.seed * 1_000_003 + self.step * 10_007 + self.rank * 101
        )
        rollout_s = time.perf_counter() - t0

        valid = [ep for ep in episodes if ep.error is None and ep.num_sampled_tokens > 0]
        metrics: dict[str, float] = {
            "reward/mean": _mean([ep.reward for ep in episodes]),
            "success/rate": _mean([float(ep.success) for ep in episodes]),
            "episodes/errors": float(len(episodes) - len(valid)),
            "response/tokens_mean": _mean([ep.num_sampled_tokens for ep in valid]),
            "response/stopped_frac": _mean(
                [float(not cut_at_cap(ep)) for ep in valid if ep.finish_reasons]
            ),
            "perf/rollout_s": rollout_s,
        }
        t1 = time.perf_counter()
        learn = MetricAccumulator()
        if valid:
            rewards = torch.tensor([ep.reward for ep in valid])
            groups = torch.tensor([ep.group_id for ep in valid])
            advantages = compute_advantages(cfg.objective.advantage, rewards, groups)
            keep = (
                loop_keep_mask(advantages, cfg.objective.adv_filter_threshold)
                if cfg.objective.adv_filter_threshold > 0
                else torch.ones_like(advantages, dtype=torch.bool)
            )
            if cfg.objective.overlong_filter:
                cut = torch.tensor([cut_at_cap(ep) for ep in valid])
                metrics["episodes/overlong"] = float(cut.sum())
                keep &= ~cut
            kept = [ep for ep, k in zip(valid, keep.tolist(), strict=True) if k]
            metrics["episodes/kept"] = float(len(kept))
            signal = bool(kept) and (
                not cfg.trainer.skip_no_signal
                or has_learning_signal(advantages[keep], cfg.objective)
            )
        else:
            kept, signal = [], False
        # one decision for all ranks: a rank that skipped the update alone would hang the others
        if _any_rank(signal):
            pad = self.tokenizer.pad_token_id
            # a rank with nothing kept while others learn takes part at zero advantage
            batch = (
                collate(kept, advantages[keep], pad)
                if kept
                else collate(valid, torch.zeros(len(valid)), pad)
            )
            self._update(batch, learn)
            metrics["train/no_signal"] = 0.0
        else:
            metrics["train/no_signal"] = 1.0
        metrics.update(learn.result())
        learn_s = time.perf_counter() - t1
        tokens = sum(len(ep.token_ids) for ep in valid)
        metrics.update(
            {
                "perf/learn_s": learn_s,
                "perf/tokens_per_s": tokens / max(rollout_s + learn_s, 1e-9),
                "nonfinite/total": float(self.nonfinite_total),
            }
        )
        metrics = _reduce_metrics(metrics)
        if "entropy/mean" in metrics:
            entropy = metrics["entropy/mean"]
            if self.initial_entropy is None:
                self.initial_entropy = entropy
            for controller in self._controllers():
                controller.step(entropy)
        metrics["entropy/initial"] = (
            self.initial_entropy if self.initial_entropy is not None else float("nan")
        )
        metrics["entropy/target"] = _target(self)
        controlled = [c.controlled for c in self._controllers() if c.controlled is not None]
        if controlled:
            metrics["entropy/controlled"] = float(controlled[0])
        if cfg.policy.backend != "hf":
            self.policy.update_weights(self.learner.named_weights())
        return metrics

    def _update(self, batch, learn) -> None:
        cfg = self.cfg
        if (
            cfg.objective.old_logprobs == "learner"
            and cfg.trainer.epochs * cfg.trainer.mini_batches > 1
        ):
            # several updates per batch: the later ones are off-policy and need the log-probs of
            # the weights before the first; a single update reads them off its own forward
            batch.old_logprobs, _ = self.learner.logprobs(batch)
        zeta = self.zeta.zeta if cfg.objective.repo.variant != "none" else 0.0
        eps_high = self.eps.eps_high if self.eps is not None else cfg.objective.eps_high
        generator = torch.Generator().manual_seed(cfg.seed * 31 + self.step)
        for _epoch in range(cfg.trainer.epochs):
            order = torch.randperm(len(batch), generator=generator)
            for part in torch.tensor_split(order, cfg.trainer.mini_batches):
                if len(part) == 0:
                    continue
                out = self.learner.update(batch.rows(part), zeta, eps_high)
                if out.pop("nonfinite"):
                    self.nonfinite_in_a_row += 1
                    self.nonfinite_total += 1
                else:
                    self.nonfinite_in_a_row = 0
                learn.add(out, float(batch.rows(part).loss_mask.sum()))

    def evaluate(self) -> dict[str, float]:
        """pass@1 / pass@k on the eval split (rank 0; other ranks wait)."""
        from trainer.evaluate import evaluate_policy

        cfg = self.cfg
        out: dict[str, float] = {}
        if self.is_main:
            saved = getattr(self.policy, "temperature", None)
            if saved is not None:
                self.policy.temperature = cfg.eval.temperature
            try:
                summary, _ = evaluate_policy(
                    self.policy,
                    self.make_env,
                    self.chat,
                    self.eval_tasks,
                    cfg.eval.k,
                    max_turns=cfg.rollout.max_turns,
                    max_new_tokens=cfg.rollout.max_new_tokens,
                    max_context_tokens=cfg.rollout.max_context_tokens,
                    stop=cfg.rollout.stop,
                    seed=cfg.seed + 99_991,
                )
            finally:
                if saved is not None:
                    self.policy.temperature = saved
            split = cfg.eval.split
            out = {
                f"eval/{split}/pass@1": summary["pass@1"],
                f"eval/{split}/pass@k": summary[f"pass@{cfg.eval.k}"],
                f"eval/{split}/reward": summary["reward/mean"],
            }
        if self.world > 1:
            torch.distributed.barrier()
        return out

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        self.logger.log(step, metrics)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write checkpoints/step_N atomically: a temporary folder renamed when complete."""
        folder = self.run_dir / "checkpoints"
        final = folder / f"step_{self.step}"
        tmp = folder / f".tmp_step_{self.step}"
        weights = dict(self.learner.named_weights())
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            self.learner.lm.save_pretrained(
                tmp, state_dict=_unwrap_lora(self.learner.lm, weights), safe_serialization=True
            )
            self.tokenizer.save_pretrained(tmp)
            torch.save(self._trainer_state(), tmp / "trainer_state.pt")
        if self.world > 1:
            torch.distributed.barrier()
        if self.cfg.checkpoint.save_optimizer:
            self.learner.save_state(tmp)
        if self.world > 1:
            torch.distributed.barrier()
        if self.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(folder)
            self._prune(folder)
        if self.world > 1:
            torch.distributed.barrier()
        return final

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "cursor": self.cursor.state_dict(),
            "zeta": self.zeta.state_dict(),
            "eps_high": self.eps.state_dict() if self.eps is not None else None,
            "initial_entropy": self.initial_entropy,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            "rng": _rng_state(),
        }

    def _restore(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        self.step = int(state["step"])
        self.cursor.load_state_dict(state["cursor"])
        self.zeta.load_state_dict(state["zeta"])
        if self.eps is not None and state["eps_high"] is not None:
            self.eps.load_state_dict(state["eps_high"])
        self.initial_entropy = state["initial_entropy"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.nonfinite_total = state["nonfinite_total"]
        _set_rng_state(state["rng"])
        if (checkpoint / "learner.pt").exists() or (checkpoint / "deepspeed").exists():
            self.learner.load_state(checkpoint)

    def _prune(self, folder: Path) -> None:
        steps = sorted(
            (int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name))
        )
        for _, path in steps[: -self.cfg.checkpoint.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        self.logger.close()
        if self.is_main:
            from trainer.report import write_report

            write_report(self.run_dir)


def _target(trainer: Trainer) -> float:
    targets = [c.target for c in trainer._controllers() if c.target is not None]
    return float(targets[0]) if targets else float("nan")


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values)) if values else 0.0


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _apply_lora(lm, cfg: RunConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("trainer.lora.enabled needs peft: pip install -e .[lora]") from exc
    lora = cfg.trainer.lora
    return get_peft_model(
        lm,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        ),
    )


def _unwrap_lora(lm, weights: dict):
    """With LoRA, checkpoints hold merged full weights so transformers and vLLM load them as-is."""
    if hasattr(lm, "merge_and_unload"):
        import copy

        return copy.deepcopy(lm).merge_and_unload().state_dict()
    return weights


class _TrainProgress:
    """A rich progress bar: step, reward, entropy, clip fractions and ETA."""

    def __init__(self, enabled: bool, total: int, start: int) -> None:
        self.enabled, self.total, self.start = enabled, total, start
        self.progress = None

    def __enter__(self) -> _TrainProgress:
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "reward {task.fields[reward]:.3f}  entropy {task.fields[entropy]:.3f}  "
                    "clip lo/hi {task.fields[clip_low]:.3f}/{task.fields[clip_high]:.3f}"
                ),
                TimeRemainingColumn(),
            )
            self.progress.start()
            self.task = self.progress.add_task(
                "train",
                total=self.total,
                completed=self.start,
                reward=0.0,
                entropy=0.0,
                clip_low=0.0,
                clip_high=0.0,
            )
        return self

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=step,
                reward=metrics.get("reward/mean", 0.0),
                entropy=metrics.get("entropy/mean", float("nan")),  # nan: no update
                clip_low=metrics.get("clip/low_frac", 0.0),
                clip_high=metrics.get("clip/high_frac", 0.0),
            )

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


def new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.logging.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(cfg.logging.runs_root) / name


def run_training(cfg: RunConfig, run_dir: Path, resume: bool = False) -> Trainer:
    trainer = Trainer(cfg, run_dir, resume=resume)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


def train_from_cli(config: str | None, overrides: list[str], resume: str | None) -> Path:
    """`eprl train`: a new run from CONFIG (+ overrides), or ``--resume RUN_DIR``."""
    if resume is not None:
        run_dir = Path(resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ValueError(
                f"--resume {resume!r}: no config.yaml in that directory (not a run directory)"
            )
        cfg = load_config(saved, overrides)
        run_training(cfg, run_dir, resume=True)
        return run_dir
    cfg = load_config(config, overrides)
    run_dir = new_run_dir(cfg)
    if latest_checkpoint(run_dir) is not None:
        raise ValueError(
            f"run directory {str(run_dir)!r} already holds checkpoints: pass --resume {run_dir}"
        )
    run_training(cfg, run_dir)
    print(f"eprl: run written to {run_dir}")
    return run_dir
