"""eprl/CodeExec-v0: API conformance, task sets and splits, grading, the multi-turn protocol.

Grading runs in the bubblewrap sandbox; without bwrap the tests that make an env or grade in the
default mode (the ``bwrap`` fixture of conftest.py) skip (`apt-get install bubblewrap`, done by
`make setup`, runs them); the task-set, rlimits-only and text-helper tests still run.
"""

import logging
import math
import random
import subprocess
import sys
import time
import uuid
import warnings

import gymnasium
import psutil
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.codeexec import CodeExecEnv, catalogue, plain_data, procedural
from envs.codeexec.tasks import grade, humaneval_task, load_task, split_ids
from envs.sandbox import PythonSandbox, SandboxConfig
from envs.text import TEXT_CHARSET, extract_code_block, to_charset, truncate_text

needs_bwrap = pytest.mark.usefixtures("bwrap")
FAST_SANDBOX = {"cell_timeout_s": 3, "cpu_seconds": 10}


def _fence(code: str) -> str:
    return f"Here it is:\n```python\n{code}\n```\n"


@pytest.fixture
def multi_turn(bwrap):
    env = gymnasium.make("eprl/CodeExec-v0", max_turns=4, sandbox=FAST_SANDBOX)
    yield env
    env.close()


# API ----------------------------------------------------------------------------------------
@needs_bwrap
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"task_set": "humaneval"}, {"max_turns": 3, "split": "dev", "levels": [1]}],
    ids=["procedural", "humaneval", "multi-turn"],
)
def test_check_env_passes(kwargs):
    env = gymnasium.make("eprl/CodeExec-v0", **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    assert not [w for w in caught if "gymnasium" in str(w.filename)], [
        str(w.message) for w in caught
    ]
    env.close()


@needs_bwrap
def test_make_works_from_a_plain_shell(tmp_path):
    code = (
        "import envs, gymnasium\n"
        "env = gymnasium.make('eprl/CodeExec-v0')\n"
        "obs, info = env.reset(seed=0)\n"
        "print(info['task_id'], info['turn'], info['split'])\n"
        "env.close()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    task_id, turn, split = done.stdout.split()
    assert task_id.startswith("proc/") and turn == "0" and split == "train"


@needs_bwrap
def test_catalogue_and_splits():
    entries = {entry["task_set"]: entry for entry in catalogue()}
    assert entries["procedural"]["env_id"] == "eprl/CodeExec-v0"
    assert entries["procedural"]["kwargs"] == {"task_set": "procedural"}
    assert entries["procedural"]["splits"] == {"train": 2400, "dev": 120, "test": 240}
    assert entries["humaneval"]["splits"] == {"test": 164}
    assert "eprl/CodeExec-v0" in envs.ENV_IDS
    env = CodeExecEnv(split="test")
    assert env.splits == ["train", "dev", "test"]
    assert len(env.task_ids("test")) == 240
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        env.task_ids("validation")
    with pytest.raises(ValueError, match="unknown split"):
        CodeExecEnv(split="validation")
    with pytest.raises(ValueError, match="unknown task_set"):
        CodeExecEnv(task_set="mbpp")
    with pytest.raises(ValueError, match="not a procedural task id"):
        env.reset(options={"task_id": "HumanEval/0"})


def test_procedural_splits_are_disjoint_in_ids_and_content():
    ids = split_ids("procedural")
    all_ids = [task_id for split in ids.values() for task_id in split]
    assert len(all_ids) == len(set(all_ids))
    keys = {}
    for split, task_ids in ids.items():
        for task_id in task_ids:
            key = procedural.generate(*procedural.parse_task_id(task_id)).key
            assert keys.setdefault(key, split) == split, f"{key} in {keys[key]} and {split}"
    assert len(keys) == len(all_ids)  # one content per id
    levels = {procedural.parse_task_id(task_id)[1] for task_id in ids["test"]}
    families = {procedural.parse_task_id(task_id)[0] for task_id in ids["test"]}
    assert levels == {1, 2, 3} and families == set(procedural.FAMILIES)


@needs_bwrap
def test_same_seed_same_task():
    first = CodeExecEnv()
    second = CodeExecEnv()
    obs_a, info_a = first.reset(seed=123)
    obs_b, info_b = second.reset(seed=123)
    assert (obs_a, info_a) == (obs_b, info_b)
    task_id = "proc/string/L3/7"
    assert load_task("procedural", task_id) == load_task("procedural", task_id)
    spec = procedural.generate("list", 2, 11)
    assert spec == procedural.generate("list", 2, 11)
    assert spec != procedural.generate("list", 2, 12)


@needs_bwrap
def test_filters_by_level_and_family():
    env = CodeExecEnv(split="dev", levels=[1], families=["string"])
    assert len(env.task_ids("dev")) == 10
    for seed in range(5):
        _, info = env.reset(seed=seed)
        assert info["task_id"].startswith("proc/string/L1/") and info["level"] == 1


# grading ----------------------------------------------------------------------------------
@needs_bwrap
def test_procedural_reference_solutions_score_one_for_every_family_and_level():
    rng = random.Random(0)
    ids = split_ids("procedural")["train"]
    env = CodeExecEnv(sandbox=FAST_SANDBOX)
    for family in procedural.FAMILIES:
        for level in procedural.LEVELS:
            task_id = rng.choice([i for i in ids if i.startswith(f"proc/{family}/L{level}/")])
            _, info = env.reset(options={"task_id": task_id})
            solution = env.unwrapped._task.reference_solution
            _, reward, terminated, truncated, info = env.step(_fence(solution))
            assert (reward, terminated, truncated) == (1.0, True, False), task_id
            assert info["success"] and info["tests_passed"] == info["tests_total"] == 4
    env.close()


@needs_bwrap
def test_wrong_solutions_score_below_one():
    task = load_task("procedural", "proc/arithmetic/L1/5")  # x * 4 + 3
    assert grade(task, task.reference_solution).reward == 1.0
    assert grade(task, "def scale_and_shift(x):\n    return 0").reward < 1.0
    assert grade(task, "def scale_and_shift(x):\n    return float(x * 4 + 3)").reward == 0.0
    assert grade(task, "this is not python").reward == 0.0


@needs_bwrap
def test_a_hostile_submission_scores_zero_without_hurting_the_host():
    task = load_task("procedural", "proc/list/L2/3")
    config = SandboxConfig(cell_timeout_s=0.5)
    for code in (
        "while True: pass",
        "import os; os.system('kill -9 -1')",
        "import os; os._exit(1)",
    ):
        result = grade(task, f"def {task.entry_point}(xs):\n    return 0\n{code}", config)
        assert result.tests_passed == 0 and result.tests_total == 4
    slow_tests = f"def {task.entry_point}(xs):\n    while True: pass"
    assert grade(task, slow_tests, config).tests_passed == 0


HUMANEVAL_SAMPLE = random.Random(4).sample(split_ids("humaneval")["test"], 20)


@needs_bwrap
@pytest.mark.parametrize("task_id", HUMANEVAL_SAMPLE)
def test_humaneval_canonical_solution_scores_one(task_id):
    task = humaneval_task(task_id)
    result = grade(task, task.reference_solution)
    assert result.success and result.reward == 1.0, result.first_failure


@needs_bwrap
@pytest.mark.slow
def test_all_164_humaneval_canonical_solutions_score_one():
    """Two gradings at a time (each is three sandboxes in a row, so one core mostly waits)."""
    from concurrent.futures import ThreadPoolExecutor

    def failure(task_id: str) -> tuple[str, str] | None:
        task = humaneval_task(task_id)
        result = grade(task, task.reference_solution)
        return None if result.success else (task_id, result.first_failure)

    task_ids = split_ids("humaneval")["test"]
    assert len(task_ids) == 164
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [found for found in pool.map(failure, task_ids) if found]
    assert not failures


@needs_bwrap
def test_humaneval_wrong_solution_scores_below_one():
    task = humaneval_task("HumanEval/0")
    assert grade(task, task.reference_solution).reward == 1.0
    always_false = "def has_close_elements(numbers, threshold):\n    return False"
    result = grade(task, always_false)
    assert 0 < result.reward < 1  # some of its asserts expect False
    assert grade(task, "").reward == 0.0  # the prompt's stub returns None
    assert task.tests_total == 7


@needs_bwrap
def test_humaneval_random_inputs_and_property_checks_grade_a_different_correct_answer():
    """HumanEval/32 checks a property (any root of the polynomial), HumanEval/38 draws unseeded
    random inputs: a correct solution unlike the canonical one still passes both."""
    bisection = (
        "def find_zero(xs):\n    lo, hi = -1e3, 1e3\n    for _ in range(200):\n"
        "        mid = (lo + hi) / 2\n"
        "        if (poly(xs, lo) > 0) == (poly(xs, mid) > 0):\n            lo = mid\n"
        "        else:\n            hi = mid\n    return lo"
    )
    assert grade(humaneval_task("HumanEval/32"), bisection).reward == 1.0
    twice = "def decode_cyclic(s):\n    return encode_cyclic(encode_cyclic(s))"
    assert grade(humaneval_task("HumanEval/38"), twice).reward == 1.0


def _graded_in_its_own_interpreter(task, code: str) -> int:
    """Tests passed when check's statements run in the submission's interpreter (the design
    HumanEval grading replaced): shows that an attack below would have worked."""
    passed = 0
    with PythonSandbox(SandboxConfig(), startup_code=task.setup_code) as box:
        assert box.run_cell(code).ok
        box.run_cell(f"{task.tests[0].code}\ncandidate = {task.entry_point}")
        for test in task.tests[1:]:
            passed += test.scored and box.run_cell(test.code).ok
    return passed


ALWAYS_EQUAL = """
class Anything:
    def __eq__(self, other):
        return True
    __ne__ = __lt__ = __gt__ = lambda self, other: False
    __bool__ = lambda self: True

def has_close_elements(numbers, threshold):
    return Anything()
"""
GC_GRADER_PATCH = """
import gc
for found in gc.get_objects():
    if type(found).__name__ == "Driver" and hasattr(found, "run_cell"):
        type(found).run_cell = lambda self, code: (None, None)

def has_close_elements(numbers, threshold):
    return None
"""
FORGED_OUTCOMES = """
import json
__eprl_codec["run_calls"] = lambda function, calls: json.dumps(
    [["ok", {"x": [1]}]] * len(json.loads(calls))  # the right count, not plain data
)

def has_close_elements(numbers, threshold):
    return None
"""


@needs_bwrap
@pytest.mark.parametrize(
    "attack", [ALWAYS_EQUAL, GC_GRADER_PATCH], ids=["always-equal-object", "gc-grader-patch"]
)
def test_humaneval_tampering_scores_zero(attack):
    task = humaneval_task("HumanEval/0")
    assert _graded_in_its_own_interpreter(task, attack) == task.tests_total  # the attack is real
    result = grade(task, attack)
    assert (result.tests_passed, result.reward) == (0, 0.0), result


@needs_bwrap
def test_humaneval_forged_outcomes_are_refused_on_the_host():
    result = grade(humaneval_task("HumanEval/0"), FORGED_OUTCOMES)
    assert result.tests_passed == 0 and "refused" in result.first_failure


def test_plain_data_round_trips_builtins_and_refuses_anything_else():
    value = [None, True, 3, -0.0, float("inf"), "é\udcff", b"\x00", (1, [2]), {(1, 2): {3}},
             frozenset({"a"}), {"k": []}]  # fmt: skip
    decoded = plain_data.loads(plain_data.dumps(value))
    assert decoded == value and [type(v) for v in decoded] == [type(v) for v in value]
    assert math.isnan(plain_data.loads(plain_data.dumps(float("nan"))))

    class Number(int):
        pass

    for foreign in (Number(1), object(), [iter([])], {"k": Number(2)}, range(3)):
        with pytest.raises(plain_data.NotPlainData, match="is not plain data"):
            plain_data.dumps(foreign)
    for text in ("1.5", '{"x": 1}', '{"f": 1}', '{"d": [[[], 1]]}', "[NaN]", "nope", '{"t": 1}'):
        with pytest.raises(plain_data.NotPlainData):
            plain_data.loads(text)


# single-turn protocol ---------------------------------------------------------------------
@needs_bwrap
def test_single_turn_episode():
    env = gymnasium.make("eprl/CodeExec-v0", sandbox=FAST_SANDBOX)
    obs, info = env.reset(options={"task_id": "proc/arithmetic/L1/5"})
    assert "```python" in obs and "scale_and_shift(x: int) -> int" in obs
    assert info == {"task_id": "proc/arithmetic/L1/5", "turn": 0, "split": info["split"],
                    "task_set": "procedural", "level": 1}  # fmt: skip
    obs, reward, terminated, truncated, info = env.step("I am not sure.")
    assert "No ```python code block" in obs and reward == 0.0 and terminated and not truncated
    assert info["tests_total"] == 4 and info["turn"] == 1 and not info["success"]
    env.reset(options={"task_id": "proc/arithmetic/L1/5"})
    unclosed = "```python\ndef scale_and_shift(x):\n    return x * 4 + 3\n"  # stop string removed
    assert env.step(unclosed)[1] == 1.0
    with pytest.raises(RuntimeError, match="reset"):
        env.step(unclosed)
    env.close()


@needs_bwrap
def test_oversized_action_truncates_the_episode():
    env = gymnasium.make("eprl/CodeExec-v0", max_action_chars=300)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(_fence("x = 1\n" * 100))
    assert truncated and not terminated and reward == 0.0
    assert info["truncation_reason"] == "action_too_long" and "over the limit of 300" in obs
    assert obs in env.observation_space
    env.close()


# multi-turn protocol ----------------------------------------------------------------------
def test_state_persists_and_a_crash_does_not_end_the_episode(multi_turn):
    obs, _ = multi_turn.reset(options={"task_id": "proc/arithmetic/L1/5"})
    assert "# submit" in obs and "4 turns" in obs
    obs, reward, terminated, truncated, info = multi_turn.step(_fence("x = 5\nprint('hi')"))
    assert obs.startswith("hi\n") and "3 turns left" in obs
    assert (reward, terminated, truncated, info["turn"]) == (0.0, False, False, 1)
    obs, *_ = multi_turn.step(_fence("print(x * 2)\n1 / 0"))
    assert obs.startswith("10\n") and "ZeroDivisionError" in obs
    obs, reward, terminated, truncated, info = multi_turn.step(
        _fence("# submit\ndef scale_and_shift(x):\n    return x * 4 + 3")
    )
    assert (reward, terminated, truncated) == (1.0, True, False)
    assert info["success"] and info["tests_passed"] == 4 and info["turn"] == 3
    assert "4/4" in obs


def test_turn_limit_grades_the_latest_definition(multi_turn):
    multi_turn.reset(options={"task_id": "proc/arithmetic/L1/5"})
    multi_turn.step(_fence("def scale_and_shift(x):\n    return x * 4 + 3"))
    obs, *_ = multi_turn.step("Let me think about it.")
    assert "No ```python code block" in obs
    multi_turn.step(_fence("def scale_and_shift(x):\n    return 0"))
    obs, reward, terminated, truncated, info = multi_turn.step(_fence("scale_and_shift(1)"))
    assert truncated and not terminated and info["truncation_reason"] == "max_turns"
    assert reward == 0.0 and info["tests_total"] == 4 and "Turn limit" in obs


def test_submit_without_definition_uses_the_latest_one(multi_turn):
    multi_turn.reset(options={"task_id": "proc/arithmetic/L1/5"})
    multi_turn.step(_fence("def scale_and_shift(x):\n    return x * 4 + 3"))
    _, reward, terminated, *_ = multi_turn.step(_fence("# submit"))
    assert terminated and reward == 1.0


def test_a_timed_out_cell_restarts_the_session(multi_turn):
    multi_turn.reset(options={"task_id": "proc/arithmetic/L1/5"})
    multi_turn.step(_fence("y = 1"))
    obs, reward, terminated, truncated, _ = multi_turn.step(_fence("while True: pass"))
    assert "session lost" in obs and "gone" in obs and not (terminated or truncated)
    obs, *_ = multi_turn.step(_fence("print(y)"))
    assert "NameError" in obs


@needs_bwrap
def test_oversized_observation_truncates_the_episode():
    env = gymnasium.make(
        "eprl/CodeExec-v0", max_turns=3, max_observation_chars=600, max_output_chars=2000
    )
    env.reset(options={"task_id": "proc/arithmetic/L1/5"})
    obs, reward, terminated, truncated, info = env.step(_fence("print('a' * 1500)"))
    assert truncated and info["truncation_reason"] == "observation_too_long"
    assert "over the observation limit of 600" in obs and len(obs) <= 600
    assert obs in env.observation_space
    env.close()


def test_observations_stay_in_the_text_space(multi_turn):
    multi_turn.reset(options={"task_id": "proc/arithmetic/L1/5"})
    obs, *_ = multi_turn.step(_fence("print('caf\\u00e9 \\u2264 \\x00')"))
    assert set(obs) <= TEXT_CHARSET and "caf\\xe9 \\u2264 \\x00" in obs
    assert obs in multi_turn.observation_space


@needs_bwrap
def test_close_leaves_no_process_behind():
    marker = 900_000 + uuid.uuid4().int % 99_999
    env = gymnasium.make("eprl/CodeExec-v0", max_turns=3, sandbox=FAST_SANDBOX)
    env.reset(seed=0)
    env.step(_fence(f"import threading, subprocess\nthreading.Timer(0.2, subprocess.Popen, "
                    f"args=(['sleep', '{marker}'],)).start()"))  # fmt: skip
    repl = env.unwrapped._repl
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not _sleeping(marker):
        time.sleep(0.05)
    assert _sleeping(marker)  # started after its cell ended: only close() can stop it
    pids = [repl.pid, *(p.pid for p in psutil.Process(repl.pid).children(recursive=True))]
    env.close()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert not _sleeping(marker)


def _sleeping(marker: int) -> bool:
    return any(
        f"sleep {marker}" in " ".join(process.info["cmdline"] or [])
        and process.info["status"] != psutil.STATUS_ZOMBIE
        for process in psutil.process_iter(["cmdline", "status"])
    )


def test_rlimits_only_mode_grades_with_a_warning(caplog):
    env = gymnasium.make("eprl/CodeExec-v0", sandbox={"mode": "rlimits-only"})
    env.reset(options={"task_id": "proc/arithmetic/L1/5"})
    with caplog.at_level(logging.WARNING, logger="envs.sandbox"):
        _, reward, *_ = env.step(_fence("def scale_and_shift(x):\n    return x * 4 + 3"))
    assert reward == 1.0
    assert any("rlimits-only" in record.getMessage() for record in caplog.records)
    env.close()


# shared text helpers (envs/text.py) -------------------------------------------------------
@pytest.mark.parametrize(
    ("action", "code"),
    [
        ("Sure:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1"),
        ("```py\nx = 1\n```", "x = 1"),
        ("```\nx = 2\n```", "x = 2"),
        ("```python\nx = 3\n", "x = 3\n"),  # unclosed: the runner stopped at the fence
        ("```text\nnot code\n```\n```python\nx = 4\n```", "x = 4"),
        ("no code here, just `inline`", None),
    ],
)
def test_extract_code_block(action, code):
    assert extract_code_block(action) == code


def test_truncate_text_and_to_charset():
    for limit in (60, 100, 1000):
        cut = truncate_text("x" * 5000, limit)
        assert len(cut) <= limit and cut.endswith("characters truncated]")
    assert truncate_text("short", 100) == "short"
    escaped = to_charset("caf\u00e9 \u2264 \U0001f600 \x00\ttab\n")
    assert escaped == "caf\\xe9 \\u2264 \\U0001f600 \\x00\ttab\n"
    assert set(escaped) <= TEXT_CHARSET
