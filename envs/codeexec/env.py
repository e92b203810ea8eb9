"""``eprl/CodeExec-v0``: write a Python function, optionally trying code in a sandboxed REPL first.

Protocol (the prompt says it in a few lines):
- ``max_turns == 1`` (default): the first ```python block of the reply is the submission.
- ``max_turns > 1``: every reply's first ```python block runs as a cell of a persistent sandboxed
  Python session and its output is the next observation. A block whose first line is
  ``# submit`` ends the episode: it is graded (if it does not define the function, the latest
  cell that did is graded instead). When the episode ends any other way (the turn limit, an
  oversized reply or observation), the latest cell that defined the function is graded; with
  none, the reward is 0.
Reward = fraction of hidden tests passed, computed in a fresh sandbox under a wall-clock grading
budget (``grading_budget_s``); success = all passed.
"""

import ast
import re
from typing import Any

import gymnasium as gym

from envs.codeexec.budget import DEFAULT_GRADING_BUDGET_S, check_budget
from envs.codeexec.tasks import (
    DEFAULT_SPLIT,
    TASK_SETS,
    GradeResult,
    Task,
    grade,
    load_task,
    split_ids,
)
from envs.sandbox import PythonSandbox, SandboxConfig
from envs.text import extract_code_block, text_space, to_charset, truncate_text

ENV_ID = "eprl/CodeExec-v0"
_SUBMIT_LINE = re.compile(r"^\s*#\s*submit\b", re.IGNORECASE)

SINGLE_TURN_PROMPT = """\
Write a Python function for the task below. Reply with the complete function in one \
```python code block.

{task}"""

MULTI_TURN_PROMPT = """\
Solve the task below in Python. Each reply is one ```python code block; it runs in a \
persistent Python session and you see its output. To submit, reply with a block whose first \
line is `# submit` and that contains the complete function. You have {max_turns} turns; after \
the last one your latest version of the function is graded.

{task}"""


def _defines(code: str, name: str) -> bool:
    """Whether ``code`` defines function ``name`` at top level (parsed, never run, on the host)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name
        for node in tree.body
    )


class CodeExecEnv(gym.Env):
    """Gymnasium env over code-writing tasks (procedural family or HumanEval).

    Kwargs (plain JSON values):
        task_set: "procedural" (default) or "humaneval".
        split: a split of the task set (default "train" for procedural, "test" for humaneval).
        levels / families: procedural only, restrict the split (e.g. levels=[1, 2]).
        max_turns: 1 = single-turn submission; > 1 = REPL turns then `# submit`.
        max_action_chars / max_observation_chars: size limits; over them the episode is
            truncated with a message (never an exception).
        max_output_chars: cell output shown per turn (the sandbox's output cap).
        sandbox: dict of envs.sandbox.SandboxConfig fields, e.g. {"mode": "rlimits-only"}.
        grading_budget_s: wall-clock seconds the model code of one graded submission may run
            (each test's timeout is the smaller of the cell timeout and what is left; restarts
            after a lost session count); once spent, the tests left fail unrun, and ``info``
            says so (``grading_budget_spent``, ``tests_not_run``). Default 5 s: every reference
            and canonical solution grades in a small fraction of it (see
            ``envs/codeexec/budget.py``), while a looping answer no longer holds the rollout
            for tests x cell timeout.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        task_set: str = "procedural",
        split: str | None = None,
        levels: list[int] | None = None,
        families: list[str] | None = None,
        max_turns: int = 1,
        max_action_chars: int = 4000,
        max_observation_chars: int = 4000,
        max_output_chars: int = 1000,
        sandbox: dict[str, Any] | None = None,
        grading_budget_s: float = DEFAULT_GRADING_BUDGET_S,
    ) -> None:
        if task_set not in TASK_SETS:
            raise ValueError(f"unknown task_set {task_set!r}; expected one of {TASK_SETS}")
        if not (isinstance(max_turns, int) and max_turns >= 1):
            raise ValueError(f"max_turns must be an int >= 1, got {max_turns!r}")
        for name, value in (("max_action_chars", max_action_chars),
                            ("max_observation_chars", max_observation_chars)):  # fmt: skip
            if not (isinstance(value, int) and value >= 200):
                raise ValueError(f"{name} must be an int >= 200, got {value!r}")
        self.task_set = task_set
        self.split = split or DEFAULT_SPLIT[task_set]
        self.levels = list(levels) if levels is not None else None
        self.families = list(families) if families is not None else None
        if task_set != "procedural" and (levels is not None or families is not None):
            raise ValueError("levels and families only apply to task_set='procedural'")
        self.max_turns = max_turns
        self.grading_budget_s = check_budget(grading_budget_s)
        self.max_action_chars = max_action_chars
        self.max_observation_chars = max_observation_chars
        self.sandbox_config = SandboxConfig.from_dict(
            {"max_output_chars": max_output_chars, **(sandbox or {})}
        )
        # refuse now (e.g. bubblewrap missing), not in the middle of a rollout
        PythonSandbox(self.sandbox_config).close()
        self._task_ids = self.task_ids(self.split)
        if not self._task_ids:
            raise ValueError(
                f"no task in split {self.split!r} with levels={levels} families={families}"
            )
        self.observation_space = text_space(max_observation_chars)
        self.action_space = text_space(max_action_chars)
        self._task: Task | None = None
        self._repl: PythonSandbox | None = None
        self._turn = 0
        self._done = True
        self._latest_definition: str | None = None

    @property
    def defaults(self) -> dict[str, int | None]:
        """Budgets for an agent running this env (the keys are described in ``envs/defaults.py``).

        - ``max_turns``: this env's ``max_turns``.
        - ``max_new_tokens``: 96 for procedural tasks, the budget the quick start and the
          CodeExec configs train with (a reference solution is a one- to five-line function);
          512 for HumanEval's longer functions.
        - ``max_context_tokens``: 2048 single-turn (a prompt and one reply); multi-turn, 8192
          for procedural tasks and 16384 for HumanEval's longer prompts. The caller caps it to
          the model's window.
        - ``max_parallel_episodes``: None: every episode has a sandbox of its own, so the env
          sets no limit.
        """
        single_turn = self.max_turns == 1
        if self.task_set == "procedural":
            new_tokens, context = 96, 2048 if single_turn else 8192
        else:
            new_tokens, context = 512, 2048 if single_turn else 16384
        return {
            "max_turns": self.max_turns,
            "max_new_tokens": new_tokens,
            "max_context_tokens": context,
            "max_parallel_episodes": None,
        }

    # catalogue ---------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        return list(split_ids(self.task_set))

    def task_ids(self, split: str) -> list[str]:
        """Task ids of ``split`` (after the levels / families filter), in a stable order."""
        all_splits = split_ids(self.task_set)
        if split not in all_splits:
            raise ValueError(
                f"unknown split {split!r} for task_set {self.task_set!r}; "
                f"expected one of {list(all_splits)}"
            )
        ids = list(all_splits[split])
        if self.levels is not None:
            ids = [i for i in ids if int(i.split("/")[2][1:]) in self.levels]
        if self.families is not None:
            ids = [i for i in ids if i.split("/")[1] in self.families]
        return ids

    # episode -----------------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        self._close_repl()
        task_id = (options or {}).get("task_id")
        if task_id is None:
            task_id = self._task_ids[int(self.np_random.integers(len(self._task_ids)))]
        self._task = load_task(self.task_set, task_id)
        self._turn = 0
        self._done = False
        self._latest_definition = None
        template = SINGLE_TURN_PROMPT if self.max_turns == 1 else MULTI_TURN_PROMPT
        prompt = template.format(task=self._task.description, max_turns=self.max_turns)
        observation = truncate_text(to_charset(prompt), self.max_observation_chars)
        return observation, self._info()

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if self._task is None or self._done:
            raise RuntimeError("step() needs an episode: call reset() first (and after it ends)")
        self._turn += 1
        action = str(action)
        if len(action) > self.max_action_chars:
            message = (
                f"Your reply has {len(action)} characters, over the limit of "
                f"{self.max_action_chars}; the episode ends."
            )
            return self._finish(message, truncation_reason="action_too_long")
        code = extract_code_block(action)
        if self.max_turns == 1:
            if code is None:
                return self._finish("No ```python code block found in your reply.")
            return self._finish("Submitted.", code=code)
        if code is not None and _SUBMIT_LINE.match(code.lstrip("\n").split("\n", 1)[0]):
            if not _defines(code, self._task.entry_point) and self._latest_definition:
                code = self._latest_definition
            return self._finish("Submitted.", code=code)
        if code is None:
            output = "No ```python code block found in your reply; nothing ran."
        else:
            if _defines(code, self._task.entry_point):
                self._latest_definition = code
            output = self._run_cell(code)
        if self._turn >= self.max_turns:
            return self._finish(f"{output}\nTurn limit reached.", truncation_reason="max_turns")
        left = self.max_turns - self._turn
        footer = (
            "(1 turn left: your next reply ends the episode.)"
            if left == 1
            else f"({left} turns left.)"
        )
        observation = to_charset(f"{output}\n{footer}")
        if len(observation) > self.max_observation_chars:
            return self._finish(
                f"The output has {len(observation)} characters, over the observation limit of "
                f"{self.max_observation_chars}.",
                truncation_reason="observation_too_long",
            )
        return observation, 0.0, False, False, self._info()

    def close(self) -> None:
        self._close_repl()
        super().close()

    # internals ---------------------------------------------------------------------------
    def _run_cell(self, code: str) -> str:
        if self._repl is None:
            self._repl = PythonSandbox(self.sandbox_config, startup_code=self._task.setup_code)
        return self._repl.run_cell(code).render()

    def _finish(
        self, message: str, code: str | None = None, truncation_reason: str | None = None
    ) -> tuple[str, float, bool, bool, dict[str, Any]]:
        """End the episode: grade ``code`` (default: the latest definition) and pay the reward."""
        self._done = True
        self._close_repl()
        if code is None:
            code = self._latest_definition
        name = self._task.entry_point
        if code is None:
            result = GradeResult(0, self._task.tests_total)
            verdict = f"No code defining `{name}` to grade: 0/{result.tests_total} tests passed."
        else:
            result = grade(self._task, code, self.sandbox_config, self.grading_budget_s)
            graded = "your submission" if truncation_reason is None else f"your latest `{name}`"
            verdict = (
                f"Graded {graded}: {result.tests_passed}/{result.tests_total} hidden tests passed."
            )
            if result.budget_spent:
                verdict += (
                    f" The grading time limit of {self.grading_budget_s:g} s ran out: "
                    f"{result.tests_not_run} tests were not run and count as failed."
                )
        info = self._info()
        info.update(
            success=result.success,
            tests_passed=result.tests_passed,
            tests_total=result.tests_total,
            grading_budget_spent=result.budget_spent,
            tests_not_run=result.tests_not_run,
        )
        if truncation_reason is not None:
            info["truncation_reason"] = truncation_reason
        verdict = to_charset(verdict)
        room = max(self.max_observation_chars - len(verdict) - 1, 0)
        observation = f"{truncate_text(to_charset(message), room)}\n{verdict}"
        observation = observation[-self.max_observation_chars :]
        truncated = truncation_reason is not None
        return observation, result.reward, not truncated, truncated, info

    def _info(self) -> dict[str, Any]:
        task = self._task
        info: dict[str, Any] = {
            "task_id": task.task_id,
            "turn": self._turn,
            "split": task.split,
            "task_set": task.task_set,
        }
        if task.level is not None:
            info["level"] = task.level
        return info

    def _close_repl(self) -> None:
        if self._repl is not None:
            self._repl.close()
            self._repl = None
