"""Multi-turn rollouts: many episodes at once, generation batched across all live episodes.

A group is K episodes of the same task. Each episode is one growing token list (token-in /
token-out, see ``agent.chat``): the prompt, then per turn the sampled ids (``loss_mask`` 1,
with the sampler's log-probs) and the observation delta (``loss_mask`` 0). Environments step
concurrently in a thread pool while the policy waits; a failing environment ends only its own
episode (marked ``error``), never the rollout.

Limits: turns (``max_turns``), tokens per turn (``max_new_tokens``) and context length
(``max_context_tokens``). An episode that would overflow its context is ended before the next
turn and marked ``truncated`` with reason ``context_limit`` — never silently cut.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.chat import ChatFormat
from agent.config import DEFAULT_STOP
from agent.io import atomic_write_text
from agent.policy import Policy
from agent.progress import ProgressBar


@dataclass
class Episode:
    """One trajectory. ``token_ids``, ``loss_mask`` and ``sampler_logprobs`` are aligned;
    ``turns`` holds the [start, end) span of each sampled turn in ``token_ids``."""

    task_id: str
    group_id: int
    seed: int
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    sampler_logprobs: list[float] = field(default_factory=list)
    prompt_len: int = 0
    turns: list[tuple[int, int]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    reward: float = 0.0
    success: bool = False
    terminated: bool = False
    truncated: bool = False
    truncation_reason: str | None = None
    error: str | None = None
    info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=lambda: {"generate_s": 0.0, "env_s": 0.0})

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated or self.error is not None

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    @property
    def num_sampled_tokens(self) -> int:
        return sum(self.loss_mask)

    def append(
        self, ids: Sequence[int], sampled: bool, logprobs: Sequence[float] | None = None
    ) -> None:
        start = len(self.token_ids)
        self.token_ids.extend(ids)
        self.loss_mask.extend([1 if sampled else 0] * len(ids))
        self.sampler_logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        if sampled:
            self.turns.append((start, len(self.token_ids)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Episode:
        data = dict(data)
        data["turns"] = [tuple(span) for span in data.get("turns", [])]
        return cls(**data)


def write_jsonl(path: str | os.PathLike[str], episodes: Iterable[Episode]) -> None:
    """Write episodes, one JSON object per line, atomically (tmp file + rename)."""
    atomic_write_text(path, "".join(json.dumps(ep.to_dict()) + "\n" for ep in episodes))


def read_jsonl(path: str | os.PathLike[str]) -> list[Episode]:
    with Path(path).open() as handle:
        return [Episode.from_dict(json.loads(line)) for line in handle if line.strip()]


def parallel_episodes(backend: str, env_limit: int | None) -> int:
    """Episodes rolled out at once: 32 for hf (its generation batch), 256 for the serving
    backends, and no more than the environment's own limit (``defaults["max_parallel_episodes"]``:
    an AppWorld episode holds a server from reset to end). ``$EPRL_EVAL_BATCH_EPISODES``
    overrides it."""
    raw = os.environ.get("EPRL_EVAL_BATCH_EPISODES")
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"EPRL_EVAL_BATCH_EPISODES must be a positive integer, got {raw!r}")
        return int(raw)
    episodes = 32 if backend == "hf" else 256
    return min(episodes, int(env_limit)) if env_limit else episodes


@dataclass
class RolloutStats:
    episodes: int
    turns: int
    sampled_tokens: int
    generate_s: float
    env_s: float
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.sampled_tokens / self.wall_s if self.wall_s > 0 else 0.0


class RolloutRunner:
    """Runs groups of episodes of ``make_env()`` environments with one policy.

    ``make_env`` returns a fresh Gymnasium environment (local or ``eprl/Remote-v0``) following
    the eprl contract: text observations, text actions, reward paid at the end.
    """

    def __init__(
        self,
        policy: Policy,
        make_env: Callable[[], object],
        chat: ChatFormat,
        *,
        group_size: int = 4,
        max_turns: int = 1,
        max_new_tokens: int = 96,
        max_context_tokens: int = 2048,
        stop: Sequence[str] = DEFAULT_STOP,
        env_workers: int = 8,
        temperature: float | None = None,
        progress: bool = False,
    ) -> None:
        """``temperature`` (None: the policy's own) is passed to every ``generate`` call, so an
        evaluation samples at its temperature without changing the policy object."""
        for name, value in (
            ("group_size", group_size),
            ("max_turns", max_turns),
            ("max_new_tokens", max_new_tokens),
            ("env_workers", env_workers),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_context_tokens <= max_new_tokens:
            raise ValueError(
                f"max_context_tokens ({max_context_tokens}) must exceed max_new_tokens ({max_new_tokens})"
            )
        self.policy = policy
        self.make_env = make_env
        self.chat = chat
        self.group_size = group_size
        self.max_turns = max_turns
        self.max_new_tokens = max_new_tokens
        self.max_context_tokens = max_context_tokens
        self.stop = list(stop)
        self.env_workers = env_workers
        self.temperature = temperature
        self.progress = progress
        self.last_stats: RolloutStats | None = None

    def run(self, task_ids: Sequence[str], seed: int = 0) -> list[Episode]:
        """K episodes per task; episode i of the batch resets with seed ``seed + i``."""
        episodes = [
            Episode(task_id=task, group_id=g, seed=seed + g * self.group_size + k)
            for g, task in enumerate(task_ids)
            for k in range(self.group_size)
        ]
        envs: list[object | None] = [None] * len(episodes)
        started = time.perf_counter()
        with (
            ThreadPoolExecutor(self.env_workers) as pool,
            ProgressBar(
                "rollout",
                len(episodes),
                unit="episodes",
                fields={"turns": ".0f", "tok/s": ".0f"},
                enabled=self.progress,
                transient=True,
            ) as bar,
        ):
            try:
                list(pool.map(lambda i: self._reset(i, episodes[i], envs), range(len(episodes))))
                turn = 0
                while True:
                    live = [i for i, ep in enumerate(episodes) if not ep.done]
                    if not live:
                        break
                    if turn >= self.max_turns:
                        for i in live:
                            self._truncate(episodes[i], "max_turns", envs[i])
                        break
                    live = [i for i in live if self._fits_context(episodes[i], envs[i])]
                    if not live:
                        continue
                    t0 = time.perf_counter()
                    generations = self.policy.generate(
                        [episodes[i].token_ids for i in live],
                        self.max_new_tokens,
                        self.stop,
                        temperature=self.temperature,
                    )
                    gen_s = time.perf_counter() - t0
                    for i, gen in zip(live, generations, strict=True):
                        episodes[i].append(gen.token_ids, sampled=True, logprobs=gen.logprobs)
                        episodes[i].finish_reasons.append(gen.finish_reason)
                        episodes[i].timings["generate_s"] += gen_s / len(live)
                    list(pool.map(lambda i: self._step(episodes[i], envs[i]), live))
                    turn += 1
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.update(
                        sum(ep.done for ep in episodes),
                        turns=sum(ep.num_turns for ep in episodes),
                        **{"tok/s": sum(ep.num_sampled_tokens for ep in episodes) / elapsed},
                    )
            finally:
                list(pool.map(lambda env: _close(env), [e for e in envs if e is not None]))
        wall = time.perf_counter() - started
        self.last_stats = RolloutStats(
            episodes=len(episodes),
            turns=sum(ep.num_turns for ep in episodes),
            sampled_tokens=sum(ep.num_sampled_tokens for ep in episodes),
            generate_s=sum(ep.timings["generate_s"] for ep in episodes),
            env_s=sum(ep.timings["env_s"] for ep in episodes),
            wall_s=wall,
        )
        return episodes

    def _reset(self, index: int, episode: Episode, envs: list) -> None:
        t0 = time.perf_counter()
        try:
            env = self.make_env()
            envs[index] = env
            observation, info = env.reset(seed=episode.seed, options={"task_id": episode.task_id})
        except Exception as exc:  # a broken env ends this episode only
            episode.error = f"reset failed: {type(exc).__name__}: {exc}"
            return
        finally:
            episode.timings["env_s"] += time.perf_counter() - t0
        episode.info = dict(info)
        episode.append(self.chat.prompt_ids(observation), sampled=False)
        episode.prompt_len = len(episode.token_ids)

    def _step(self, episode: Episode, env) -> None:
        start, end = episode.turns[-1]
        action = self.chat.tokenizer.decode(episode.token_ids[start:end], skip_special_tokens=True)
        t0 = time.perf_counter()
        try:
            observation, reward, terminated, truncated, info = env.step(action)
        except Exception as exc:
            episode.error = f"step failed: {type(exc).__name__}: {exc}"
            return
        finally:
            episode.timings["env_s"] += time.perf_counter() - t0
        episode.info = dict(info)
        if not math.isfinite(float(reward)):
            # an environment fault, not a score: the learner and the evaluation leave it out
            episode.error = f"step returned a non-finite reward {reward!r}"
            return
        episode.reward += float(reward)
        if terminated or truncated:
            episode.terminated, episode.truncated = bool(terminated), bool(truncated)
            episode.truncation_reason = info.get("truncation_reason") if truncated else None
            episode.success = bool(info.get("success", False))
            return
        ended_with_eos = episode.finish_reasons[-1] == "eos"
        delta = self.chat.observation_ids(observation, ended_with_eos)
        if len(episode.token_ids) + len(delta) + self.max_new_tokens > self.max_context_tokens:
            # the next turn would not fit: end here rather than cut the observation
            self._truncate(episode, "context_limit", env)
            return
        episode.append(delta, sampled=False)

    def _fits_context(self, episode: Episode, env) -> bool:
        if len(episode.token_ids) + self.max_new_tokens > self.max_context_tokens:
            self._truncate(episode, "context_limit", env)
            return False
        return True

    @staticmethod
    def _truncate(episode: Episode, reason: str, env=None) -> None:
        """End an episode the runner cuts (turn or context limit). An environment that can grade
        a cut episode (``env.unwrapped.truncate(reason) -> (reward, info)``, or None when it
        cannot after all, as a remote env's may not; AppWorld's runs
        the task's tests on the state the last cell left) gives it its partial credit, so every
        episode has a reward; a failure to grade is an environment error, not a score of 0."""
        episode.truncated = True
        episode.truncation_reason = reason
        grade = _wrapper_attr(env, "truncate")
        if not callable(grade):
            return
        t0 = time.perf_counter()
        try:
            graded = grade(reason)
        except Exception as exc:  # noqa: BLE001 (any env failure ends this episode only)
            episode.error = f"grading the cut episode failed: {type(exc).__name__}: {exc}"
            return
        finally:
            episode.timings["env_s"] += time.perf_counter() - t0
        if graded is None:  # a remote env that cannot grade a cut episode (eprl/Remote-v0)
            return
        reward, info = graded
        if not math.isfinite(float(reward)):
            episode.error = f"grading the cut episode returned a non-finite reward {reward!r}"
            return
        episode.info = dict(info)
        episode.reward += float(reward)
        episode.success = bool(info.get("success", False))


def _wrapper_attr(env, name: str):
    """``name`` from the outermost wrapper (or the env itself) that has it, else None."""
    if env is None:
        return None
    try:
        if hasattr(env, "get_wrapper_attr"):
            return env.get_wrapper_attr(name)
        return getattr(env, name)
    except AttributeError:
        return None


def _close(env) -> None:
    # closing is best effort; the env's own finalizers reap what is left
    with contextlib.suppress(Exception):
        env.close()
