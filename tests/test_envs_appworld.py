"""eprl/AppWorld-v0 against the real AppWorld engine (isolated venv, over HTTP), on generated data:
the data, `eprl appworld setup`, scoring, the protocol, clear errors. The seal's escape tests are
in test_envs_appworld_seal.py, the pool's sharing and cleanup in test_envs_appworld_pool.py.
"""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import gymnasium as gym
import pytest
from appworld_helpers import (
    APPWORLD_MARKS,
    REPO,
    gone,
    load_scenarios,
    module_env,
    run_cell,
    solution_action,
    task_of,
)

import envs  # noqa: F401  (registers the ids)
from envs.appworld import (
    AppWorldEnv,
    AppWorldRuntimeError,
    AppWorldServerError,
    catalogue,
)
from envs.appworld import cli as appworld_cli

pytestmark = APPWORLD_MARKS


@pytest.fixture(scope="module")
def scenarios(appworld_root):
    return load_scenarios(appworld_root)


@pytest.fixture(scope="module")
def env(appworld_root):
    yield from module_env(appworld_root)


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


def _release_host_resolves() -> bool:
    try:
        socket.getaddrinfo(appworld_cli.RELEASE_HOST, 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(
    _release_host_resolves(),
    reason=f"{appworld_cli.RELEASE_HOST} resolves here, so `eprl appworld setup` would download "
    "AppWorld's release instead of failing; this test runs on machines without that route",
)
def test_setup_says_clearly_that_the_release_cannot_be_downloaded_and_changes_nothing(tmp_path):
    """The real command (`eprl appworld setup`, which runs `appworld download data`) on a
    machine with no route to AppWorld's data host."""
    root = tmp_path / "aw"
    done = subprocess.run(
        [sys.executable, "-m", "eprl", "appworld", "setup", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"AppWorld's data host ({appworld_cli.RELEASE_HOST}) cannot be reached" in done.stdout
    assert "make-data --out" in done.stdout and f"Nothing was changed under {root}" in done.stdout
    assert not root.exists() and list(tmp_path.iterdir()) == []  # no staging folder left


def test_setup_keeps_data_already_there_and_names_it(appworld_root, capsys):
    assert appworld_cli.setup(root=str(appworld_root)) == 0
    out = capsys.readouterr().out
    assert "already holds appworld-generated data; nothing downloaded" in out
    assert "not AppWorld's benchmark" in out
    assert (appworld_root / "data" / "eprl_generated.json").is_file()


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


def test_doing_the_task_and_deleting_an_unrelated_note_scores_below_one(
    env, appworld_root, scenarios
):
    task_id = task_of(scenarios, "noteappend")
    env.reset(options={"task_id": task_id})
    obs, *_ = run_cell(
        env,
        "passwords = {a['account_name']: a['password'] for a in apis.supervisor.show_account_passwords()}\n"
        "token = apis.simple_note.login(username=apis.supervisor.show_profile()['email'],\n"
        "    password=passwords['simple_note'])['access_token']\n"
        "notes = apis.simple_note.search_notes(access_token=token, page_limit=20)\n"
        "other = next(n for n in notes if n['title'] != 'Team Meeting Notes')\n"
        "apis.simple_note.delete_note(note_id=other['note_id'], access_token=token)\n"
        "print('deleted', other['title'])",
    )
    assert "deleted" in obs, obs
    obs, reward, terminated, _, info = env.step(solution_action(appworld_root, task_id))
    assert terminated and not info["success"] and 0 < reward < 1.0, (reward, info)


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


def test_the_worked_example_is_off_by_default_and_every_cell_of_it_runs(
    env, appworld_root, scenarios
):
    """``demonstration=True`` puts our worked episode between the rules and the task; its cells
    run unchanged against the real engine (no failing call is taught); an episode the agent
    cuts (``truncate``, as at a full context) is still graded: the tests on its last state."""
    from envs.appworld import demonstration

    task_id = task_of(scenarios, "address")
    plain, info = env.reset(options={"task_id": task_id})
    assert "Example task:" not in plain and info["data"] == "appworld-generated"
    shown = gym.make("eprl/AppWorld-v0", root=str(appworld_root), max_servers=2, demonstration=True)
    try:
        prompt, _ = shown.reset(options={"task_id": task_id})
        assert prompt.index("You are an autonomous agent") < prompt.index("Example task:")
        assert prompt.index("End of the example.") < prompt.index("Supervisor:")
        assert prompt.rindex("Task:") > prompt.index("End of the example.")
        assert all(code in prompt for code in demonstration.cells())
        outputs = [run_cell(shown, code)[0] for code in demonstration.cells()[:-1]]
        assert not any("Execution failed" in out for out in outputs), outputs
        assert outputs[2].strip() == "logged in" and outputs[3].split()[0].isdigit(), outputs
        reward, info = shown.unwrapped.truncate("context_limit")
        assert info["truncation_reason"] == "context_limit" and not info["success"]
        assert (info["tests_passed"], info["tests_total"], reward) == (1, 2, 0.5)
        with pytest.raises(RuntimeError, match="reset"):
            shown.unwrapped.truncate()
    finally:
        shown.close()


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


def test_close_leaves_no_process_behind(env):
    """Runs last among the env tests: closing the module's environment stops its servers."""
    env.reset()
    runtime = env.unwrapped.runtime
    pids, workdir = runtime.pids(), runtime.workdir
    assert pids and workdir.is_dir() and (workdir / "shared" / "base_dbs").is_dir()
    env.close()
    assert all(gone(pid) for pid in pids) and not workdir.exists()
    assert runtime.pids() == []
    env.close()  # idempotent


@pytest.mark.slow
def test_generation_is_reproducible(appworld_root, tmp_path):
    assert appworld_cli.make_data(out=str(tmp_path), seed=0) == 0
    first, second = appworld_root / "data", tmp_path / "data"
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
