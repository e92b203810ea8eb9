"""The RL training loop (`eprl train CONFIG.yaml`).

Lifecycle (torchtune-style): ``setup`` -> ``train`` -> ``save_checkpoint`` (every N steps and at
the end) -> ``cleanup`` (report and plots). One step (:meth:`Trainer.train_step`):

    rollout a batch of groups -> select_episodes (advantages, LOOP and overlong filters) ->
    ``update``: old log-probs -> E epochs of mini-batch updates (REPO shaping / ADAPO eps_high
    inside the objective) -> controllers -> push weights to the policy -> log -> (evaluate on
    the eval split) -> (checkpoint)

Run directory: ``config.yaml`` (resolved), ``metrics.jsonl`` (:mod:`trainer.logger`), TensorBoard
events under ``tb/``, ``checkpoints/step_N/`` (:mod:`trainer.checkpoint`), ``report.md`` and PNG
plots. ``--resume RUN_DIR`` continues from the last complete checkpoint and the same metrics file.
"""

from __future__ import annotations

import json
import math
import random
import time
from datetime import datetime
from pathlib import Path

import torch

from agent.io import atomic_write_text
from agent.progress import ProgressBar
from trainer import checkpoint as ckpt
from trainer.config import RunConfig, load_config, save_config
from trainer.deepspeed_learner import empty_batch
from trainer.distributed import (
    any_rank,
    dist_info,
    gather_objects,
    pick_device,
    reduce_metrics,
    seed_everything,
)
from trainer.episodes import cut_at_cap, rollout_metrics, sampled_nll, select_episodes
from trainer.logger import RunLogger
from trainer.tasks import TaskCursor, make_env_factory, split_task_ids


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
        from agent.backends import build_policy
        from agent.chat import ChatFormat
        from agent.models import load_model, load_tokenizer, resolve_model
        from trainer.learner import apply_lora, build_learner
        from trainer.objectives import EpsHighController, ZetaController

        cfg = self.cfg
        self.device = pick_device(cfg.trainer.device)
        self._zero3 = None
        if cfg.trainer.learner == "deepspeed":
            from trainer.deepspeed_learner import init_distributed, zero3_construction

            init_distributed(self.device, cfg.trainer.deepspeed.timeout_s)
            # ZeRO-3: the model below is built partitioned (zero.Init), never whole on a rank
            self._zero3 = zero3_construction(cfg)
        self.rank, self.world = dist_info()
        self.is_main = self.rank == 0
        if cfg.rollout.tasks_per_step < self.world:
            # each rank rolls out its share of the step's tasks: a rank with none has no batch
            raise ValueError(
                f"rollout.tasks_per_step={cfg.rollout.tasks_per_step} is less than the "
                f"{self.world} ranks: every rank needs at least one task per step; raise it to "
                f"{self.world} or a multiple"
            )
        seed_everything(cfg.seed + self.rank)

        checkpoint = ckpt.latest_checkpoint(self.run_dir) if self.resume else None
        if self.resume and checkpoint is None:
            print(f"eprl: {self.run_dir} has no complete checkpoint; starting from step 0")
        self.resume_from = checkpoint
        weights = str(checkpoint) if checkpoint is not None else cfg.model.name
        self.model_path = resolve_model(weights)
        self.tokenizer = load_tokenizer(weights)
        attention = cfg.model.attn_implementation
        lm = load_model(weights, dtype="float32", device="cpu", attn_implementation=attention)
        if cfg.trainer.lora.enabled:
            lm = apply_lora(lm, cfg.trainer.lora)

        self.make_env = make_env_factory(cfg)
        self.env_defaults = _env_defaults(self.make_env)
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
            load_model(cfg.model.name, dtype="float32", device="cpu", attn_implementation=attention)
            if cfg.objective.kl_coef > 0
            else None
        )
        self.learner = build_learner(lm, cfg, self.device, updates, reference)
        self.chat = ChatFormat(self.tokenizer)
        # hf shares the learner's module (pushing weights costs nothing); vllm loads the weights
        self.policy = build_policy(
            cfg.policy,
            self.learner.lm if cfg.policy.backend == "hf" else self.model_path,
            tokenizer=self.tokenizer,
            seed=cfg.seed + self.rank,
        )

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

    def _runner(self, group_size: int, temperature: float | None = None):
        from agent.rollout import RolloutRunner

        r = self.cfg.rollout
        return RolloutRunner(
            self.policy,
            self.make_env,
            self.chat,
            group_size=group_size,
            env_workers=r.env_workers,
            temperature=temperature,
            progress=False,
            **r.budget(),
        )

    def _rollout(self, tasks: list[str], seed: int) -> list:
        """K episodes per task, at most ``rollout.max_parallel_episodes`` at once. Episode ``j`` of
        task ``g`` gets group id ``g`` and seed ``seed + g * K + j`` however the step is split, so
        an AppWorld step larger than the server pool runs in parts instead of waiting forever."""
        from agent.rollout import parallel_episodes

        r = self.cfg.rollout
        limit = r.max_parallel_episodes or parallel_episodes(
            self.cfg.policy.backend, self.env_defaults["max_parallel_episodes"]
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
        progress = ProgressBar(
            "train",
            cfg.steps,
            completed=self.step,
            fields={"reward": ".3f", "entropy": ".3f", "clip lo": ".3f", "clip hi": ".3f"},
            enabled=cfg.logging.progress and self.is_main,
        )
        with progress:
            if self.step == 0 and cfg.eval.at_start:
                self.logger.log(0, self.evaluate())
            while self.step < cfg.steps:
                self.step += 1
                metrics = self.train_step()
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.steps:
                    metrics.update(self.evaluate())
                if self.step == cfg.steps and cfg.eval.at_end:
                    metrics.update(self.evaluate())
                self.logger.log(self.step, metrics)
                last = metrics
                progress.update(
                    self.step,
                    reward=metrics.get("reward/mean", 0.0),
                    entropy=metrics.get("entropy/mean", float("nan")),  # nan: no update
                    **{
                        "clip lo": metrics.get("clip/low_frac", 0.0),
                        "clip hi": metrics.get("clip/high_frac", 0.0),
                    },
                )
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

    def _target(self) -> float:
        targets = [c.target for c in self._controllers() if c.target is not None]
        return float(targets[0]) if targets else float("nan")

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
        rng = ckpt.rng_state()
        try:
            episodes = self._rollout(tasks[self.rank :: self.world], seed=self.cfg.seed + 271_828)
        finally:
            ckpt.set_rng_state(rng)
        overlong = self.cfg.objective.overlong_filter  # measure what the learner will see
        nll, tokens = sampled_nll([ep for ep in episodes if ep.error is None], overlong)
        sums = reduce_metrics({"nll": nll, "tokens": float(tokens)})
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
        from trainer.learner import MetricAccumulator

        cfg = self.cfg
        tasks = self.cursor.next(cfg.rollout.tasks_per_step)[self.rank :: self.world]
        t0 = time.perf_counter()
        episodes = self._rollout(
            tasks, seed=cfg.seed * 1_000_003 + self.step * 10_007 + self.rank * 101
        )
        rollout_s = time.perf_counter() - t0
        metrics = {**rollout_metrics(episodes), "perf/rollout_s": rollout_s}
        if hasattr(self.policy, "sleep"):
            self.policy.sleep()  # policy.vllm.sleep_mode (CUDA): frees the engine while we learn

        t1 = time.perf_counter()
        chosen = select_episodes(episodes, cfg.objective, cfg.trainer.skip_no_signal)
        metrics.update(chosen.metrics)
        learn = MetricAccumulator()
        # one decision for all ranks: a rank that skipped the update alone would hang the others
        if any_rank(chosen.signal):
            # a rank with nothing kept joins the update's collectives with no rows
            batch = chosen.batch(self.tokenizer.pad_token_id) if chosen.kept else empty_batch()
            self.update(batch, learn)
            metrics["train/no_signal"] = 0.0
        else:
            metrics["train/no_signal"] = 1.0
        learn_s = time.perf_counter() - t1
        tokens = sum(len(ep.token_ids) for ep in chosen.valid)
        metrics.update(
            {
                "perf/learn_s": learn_s,
                "perf/tokens_per_s": tokens / max(rollout_s + learn_s, 1e-9),
                "nonfinite/total": float(self.nonfinite_total),
            }
        )
        metrics = reduce_metrics(metrics)
        # the learner's per-token means over all ranks' tokens (a rank without any counts 0)
        metrics.update(reduce_metrics(learn.result(), weight=learn.weight))
        if "entropy/mean" in metrics:
            entropy = metrics["entropy/mean"]
            if self.initial_entropy is None:
                self.initial_entropy = entropy
            for controller in self._controllers():
                controller.step(entropy)
        metrics["entropy/initial"] = (
            self.initial_entropy if self.initial_entropy is not None else float("nan")
        )
        metrics["entropy/target"] = self._target()
        controlled = [c.controlled for c in self._controllers() if c.controlled is not None]
        if controlled:
            metrics["entropy/controlled"] = float(controlled[0])
        if cfg.policy.backend != "hf":
            self.policy.update_weights(self.learner.named_weights())
        return metrics

    def update(self, batch, learn) -> None:
        """``trainer.epochs`` passes of ``trainer.mini_batches`` optimizer steps over ``batch``."""
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
                if len(part) == 0 and self.world == 1:
                    continue  # ranks > 1 step together, an empty part included
                out = self.learner.update(batch.rows(part), zeta, eps_high)
                if out.pop("nonfinite"):
                    self.nonfinite_in_a_row += 1
                    self.nonfinite_total += 1
                else:
                    self.nonfinite_in_a_row = 0
                learn.add(out, float(batch.rows(part).loss_mask.sum()))

    def evaluate(self) -> dict[str, float]:
        """pass@1 / pass@k on the eval split at ``eval.temperature``, sharded over the ranks:
        rank r runs tasks r::world with its own policy (no rank idles inside the group's
        timeout), the per-task records are gathered and rank 0 summarises them. Sampling seeds
        depend on the rank, so the numbers depend (within noise) on the number of ranks."""
        from trainer.evaluation.intervals import Bootstrap, score_intervals
        from trainer.evaluation.metrics import records_of_episodes, summarize_tasks
        from trainer.evaluation.runner import evaluate_policy

        cfg = self.cfg
        share = self.eval_tasks[self.rank :: self.world]
        records = []
        if share:
            _, episodes = evaluate_policy(
                self.policy,
                self.make_env,
                self.chat,
                share,
                cfg.eval.k,
                temperature=cfg.eval.temperature,
                seed=cfg.seed + 99_991 + self.rank * 7_919,
                **cfg.rollout.budget(),
            )
            records = records_of_episodes(episodes, self.chat.tokenizer)
        records = [record for part in gather_objects(records) for record in part]
        if not self.is_main:
            return {}
        summary = summarize_tasks(records, cfg.eval.k)
        bounds = score_intervals(records, cfg.eval.k, Bootstrap())
        split = cfg.eval.split
        # the per-task records too, so that runs can be compared task by task afterwards (the
        # entropy study's paired intervals): evals/<split>_step<N>.json, written atomically
        atomic_write_text(
            self.run_dir / "evals" / f"{split}_step{self.step:05d}.json",
            json.dumps({"split": split, "step": self.step, "k": cfg.eval.k, "records": records}),
        )
        out: dict[str, float] = {}
        # a score with nothing to rest on (every episode errored; no task with k clean samples)
        # is logged as NaN, which the report and TensorBoard skip; each carries its 95% bootstrap
        # interval (..._lo, ..._hi) and the number of tasks it rests on (..._tasks)
        for name, key in (
            ("pass@1", "pass@1"),
            ("pass@k", f"pass@{cfg.eval.k}"),
            ("reward", "reward/mean"),
        ):
            value, interval = summary[key], bounds["intervals"].get(key)
            out[f"eval/{split}/{name}"] = math.nan if value is None else value
            out[f"eval/{split}/{name}_lo"] = interval[0] if interval else math.nan
            out[f"eval/{split}/{name}_hi"] = interval[1] if interval else math.nan
            out[f"eval/{split}/{name}_tasks"] = float(bounds["counts"].get(key, {}).get("tasks", 0))
        return out

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(
            self.run_dir,
            self.step,
            learner=self.learner,
            tokenizer=self.tokenizer,
            trainer_state=self._trainer_state(),
            save_optimizer=self.cfg.checkpoint.save_optimizer,
            keep_last=self.cfg.checkpoint.keep_last,
            is_main=self.is_main,
            max_shard_gb=self.cfg.checkpoint.max_shard_gb,
        )

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "cursor": self.cursor.state_dict(),
            "zeta": self.zeta.state_dict(),
            "eps_high": self.eps.state_dict() if self.eps is not None else None,
            "initial_entropy": self.initial_entropy,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            "rng": ckpt.rng_state(),
        }

    def _restore(self, checkpoint: Path) -> None:
        state = ckpt.load_trainer_state(checkpoint)
        self.step = int(state["step"])
        self.cursor.load_state_dict(state["cursor"])
        self.zeta.load_state_dict(state["zeta"])
        if self.eps is not None and state["eps_high"] is not None:
            self.eps.load_state_dict(state["eps_high"])
        self.initial_entropy = state["initial_entropy"]
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.nonfinite_total = state["nonfinite_total"]
        ckpt.set_rng_state(state["rng"])
        if ckpt.has_learner_state(checkpoint):
            self.learner.load_state(checkpoint)

    # ---------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        self.logger.close()
        if self.is_main:
            from trainer.report import write_report

            write_report(self.run_dir)


def _env_defaults(make_env) -> dict:
    from envs.defaults import env_defaults

    env = make_env()
    try:
        return env_defaults(env)
    finally:
        env.close()


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
    if ckpt.latest_checkpoint(run_dir) is not None:
        raise ValueError(
            f"run directory {str(run_dir)!r} already holds checkpoints: pass --resume {run_dir}"
        )
    run_training(cfg, run_dir)
    print(f"eprl: run written to {run_dir}")
    return run_dir
