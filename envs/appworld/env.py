"""``eprl/AppWorld-v0``: AppWorld tasks as a Gymnasium environment, run by the real engine over HTTP.

One episode is one AppWorld task on one server of the runtime (``runtime.py``):
``reset(options={"task_id": ...})`` initialises the task world (``/initialize``, with its own
``experiment_name``) and returns the instruction, the supervisor and the agent protocol of LOOP
(methods.md): one Python cell per turn in a persistent REPL, ``apis.<app>.<api>(...)`` calls,
``apis.api_docs.*`` for documentation, ``apis.supervisor.complete_task(answer=...)`` to finish.
``step(action)`` runs the first fenced code block of the action (``/execute``) and returns its
output, cut to ``max_observation_chars`` (12,000 characters, about 3K tokens, by default).
The episode ends when the task reports completion (``terminated``) or after ``max_turns`` cells
(``truncated``; 40 for training, LOOP evaluates with 50), or when the agent cuts it
(``truncate()``, e.g. at a full context). However it ends, the task's unit tests run on the state
the world saved after its last cell: reward = fraction passed, ``success`` = all passed. Every
``info`` says which data the episode ran on (``data``: the release or the generated world), and
``demonstration=True`` adds a worked example episode to the prompt (``demonstration.py``).

Local servers are sealed (``sealed.py``): the cells run in a bubblewrap sandbox, one per
episode, with no network, no host secrets and no ground truth; the tests run afterwards in a
separate sandboxed evaluator that never runs model code. ``server_urls`` servers are run and
isolated by whoever runs them, and evaluate themselves.
"""

from __future__ import annotations

import itertools
import os
import uuid
import weakref
from pathlib import Path
from typing import Any

import gymnasium as gym

from envs.appworld import demonstration as worked_example
from envs.appworld.runtime import (
    AppWorldRuntime,
    AppWorldRuntimeError,
    AppWorldServer,
    AppWorldServerError,
    resolve_root,
    shared_runtime,
)
from envs.appworld.sealed import install_task
from envs.appworld.server import data_source
from envs.text import extract_code_block, has_code_fence, text_space, to_charset, truncate_text

ENV_ID = "eprl/AppWorld-v0"
SPLITS = ("train", "dev", "test_normal", "test_challenge")
PROMPT_BUDGET_CHARS = 8192  # room for the reset prompt beside the largest cell output
# /initialize and /evaluate may take this long (plus the margin) on a busy machine
SLOW_CALL_S = 240.0

PROTOCOL = """\
You are an autonomous agent working for your supervisor in AppWorld, a simulated world of
everyday apps (phone, spotify, venmo, simple_note, gmail, ...). Complete the task below by
writing Python code.

How to act:
- Each turn, write exactly one Python code block (```python ... ```). It runs in a persistent
  REPL: variables, functions and imports carry over between turns. What the code prints is
  shown to you (long output is cut to {max_observation_chars} characters), so print what you
  need to see.
- Call the apps as `apis.<app_name>.<api_name>(**arguments)`, e.g.
  `apis.spotify.login(username=..., password=...)`. Failed calls raise an exception with a
  message.
- Read the documentation instead of guessing:
  `apis.api_docs.show_app_descriptions()`,
  `apis.api_docs.show_api_descriptions(app_name="spotify")`,
  `apis.api_docs.show_api_doc(app_name="spotify", api_name="login")`.
- Your supervisor's account passwords, addresses and payment cards are available through
  `apis.supervisor` (e.g. `apis.supervisor.show_account_passwords()`).
- Work step by step and check results; list APIs return one page at a time (page_index,
  page_limit).
- When the task is done, call `apis.supervisor.complete_task()`. If the task asks a question,
  pass the answer and nothing else: `apis.supervisor.complete_task(answer=...)` (a number, a
  name, a yes/no ...). This ends the episode.
- You have at most {max_turns} code cells. Never ask for clarification; decide autonomously.

Supervisor: {first_name} {last_name} (email {email}, phone {phone_number})
Current date and time: {datetime}

Task: {instruction}
"""

NOT_PYTHON_MESSAGE = "Your message has a code block, but not a Python one; nothing was executed."
NO_CODE_MESSAGE = (
    "No Python code block found in your message, so nothing was executed. Write exactly one "
    "block:\n```python\n# your code\n```"
)


class _Lease:
    """The runtime an environment is attached to and the server its episode runs on."""

    def __init__(self) -> None:
        self.runtime: AppWorldRuntime | None = None
        self.server: AppWorldServer | None = None
        self.experiment_name: str | None = None

    def release_server(self, broken: bool) -> None:
        if self.server is not None and self.runtime is not None:
            self.runtime.release(self.server, broken=broken)
        self.server = None

    def give_back(self) -> None:
        self.release_server(broken=False)
        if self.runtime is not None:
            self.runtime.detach()
            self.runtime = None


def splits_of(root: Path) -> list[str]:
    """The splits whose ``data/datasets/<split>.txt`` exist under an AppWorld root."""
    return [split for split in SPLITS if (root / "data" / "datasets" / f"{split}.txt").is_file()]


def task_ids_of(root: Path, split: str) -> list[str]:
    """Task ids of ``split`` (AppWorld's dataset file, one id per line; ``id:tag`` drops the tag)."""
    path = root / "data" / "datasets" / f"{split}.txt"
    if split not in SPLITS or not path.is_file():
        raise ValueError(
            f"unknown AppWorld split {split!r} under {root}: expected one of {splits_of(root)}"
        )
    return [line.split(":")[0].strip() for line in path.read_text().splitlines() if line.strip()]


def scenario_of(task_id: str) -> str:
    """The scenario id (AppWorld's generator id): the task id's prefix before the underscore."""
    return task_id.rsplit("_", 1)[0]


class AppWorldEnv(gym.Env):
    """AppWorld tasks through the real engine; see the module docstring for the protocol.

    Args:
        split: task split drawn from when ``reset`` gets no task id (``train``, ``dev``,
            ``test_normal``, ``test_challenge``; those present under the root).
        task_id: a fixed task for every ``reset`` without a task id (instead of drawing).
        root: AppWorld root holding ``data/`` (default ``$APPWORLD_ROOT``, else
            ``$EPRL_CACHE_DIR/appworld``, where ``eprl appworld make-data`` writes).
        max_turns: code cells per episode before truncation (40 training, 50 evaluation).
        max_observation_chars: a cell's output is cut to this many characters (~3K tokens).
        max_action_chars: longer actions end the episode (``truncation_reason="action_too_long"``).
        cell_timeout_s: AppWorld's own time limit for one cell (a cell can switch that off
            with ``signal.alarm(0)``; the limit below it cannot).
        request_margin_s: how much longer than AppWorld's own limits an HTTP call may take
            before its server is presumed hung: the server (with every process of its
            sandbox) is killed and the episode fails with ``AppWorldServerError``.
        python: the AppWorld venv (or its python); default ``$EPRL_APPWORLD_VENV``, else
            ``<repo>/.venv-appworld``.
        max_servers: episodes the shared pool runs at once, one sealed server each (default:
            CPU count), plus one spare server starting for the next episode; environments of
            one process with the same settings share the pool.
        server_urls: use these running ``appworld serve environment`` servers (same data)
            instead of starting local ones.
        start_timeout_s: how long a new server may take to answer.
        demonstration: show a worked example episode (ours, AppWorld's ReAct style; see
            ``demonstration.py``) in the prompt before the task. Off by default.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        split: str = "train",
        task_id: str | None = None,
        root: str | None = None,
        max_turns: int = 40,
        max_observation_chars: int = 12_000,
        max_action_chars: int = 16_000,
        cell_timeout_s: int = 60,
        request_margin_s: float = 60.0,
        python: str | None = None,
        max_servers: int | None = None,
        server_urls: list[str] | None = None,
        start_timeout_s: float = 180.0,
        demonstration: bool = False,
    ):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        self.root = resolve_root(root)
        self.splits = splits_of(self.root)
        self._task_ids = {
            split_name: task_ids_of(self.root, split_name) for split_name in self.splits
        }
        if split not in self.splits:
            raise ValueError(
                f"unknown AppWorld split {split!r} under {self.root}: expected one of {self.splits}"
            )
        self.split = split
        if task_id is not None:
            self._check_task_id(task_id)
        self.fixed_task_id = task_id
        self.max_turns = max_turns
        self.max_observation_chars = max_observation_chars
        self.max_action_chars = max_action_chars
        self.cell_timeout_s = cell_timeout_s
        self.request_margin_s = request_margin_s
        self.demonstration = bool(demonstration)
        self.data = data_source(self.root)  # in every info: which data the episode ran on
        self._runtime_config = dict(
            root=self.root,
            python=python,
            max_servers=max_servers,
            server_urls=server_urls,
            start_timeout_s=start_timeout_s,
        )
        self.observation_space = text_space(max_observation_chars + PROMPT_BUDGET_CHARS)
        self.action_space = text_space(max_action_chars)
        # What this env holds in the (shared) runtime; a finalizer gives it back if the env is
        # dropped without close(), so abandoned environments do not pin servers.
        self._lease = _Lease()
        weakref.finalize(self, self._lease.give_back)
        self._task_id: str | None = None
        self._task_split: str | None = None
        self._experiment_name: str | None = None
        self._turn = 0
        self._done = True
        self._episode_counter = itertools.count()

    # ------------------------------------------------------------------ contract helpers

    def task_ids(self, split: str) -> list[str]:
        if split not in self._task_ids:
            raise ValueError(
                f"unknown AppWorld split {split!r} under {self.root}: expected one of {self.splits}"
            )
        return list(self._task_ids[split])

    @property
    def defaults(self) -> dict[str, int | None]:
        """Budgets for an agent running this env (the keys are described in ``envs/defaults.py``).

        - ``max_turns``: this env's ``max_turns`` (40 by default, LOOP's training budget).
        - ``max_new_tokens``: 1500, LOOP's generation budget per turn (methods.md).
        - ``max_context_tokens``: 16384 tokens of conversation; the caller caps it to the
          model's window (the LOOP training configs use 32768).
        - ``max_parallel_episodes``: the size of the server pool, since an episode holds one
          server from ``reset`` to its end: ``len(server_urls)``, else ``max_servers``, else the
          CPU count (the pool's own default).
        """
        pool = (
            len(self._runtime_config["server_urls"] or [])
            or self._runtime_config["max_servers"]
            or os.cpu_count()
            or 1
        )
        return {
            "max_turns": self.max_turns,
            "max_new_tokens": 1500,
            "max_context_tokens": 16384,
            "max_parallel_episodes": int(pool),
        }

    @property
    def experiment_name(self) -> str | None:
        """AppWorld's ``experiment_name`` of the current episode (unique per episode)."""
        return self._experiment_name

    @property
    def server(self) -> AppWorldServer | None:
        """The AppWorld server the current episode runs on (None between episodes)."""
        return self._lease.server

    @property
    def runtime(self) -> AppWorldRuntime:
        """The (shared) server pool, attached on first use."""
        if self._lease.runtime is None:
            self._lease.runtime = shared_runtime(**self._runtime_config)
        return self._lease.runtime

    def warm(self) -> None:
        """Start the server the first episode will run on and wait until it answers, so the
        first ``reset`` pays no cold start; the service's warm sessions call it
        (``serving/warm.py``). Nothing to do with ``server_urls`` or a server already idle."""
        self.runtime.prestart()

    # ------------------------------------------------------------------ gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        self._end_episode()
        task_id = (options or {}).get("task_id") or self.fixed_task_id
        if task_id is None:
            pool = self._task_ids[self.split]
            if not pool:
                raise ValueError(f"AppWorld split {self.split!r} under {self.root} has no tasks")
            task_id = pool[int(self.np_random.integers(len(pool)))]
        task_id = str(task_id)
        self._check_task_id(task_id)
        # the next episode's spare starts after /initialize, not beside it (seconds of CPU)
        server = self.runtime.acquire(start_spare=False)
        experiment_name = f"eprl_{os.getpid()}_{next(self._episode_counter)}_{uuid.uuid4().hex[:8]}"
        try:
            if server.sealed:  # it holds no task until now, and never a ground truth
                install_task(self.root, server.directory, task_id)
            task = server.call(
                "initialize",
                timeout_s=SLOW_CALL_S + self.request_margin_s,
                task_id=task_id,
                experiment_name=experiment_name,
                timeout_seconds=self.cell_timeout_s,
                load_ground_truth=not server.sealed,
            )
        except BaseException as error:
            self.runtime.release(server, broken=isinstance(error, AppWorldServerError))
            raise
        self.runtime.start_spare()
        self._lease.server, self._task_id, self._experiment_name = server, task_id, experiment_name
        self._lease.experiment_name = experiment_name
        self._task_split = next((s for s in self.splits if task_id in self._task_ids[s]), None)
        self._turn = 0
        self._done = False
        prompt = PROTOCOL.format(
            max_observation_chars=self.max_observation_chars,
            max_turns=self.max_turns,
            datetime=task["datetime"],
            instruction=task["instruction"],
            **task["supervisor"],
        )
        if self.demonstration:
            prompt = prompt.replace(
                "\nSupervisor: ", "\n" + worked_example.render() + "\nSupervisor: ", 1
            )
        observation = truncate_text(to_charset(prompt), self.observation_space.max_length)
        return observation, self._info()

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._done or self._lease.server is None:
            raise RuntimeError("the episode is over (or never started): call reset() first")
        self._turn += 1
        if len(action) > self.max_action_chars:
            message = (
                f"Your message has {len(action)} characters, more than the limit of {self.max_action_chars}; "
                "the episode ends here."
            )
            return self._finish(message, terminated=False, truncation_reason="action_too_long")
        code = extract_code_block(action)
        if code is None:
            output = NOT_PYTHON_MESSAGE if has_code_fence(action) else NO_CODE_MESSAGE
        else:
            output = self._call(
                "execute", timeout_s=self.cell_timeout_s + self.request_margin_s, code=code
            )
        observation = truncate_text(to_charset(output), self.max_observation_chars)
        if code is not None and self._call("task_completed", timeout_s=self.request_margin_s):
            return self._finish(observation, terminated=True)
        if self._turn >= self.max_turns:
            return self._finish(observation, terminated=False, truncation_reason="max_turns")
        return observation, 0.0, False, False, self._info()

    def truncate(self, reason: str = "context_limit") -> tuple[float, dict[str, Any]]:
        """End the running episode early (the agent's context is full, or it stops for any
        other reason) and grade it like a turn-limit cut: the task's tests on the state its
        last cell left, so the episode still earns its partial credit. Returns ``(reward,
        info)`` with ``truncation_reason=reason``; ``step``/``reset`` semantics are unchanged."""
        if self._done or self._lease.server is None:
            raise RuntimeError("the episode is over (or never started): call reset() first")
        _, reward, _, _, info = self._finish("", terminated=False, truncation_reason=reason)
        return reward, info

    def close(self) -> None:
        self._end_episode()
        self._lease.give_back()
        super().close()

    # ------------------------------------------------------------------ internals

    def _check_task_id(self, task_id: str) -> None:
        if (
            task_id.count("_") != 1
            or not (self.root / "data" / "tasks" / task_id / "specs.json").is_file()
        ):
            raise ValueError(
                f"unknown AppWorld task id {task_id!r}: no {self.root}/data/tasks/{task_id}/specs.json "
                f"(ids look like '<scenario>_<n>'; see env.unwrapped.task_ids(split) for {self.splits})"
            )

    def _info(self, **extra: Any) -> dict[str, Any]:
        info = {
            "task_id": self._task_id,
            "turn": self._turn,
            "split": self._task_split or self.split,
            "scenario_id": scenario_of(self._task_id),
            "data": self.data,
        }
        info.update(extra)
        return info

    def _call(self, method: str, timeout_s: float, **payload: Any) -> Any:
        try:
            return self._lease.server.call(
                method, timeout_s=timeout_s, task_id=self._task_id, **payload
            )
        except AppWorldServerError as error:
            self._drop_server(broken=True)
            raise AppWorldServerError(
                f"AppWorld episode {self._experiment_name} (task {self._task_id}, turn {self._turn}) failed: {error}"
            ) from error
        except AppWorldRuntimeError:
            self._drop_server(broken=False)
            raise

    def _finish(self, observation: str, terminated: bool, truncation_reason: str | None = None):
        try:
            report = self.runtime.evaluate(
                self._lease.server,
                self._task_id,
                self._experiment_name,
                timeout_s=SLOW_CALL_S + self.request_margin_s,
            )
        except AppWorldRuntimeError as error:
            self._drop_server(broken=isinstance(error, AppWorldServerError))
            raise
        passed, total = len(report["passes"]), int(report["num_tests"])
        extra = {
            "success": bool(report["success"]),
            "tests_passed": passed,
            "tests_total": total,
            "failed_tests": [failure["requirement"] for failure in report["failures"]],
            "difficulty": report.get("difficulty"),
        }
        if truncation_reason is not None:
            extra["truncation_reason"] = truncation_reason
        info = self._info(**extra)
        self._end_episode()
        reward = passed / total if total else 0.0
        return observation, float(reward), terminated, not terminated, info

    def _end_episode(self) -> None:
        """Close the task world (if any) and give its server back to the pool. A sealed
        server is killed on release, world and all, so it is not asked to close first."""
        self._done = True
        if self._lease.server is None:
            return
        if self._lease.server.sealed:
            self._drop_server(broken=False)
            return
        broken = False
        try:
            self._lease.server.call("close", timeout_s=self.request_margin_s, task_id=self._task_id)
        except AppWorldServerError:
            broken = True
        except AppWorldRuntimeError:
            pass  # AppWorld failed to close the world; the next /initialize replaces it anyway
        self._drop_server(broken=broken)

    def _drop_server(self, broken: bool) -> None:
        self._done = True
        self._lease.release_server(broken=broken)


def catalogue() -> list[dict[str, Any]]:
    """What ``eprl envs`` lists: the AppWorld task set found under the default root, if any."""
    try:
        root = resolve_root(None)
    except AppWorldRuntimeError:
        return [
            dict(
                env_id=ENV_ID,
                task_set="appworld (no data yet: run `eprl appworld make-data`)",
                kwargs={},
                splits={},
            )
        ]
    task_set = (
        "appworld-generated" if (root / "data" / "eprl_generated.json").is_file() else "appworld"
    )
    return [
        dict(
            env_id=ENV_ID,
            task_set=task_set,
            kwargs={"root": str(root)},
            splits={split: len(task_ids_of(root, split)) for split in splits_of(root)},
        )
    ]
