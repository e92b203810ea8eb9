"""The per-submission grading budget of eprl/CodeExec-v0 (``envs/codeexec/budget.py``).

Real bubblewrap sandboxes (the ``bwrap`` fixture of conftest.py skips these without bwrap;
`apt-get install bubblewrap`, done by `make setup`, runs them). Budgets and cell timeouts are
small so the file stays within a few seconds per test; the time bounds are generous (the
budget, twice a sandbox start measured in the same test, and a second of slack) and far below
what the same grading costs without a budget (every test waiting out its cell timeout).
"""

import math
import re
import time

import gymnasium
import pytest

import envs  # noqa: F401 (registers the env ids)
from envs.codeexec import CodeExecEnv
from envs.codeexec.budget import DEFAULT_GRADING_BUDGET_S
from envs.codeexec.tasks import grade, humaneval_task, load_task
from envs.sandbox import PythonSandbox, SandboxConfig

needs_bwrap = pytest.mark.usefixtures("bwrap")
# proc/arithmetic/L1/5 is `x * 4 + 3`; its four hidden tests call it on -29, 35, 38, 10, in order
ARITHMETIC = "proc/arithmetic/L1/5"


def _loops_on(*inputs: int) -> str:
    """A submission correct on every input except ``inputs``, where it never returns."""
    return (
        f"def scale_and_shift(x):\n    while x in {inputs!r}:\n        pass\n    return x * 4 + 3"
    )


def _startup_s(config: SandboxConfig, setup_code: str) -> float:
    """Wall time of one sandbox start (the peer the time bounds below are sized from)."""
    started = time.monotonic()
    with PythonSandbox(config, startup_code=setup_code) as sandbox:
        sandbox.start()
    return time.monotonic() - started


@needs_bwrap
def test_a_submission_that_loops_forever_is_graded_within_the_budget():
    """Without a budget this grading waits out 4 tests x 3 s plus three restarts (over 12 s)."""
    budget_s, sandbox = 1.0, {"cell_timeout_s": 3, "cpu_seconds": 10}
    env = gymnasium.make("eprl/CodeExec-v0", sandbox=sandbox, grading_budget_s=budget_s)
    env.reset(options={"task_id": "proc/list/L2/3"})
    startup_s = _startup_s(SandboxConfig(**sandbox), env.unwrapped._task.setup_code)
    started = time.monotonic()
    obs, reward, terminated, _, info = env.step(
        "```python\ndef sum_times(xs):\n    while True:\n        pass\n```"
    )
    elapsed = time.monotonic() - started
    env.close()
    assert reward == 0.0 and terminated and not info["success"]
    assert info["grading_budget_spent"] is True
    assert (info["tests_passed"], info["tests_not_run"], info["tests_total"]) == (0, 4, 4)
    assert "grading time limit of 1 s ran out: 4 tests were not run" in obs
    assert elapsed < budget_s + 2 * startup_s + 1.0, (elapsed, startup_s)


@needs_bwrap
def test_a_humaneval_submission_that_loops_forever_is_graded_within_the_budget():
    """HumanEval/0 under the default 10 s cell timeout: unbudgeted, 7 tests x 10 s."""
    task, config, budget_s = humaneval_task("HumanEval/0"), SandboxConfig(), 1.0
    assert grade(task, task.reference_solution, config).success  # caches the reference calls
    startup_s = _startup_s(config, task.setup_code)
    started = time.monotonic()
    looping = f"def {task.entry_point}(numbers, threshold):\n    while True: pass"
    result = grade(task, looping, config, budget_s)
    elapsed = time.monotonic() - started
    assert (result.tests_passed, result.reward, result.budget_spent) == (0, 0.0, True)
    assert result.tests_not_run == task.tests_total == 7
    assert "grading budget of 1 s ran out" in result.first_failure
    assert elapsed < budget_s + 2 * startup_s + 1.0, (elapsed, startup_s)


@needs_bwrap
def test_tests_before_the_budget_ran_out_keep_their_credit():
    """Loops on the third input only: the two tests before it pass, the budget cuts the third
    (its 2 s cell timeout is longer than the 1 s budget) and the fourth never runs. With room
    for the third to time out on its own, the fourth runs after the restart and passes: the
    budget only took credit away."""
    task, config, code = (
        load_task("procedural", ARITHMETIC),
        SandboxConfig(cell_timeout_s=2),
        _loops_on(38),
    )
    cut = grade(task, code, config, budget_s=1.0)
    assert (cut.tests_passed, cut.tests_not_run, cut.budget_spent) == (2, 2, True)
    assert cut.reward == 0.5 and "scale_and_shift(38)" not in (cut.first_failure or "")
    roomy = grade(task, code, config, budget_s=60.0)
    assert (roomy.tests_passed, roomy.tests_not_run, roomy.budget_spent) == (3, 0, False)
    assert (
        "scale_and_shift(38)" in roomy.first_failure
        and "wall-clock limit of 2 s" in roomy.first_failure
    )


@needs_bwrap
def test_a_restart_after_a_lost_session_is_charged_to_the_budget():
    """Loops on the second and third inputs, cell timeout 1 s, budget 1.6 s: the second test
    times out on its own timeout (the budget not yet spent), the session restarts, and the
    third test gets only what is left of the budget (under 0.6 s), so the fourth never runs."""
    task, config = load_task("procedural", ARITHMETIC), SandboxConfig(cell_timeout_s=1)
    result = grade(task, _loops_on(35, 38), config, budget_s=1.6)
    assert (result.tests_passed, result.tests_not_run, result.budget_spent) == (1, 2, True)
    assert "scale_and_shift(35)" in result.first_failure  # the first failure is the real one
    assert result.budget_used_s < 1.6 + 1.0


@needs_bwrap
@pytest.mark.parametrize(
    ("task_id", "wrong"),
    [
        (ARITHMETIC, "def scale_and_shift(x):\n    return x * 4 + 3 if x < 36 else 0"),
        ("HumanEval/0", "def has_close_elements(numbers, threshold):\n    return False"),
    ],
    ids=["procedural", "humaneval"],
)
def test_a_tiny_budget_cannot_raise_a_reward(task_id, wrong):
    task = load_task("humaneval" if task_id.startswith("HumanEval") else "procedural", task_id)
    large = grade(task, wrong, budget_s=60.0)
    assert 0.0 < large.reward < 1.0 and not large.budget_spent  # the submission is partly right
    tiny = grade(task, wrong, budget_s=1e-4)
    assert tiny.budget_spent and tiny.tests_not_run > 0
    assert (
        tiny.reward <= large.reward and tiny.tests_passed + tiny.tests_not_run <= task.tests_total
    )


@needs_bwrap
@pytest.mark.parametrize(
    ("task_set", "task_id"), [("procedural", "proc/list/L2/3"), ("humaneval", "HumanEval/75")]
)
def test_a_correct_solution_gets_full_reward_under_the_default_budget(task_set, task_id):
    """HumanEval/75 has the slowest canonical solution measured (about 0.26 s of the budget)."""
    env = gymnasium.make("eprl/CodeExec-v0", task_set=task_set)
    assert env.unwrapped.grading_budget_s == DEFAULT_GRADING_BUDGET_S
    env.reset(options={"task_id": task_id})
    solution = env.unwrapped._task.reference_solution
    _, reward, terminated, _, info = env.step(f"```python\n{solution}\n```")
    env.close()
    assert (reward, terminated, info["success"]) == (1.0, True, True)
    assert (info["grading_budget_spent"], info["tests_not_run"]) == (False, 0)


@pytest.mark.parametrize("value", [0, -1.5, math.nan, "5", True, None])
def test_a_bad_budget_is_refused_naming_the_value(value):
    with pytest.raises(ValueError, match=r"grading_budget_s .*> 0, got " + re.escape(repr(value))):
        CodeExecEnv(grading_budget_s=value)
    task = load_task("procedural", ARITHMETIC)
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        grade(task, task.reference_solution, budget_s=value)
