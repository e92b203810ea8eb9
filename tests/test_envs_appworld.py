"""eprl/AppWorld-v0 against the real AppWorld engine (isolated venv, over HTTP), on generated data.

The dataset is generated once per session (``eprl appworld make-data``) into a temporary root;
one environment module-wide keeps a warm server so most tests pay ~0.5 s per episode.
"""

import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import gymnasium as gym
import psutil
import pytest

import envs  # noqa: F401  (registers the ids)
from envs.appworld import AppWorldEnv, AppWorldRuntimeError, AppWorldServerError, catalogue
from envs.appworld import cli as appworld_cli
from envs.appworld.runtime import resolve_python

REPO = Path(__file__).resolve().parents[1]

try:
    resolve_python()
    HAVE_APPWORLD = True
except AppWorldRuntimeError:
    HAVE_APPWORLD = False

pytestmark = [
    pytest.mark.appworld,
    pytest.mark.skipif(
        not HAVE_APPWORLD,
        reason="needs the AppWorld venv (.venv-appworld): run `make setup` "
        "or set EPRL_APPWORLD_VENV",
    ),
]


@pytest.fixture(scope="module")
def scenarios(appworld_root) -> dict[str, dict]:
    """scenario id -> {name, difficulty, apps, split} as written by the generator."""
    return json.loads((appworld_root / "data" / "eprl_generated.json").read_text())["scenarios"]


def task_of(scenarios: dict, name: str, n: int = 1) -> str:
    return next(f"{sid}_{n}" for sid, meta in scenarios.items() if meta["name"] == name)


@pytest.fixture(scope="module")
def env(appworld_root):
    """One environment for the module: its (shared) server pool stays warm between tests."""
    environment = gym.make("eprl/AppWorld-v0", root=str(appworld_root), max_servers=2)
    yield environment
    environment.close()


def solution_action(root: Path, task_id: str) -> str:
    code = (root / "data" / "tasks" / task_id / "ground_truth" / "solution.py").read_text()
    return f"I will run the reference solution.\n```python\n{code}\nsolution(apis, requester)\n```"


def run_cell(env, code: str):
    return env.step(f"```python\n{code}\n```")


# ------------------------------------------------------------------ data


def test_generated_data_has_appworld_layout(appworld_root, scenarios):
    data = appworld_root / "data"
    assert sorted(p.stem for p in (data / "base_dbs").glob("*.db")) == sorted(
        [
            "admin",
            "amazon",
            "api_docs",
            "file_system",
            "gmail",
            "phone",
            "simple_note",
            "splitwise",
            "spotify",
            "supervisor",
            "todoist",
            "venmo",
        ]
    )
    assert (data / "api_docs" / "standard" / "spotify.json").is_file()
    splits = {
        s: (data / "datasets" / f"{s}.txt").read_text().split()
        for s in ("train", "dev", "test_normal", "test_challenge")
    }
    all_ids = [t for ids in splits.values() for t in ids]
    assert 24 <= len(all_ids) <= 40 and len(set(all_ids)) == len(all_ids)
    assert all(t.count("_") == 1 for t in all_ids)
    assert {meta["difficulty"] for meta in scenarios.values()} == {1, 2, 3}
    assert {app for meta in scenarios.values() for app in meta["apps"]} >= {
        "phone",
        "simple_note",
        "spotify",
        "venmo",
    }
    for task_id in all_ids:  # three tasks per scenario, AppWorld's ground-truth files
        ground_truth = data / "tasks" / task_id / "ground_truth"
        for name in (
            "evaluation.py",
            "solution.py",
            "test_data.json",
            "answer.json",
            "metadata.json",
        ):
            assert (ground_truth / name).is_file(), (task_id, name)
    assert {t.split("_")[1] for t in all_ids} == {"1", "2", "3"}


# ------------------------------------------------------------------ scoring through the real engine


def test_reference_solutions_score_one_for_every_scenario(env, appworld_root, scenarios):
    """One task of every scenario (all apps, all three levels), variants 1..3 in turn."""
    failures = []
    for index, (scenario_id, meta) in enumerate(sorted(scenarios.items())):
        task_id = f"{scenario_id}_{index % 3 + 1}"
        obs, info = env.reset(options={"task_id": task_id})
        assert info["scenario_id"] == scenario_id and info["turn"] == 0
        obs, reward, terminated, truncated, info = env.step(solution_action(appworld_root, task_id))
        if not (reward == 1.0 and terminated and not truncated and info["success"]):
            failures.append((meta["name"], task_id, obs[-500:], info))
        assert info["tests_passed"] == info["tests_total"] or failures
    assert not failures, failures


def test_wrong_answer_scores_partially(env, scenarios):
    task_id = task_of(scenarios, "address")
    env.reset(options={"task_id": task_id})
    obs, reward, terminated, truncated, info = run_cell(
        env, "apis.supervisor.complete_task(answer='no idea')"
    )
    assert terminated and not truncated
    assert (info["success"], info["tests_passed"], info["tests_total"]) == (False, 1, 2)
    assert reward == 0.5
    assert info["failed_tests"] == ["The answer given when completing the task is correct."]


def test_missing_state_change_scores_only_no_op_tests(env, scenarios):
    env.reset(options={"task_id": task_of(scenarios, "venmopay")})
    obs, reward, terminated, truncated, info = run_cell(env, "apis.supervisor.complete_task()")
    assert terminated and not info["success"]
    assert (info["tests_passed"], info["tests_total"]) == (
        1,
        4,
    )  # only "nothing else changed" holds
    assert reward == 0.25


def test_crash_then_recover(env, appworld_root, scenarios):
    task_id = task_of(scenarios, "venmopay", 2)
    obs, info = env.reset(options={"task_id": task_id})
    assert "apis.supervisor.complete_task" in obs and "Task:" in obs
    obs, reward, terminated, truncated, info = run_cell(
        env, "apis.venmo.show_account(access_token='bad')"
    )
    assert "Execution failed" in obs and (reward, terminated, truncated) == (0.0, False, False)
    obs, *_ = run_cell(env, "def broken(:")
    assert "Syntax error" in obs
    obs, reward, terminated, truncated, info = env.step("Let me think about it first.")
    assert "No Python code block" in obs and info["turn"] == 3 and not terminated
    obs, reward, terminated, truncated, info = run_cell(env, "x = 41\nprint(x + 1)")
    assert obs.strip() == "42"
    obs, reward, terminated, truncated, info = env.step(solution_action(appworld_root, task_id))
    assert (reward, terminated, info["success"], info["turn"]) == (1.0, True, True, 5)


def test_turn_limit_and_oversized_output_and_action(appworld_root, scenarios):
    task_id = task_of(scenarios, "address", 2)
    environment = gym.make(
        "eprl/AppWorld-v0",
        root=str(appworld_root),
        max_servers=2,
        max_turns=2,
        max_observation_chars=1000,
        max_action_chars=5000,
    )
    try:
        environment.reset(options={"task_id": task_id})
        obs, reward, terminated, truncated, info = run_cell(environment, "print('x' * 50000)")
        assert len(obs) <= 1000 and "truncated]" in obs and not truncated
        obs, reward, terminated, truncated, info = run_cell(environment, "print('still here')")
        assert truncated and not terminated and info["truncation_reason"] == "max_turns"
        assert (info["tests_passed"], info["tests_total"], reward) == (
            1,
            2,
            0.5,
        )  # graded on the final state
        with pytest.raises(RuntimeError, match="reset"):
            run_cell(environment, "print(1)")
        environment.reset(options={"task_id": task_id})
        obs, reward, terminated, truncated, info = run_cell(environment, "#" * 6000)
        assert truncated and info["truncation_reason"] == "action_too_long" and "5000" in obs
    finally:
        environment.close()


def test_check_env_with_a_fixed_task(appworld_root, scenarios):
    from gymnasium.utils.env_checker import check_env

    environment = AppWorldEnv(
        task_id=task_of(scenarios, "birthday"), root=str(appworld_root), max_servers=2
    )
    try:
        check_env(environment, skip_render_check=True)
    finally:
        environment.close()


def test_splits_task_ids_and_catalogue(env, appworld_root, monkeypatch):
    unwrapped = env.unwrapped
    assert unwrapped.splits == ["train", "dev", "test_normal", "test_challenge"]
    assert len(unwrapped.task_ids("test_normal")) == 9
    _, info = env.reset(seed=7)
    assert info["task_id"] in unwrapped.task_ids("train") and info["split"] == "train"
    monkeypatch.setenv("APPWORLD_ROOT", str(appworld_root))
    (entry,) = catalogue()
    assert entry["env_id"] == "eprl/AppWorld-v0" and entry["splits"]["train"] == 15
    assert entry["kwargs"] == {"root": str(appworld_root)}


# ------------------------------------------------------------------ clear errors


def test_bad_task_id_and_bad_split(env, appworld_root):
    with pytest.raises(ValueError, match="unknown AppWorld task id 'nope_1'"):
        env.reset(options={"task_id": "nope_1"})
    with pytest.raises(ValueError, match="unknown AppWorld split 'validation'"):
        env.unwrapped.task_ids("validation")
    with pytest.raises(ValueError, match="unknown AppWorld split 'validation'.*test_normal"):
        gym.make("eprl/AppWorld-v0", root=str(appworld_root), split="validation")


def test_unreachable_runtime(appworld_root, tmp_path):
    with pytest.raises(AppWorldRuntimeError, match="no AppWorld data under .*make-data"):
        gym.make("eprl/AppWorld-v0", root=str(tmp_path))
    missing_venv = gym.make(
        "eprl/AppWorld-v0", root=str(appworld_root), python=str(tmp_path / "no-venv")
    )
    with pytest.raises(AppWorldRuntimeError, match="venv's python was not found.*make setup"):
        missing_venv.reset()
    missing_venv.close()
    nobody = gym.make(
        "eprl/AppWorld-v0", root=str(appworld_root), server_urls=["http://127.0.0.1:9"]
    )
    with pytest.raises(AppWorldRuntimeError, match="unreachable"):
        nobody.reset()
    nobody.close()


def test_killed_server_fails_its_episode_and_the_next_episode_works(env, appworld_root, scenarios):
    task_id = task_of(scenarios, "noteappend")
    env.reset(options={"task_id": task_id})
    run_cell(env, "print('before the crash')")
    victim = env.unwrapped.server.process
    os.killpg(victim.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(AppWorldServerError, match=f"task {task_id}, turn 2"):
        run_cell(env, "print('after the crash')")
    assert time.monotonic() - started < 30  # an error, not a hang
    assert victim.poll() is not None
    with pytest.raises(RuntimeError, match="reset"):
        run_cell(env, "print(1)")
    env.reset(options={"task_id": task_id})
    assert env.unwrapped.server.process.pid != victim.pid
    obs, reward, terminated, truncated, info = env.step(solution_action(appworld_root, task_id))
    assert reward == 1.0 and terminated


class _HangingServer(http.server.BaseHTTPRequestHandler):
    """Answers like an AppWorld server, except that /execute never returns (a hung world)."""

    release = threading.Event()

    def log_message(self, *args):
        pass

    def _reply(self, payload):
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._reply({"message": "hello"})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/execute":
            self.release.wait(60)
        supervisor = {"first_name": "A", "last_name": "B", "email": "a@b.c", "phone_number": "1"}
        self._reply(
            {
                "output": {
                    "task_id": request["task_id"],
                    "instruction": "Hang.",
                    "supervisor": supervisor,
                    "datetime": "2023-05-18T12:00:00",
                }
            }
        )


def test_hung_server_fails_the_episode_quickly(appworld_root, scenarios):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HangingServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    environment = gym.make(
        "eprl/AppWorld-v0",
        root=str(appworld_root),
        cell_timeout_s=1,
        request_margin_s=1.0,
        server_urls=[f"http://127.0.0.1:{httpd.server_port}"],
    )
    try:
        task_id = task_of(scenarios, "address")
        environment.reset(options={"task_id": task_id})
        started = time.monotonic()
        with pytest.raises(
            AppWorldServerError, match=f"did not answer /execute for task {task_id} within 2s"
        ):
            run_cell(environment, "print(1)")
        assert time.monotonic() - started < 10
        environment.reset(options={"task_id": task_id})  # the URL is usable again once it answers
    finally:
        _HangingServer.release.set()
        environment.close()
        httpd.shutdown()


# ------------------------------------------------------------------ no process left behind


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_dropped_env_and_interpreter_exit_leave_no_process_behind(appworld_root, scenarios):
    """An env dropped mid-episode gives its server back; at exit the unclosed pool goes too."""
    script = textwrap.dedent(f"""
        import gc, gymnasium as gym, envs
        task = {{"task_id": {task_of(scenarios, "address")!r}}}
        dropped = gym.make("eprl/AppWorld-v0", root={str(appworld_root)!r}, max_servers=1)
        kept = gym.make("eprl/AppWorld-v0", root={str(appworld_root)!r}, max_servers=1)
        dropped.reset(options=task)
        runtime = kept.unwrapped.runtime  # the same shared pool
        (pid,) = runtime.pids()
        del dropped
        gc.collect()
        server = runtime.acquire(timeout_s=5)  # the pool's only server is free again
        assert server.process.pid == pid
        runtime.release(server)
        kept.reset(options=task)
        print(pid, runtime.workdir, flush=True)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-2000:]
    pid, workdir = result.stdout.split()
    deadline = time.monotonic() + 10
    while not _gone(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _gone(int(pid)) and not Path(workdir).exists()


def test_close_leaves_no_process_behind(env):
    """Runs last among the env tests: closing the module's environment stops its servers."""
    env.reset()
    runtime = env.unwrapped.runtime
    pids, workdir = runtime.pids(), runtime.workdir
    assert pids and workdir.is_dir() and (workdir / "data").is_symlink()
    env.close()
    assert all(_gone(pid) for pid in pids) and not workdir.exists()
    assert runtime.pids() == []
    env.close()  # idempotent


@pytest.mark.slow
def test_generation_is_reproducible(appworld_root, tmp_path):
    assert appworld_cli.make_data(out=str(tmp_path), seed=0) == 0
    first, second = appworld_root / "data", tmp_path / "data"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
