"""eprl/AppWorld-v0 against the real AppWorld engine (isolated venv, over HTTP), on generated data.

The dataset is generated once per session (``eprl appworld make-data``) into a temporary root;
one environment module-wide keeps a warm server so most tests pay ~0.5 s per episode.
"""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import gymnasium as gym
import psutil
import pytest

import envs  # noqa: F401  (registers the ids)
from envs.appworld import AppWorldEnv, AppWorldRuntimeError, AppWorldServerError, catalogue
from envs.appworld import cli as appworld_cli
from envs.appworld.runtime import resolve_python
from envs.appworld.sealed import SANDBOX_SITE_PACKAGES

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


# ------------------------------------------------------------------ sealed: escape attempts
# Cells an agent could send. AppWorld's own guard reads the code's text (it bans `open`,
# `os.listdir`, `import socket`, ...) and swaps functions such as `os.fork`, `os.kill` or
# `Path.read_bytes` for no-ops while a cell runs; `__import__` and the `posix` module get past
# both, so each probe uses them and only the sandbox stands in the way.
READ = "P = __import__('posix')\ndef read(path):\n    fd = P.open(path, P.O_RDONLY)\n    return P.read(fd, 1 << 20)\n"


def _next_episode_is_normal(env, root: Path, scenarios) -> None:
    task_id = task_of(scenarios, "venmopay", 3)
    env.reset(options={"task_id": task_id})
    obs, reward, terminated, truncated, info = env.step(solution_action(root, task_id))
    assert (reward, terminated, info["success"]) == (1.0, True, True), obs[-500:]


def test_sealed_cells_reach_no_host_socket(env, appworld_root, scenarios):
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0eprl-probe-{uuid.uuid4().hex}")
    abstract.listen(1)
    for sock in (tcp, udp, abstract):
        sock.setblocking(False)
    env.reset(options={"task_id": task_of(scenarios, "address")})
    obs, *_ = run_cell(
        env,
        f"s = __import__('socket')\n"
        f"for family, kind, address in [(s.AF_INET, s.SOCK_STREAM, ('127.0.0.1', {tcp.getsockname()[1]})),\n"
        f"        (s.AF_UNIX, s.SOCK_STREAM, {abstract.getsockname()!r})]:\n"
        "    try:\n        s.socket(family, kind).connect(address); print('CONNECTED', address)\n"
        "    except OSError as error:\n        print('refused', type(error).__name__)\n"
        f"s.socket(s.AF_INET, s.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp.getsockname()[1]}))\n"
        "print('interfaces', [name for _, name in s.if_nameindex()])",
    )
    assert "CONNECTED" not in obs and obs.count("refused") == 2, obs
    assert "interfaces ['lo']" in obs, obs  # a network namespace of its own
    for accept in (tcp.accept, abstract.accept, lambda: udp.recvfrom(10)):
        with pytest.raises(BlockingIOError):
            accept()
    for sock in (tcp, udp, abstract):
        sock.close()
    _next_episode_is_normal(env, appworld_root, scenarios)


def test_sealed_cells_see_no_host_secret_and_no_host_process(appworld_root, scenarios, monkeypatch):
    secret = f"eprl-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("EPRL_PROBE_SECRET", secret)  # before this env's own server starts
    environment = gym.make("eprl/AppWorld-v0", root=str(appworld_root), max_servers=1)
    try:
        environment.reset(options={"task_id": task_of(scenarios, "address")})
        obs, *_ = run_cell(
            environment,
            READ + "o = __import__('os')\n"
            "pids = sorted(int(e.name) for e in P.scandir('/proc') if e.name.isdigit())\n"
            "blobs = [read(f'/proc/{pid}/environ') for pid in pids]\n"
            f"print('leak' if any({secret[::-1]!r}[::-1].encode() in b for b in blobs) else 'clean')\n"
            "print('keys', sorted(o.environ))\nprint('pids', pids)\n"
            f"try:\n    P.kill({os.getpid()}, 0); print('SIGNALLED')\n"
            "except OSError as error:\n    print('no such process:', type(error).__name__)",
        )
        assert secret not in obs and "clean" in obs, obs
        keys = eval(obs.split("keys ", 1)[1].splitlines()[0])
        assert set(keys) <= {"APPWORLD_CACHE", "APPWORLD_ROOT", "HOME", "LANG", "PATH", "PWD"}
        pids = eval(obs.split("pids ", 1)[1].splitlines()[0])
        assert len(pids) <= 3, pids  # bwrap's init and the server: a pid namespace of its own
        assert "SIGNALLED" not in obs and "ProcessLookupError" in obs, obs
    finally:
        environment.close()


def test_sealed_cells_cannot_read_the_ground_truth_or_host_files(env, appworld_root, scenarios):
    task_id, written = task_of(scenarios, "address"), uuid.uuid4().hex
    library = SANDBOX_SITE_PACKAGES  # AppWorld's code (where the sandbox sees it), not its data
    env.reset(options={"task_id": task_id})
    obs, *_ = run_cell(
        env,
        READ + f"for path in ['/aw/data/tasks/{task_id}/ground_truth/answer.json',\n"
        f"             {str(appworld_root / 'data' / 'tasks' / task_id / 'ground_truth' / 'answer.json')!r},\n"
        f"             {str(REPO / 'envs' / 'appworld' / 'env.py')!r}, '/etc/passwd', '/root']:\n"
        "    try:\n        read(path); print('READ', path)\n"
        "    except OSError as error:\n        print('absent', type(error).__name__, path)\n"
        "found, todo = [], ['/']\nwhile todo:\n    top = todo.pop()\n"
        "    for entry in P.scandir(top):\n"
        f"        if entry.path in ('/proc', '/sys', '/usr', {library!r}):\n            continue\n"
        "        if 'ground_truth' in entry.name or entry.name in ('answer.json', 'solution.py',\n"
        "                'evaluation.py', 'private_data.json'):\n            found.append(entry.path)\n"
        "        if entry.is_dir(follow_symlinks=False):\n            todo.append(entry.path)\n"
        "print('found', found)\nprint('tasks', sorted(e.name for e in P.scandir('/aw/data/tasks')))\n"
        f"fd = P.open('/tmp/{written}', P.O_WRONLY | P.O_CREAT)\nP.write(fd, b'x'); print('wrote /tmp')",
    )
    assert "READ" not in obs and obs.count("absent") == 5, obs
    assert "found []" in obs and f"tasks ['{task_id}']" in obs, obs
    assert "wrote /tmp" in obs and not (Path("/tmp") / written).exists()  # a private /tmp
    obs, reward, terminated, _, info = run_cell(  # the only way to an answer is the task itself
        env, "apis.supervisor.complete_task(answer=globals().get('answer'))"
    )
    assert terminated and (info["tests_passed"], info["tests_total"], reward) == (1, 2, 0.5)
    _next_episode_is_normal(env, appworld_root, scenarios)


def test_a_daemon_does_not_survive_close(appworld_root, scenarios):
    marker = str(800_000 + uuid.uuid4().int % 99_999)
    environment = gym.make("eprl/AppWorld-v0", root=str(appworld_root), max_servers=1)
    try:
        environment.reset(options={"task_id": task_of(scenarios, "address")})
        run_cell(
            environment,
            "P = __import__('posix')\nif P.fork() == 0:\n    P.setsid()\n"
            f"    if P.fork() == 0:\n        P.execv('/bin/sleep', ['sleep', '{marker}'])\n"
            "    P._exit(0)",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _sleeping(marker):
            time.sleep(0.1)
        assert _sleeping(marker)  # it runs, detached from the server, after its cell ended
    finally:
        environment.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _sleeping(marker):
        time.sleep(0.1)
    assert not _sleeping(marker)


def _sleeping(marker: str) -> bool:
    return any(
        (process.info["cmdline"] or [])[-1:] == [marker]
        for process in psutil.process_iter(["cmdline"])
    )


def test_alarm_off_and_a_loop_are_stopped_from_outside(env, appworld_root, scenarios):
    environment = gym.make(
        "eprl/AppWorld-v0",
        root=str(appworld_root),
        max_servers=2,  # the module's pool
        cell_timeout_s=2,
        request_margin_s=3.0,
    )
    try:
        environment.reset(options={"task_id": task_of(scenarios, "address")})
        victim = environment.unwrapped.server.process
        started = time.monotonic()
        with pytest.raises(AppWorldServerError, match="did not answer /execute"):
            run_cell(environment, "__import__('signal').alarm(0)\nwhile True:\n    pass")
        assert time.monotonic() - started < 20 and victim.poll() is not None
    finally:
        environment.close()
    _next_episode_is_normal(env, appworld_root, scenarios)


def test_a_memory_bomb_is_contained(env, appworld_root, scenarios):
    env.reset(options={"task_id": task_of(scenarios, "address")})
    obs, *_ = run_cell(env, "x = bytearray(8 << 30)")
    assert "MemoryError" in obs, obs
    obs, *_ = run_cell(env, "chunks = []\nwhile True:\n    chunks.append(bytearray(256 << 20))")
    assert "MemoryError" in obs, obs
    obs, *_ = run_cell(env, "del chunks\nprint('alive')")
    assert obs.strip() == "alive"
    _next_episode_is_normal(env, appworld_root, scenarios)


# ------------------------------------------------------------------ no process left behind


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_dropped_env_and_interpreter_exit_leave_no_process_behind(appworld_root, scenarios):
    """An env dropped mid-episode gives its server back (a sealed server runs one episode, so
    it is stopped and its slot refilled); at exit the unclosed pool (a spare too) goes too."""
    script = textwrap.dedent(f"""
        import gc, gymnasium as gym, psutil, envs
        task = {{"task_id": {task_of(scenarios, "address")!r}}}
        dropped = gym.make("eprl/AppWorld-v0", root={str(appworld_root)!r}, max_servers=1)
        kept = gym.make("eprl/AppWorld-v0", root={str(appworld_root)!r}, max_servers=1)
        dropped.reset(options=task)
        runtime = kept.unwrapped.runtime  # the same shared pool
        pid = dropped.unwrapped.server.process.pid
        del dropped
        gc.collect()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
        server = runtime.acquire(timeout_s=120)  # the pool's only slot is free again
        runtime.release(server)
        kept.reset(options=task)
        print(",".join(map(str, runtime.pids())), runtime.workdir, flush=True)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode == 0, result.stderr[-2000:]
    pids, workdir = result.stdout.split()
    pids = [int(pid) for pid in pids.split(",")]  # the kept env's server, maybe a spare
    deadline = time.monotonic() + 10
    while not all(map(_gone, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(map(_gone, pids)) and not Path(workdir).exists()


def test_close_leaves_no_process_behind(env):
    """Runs last among the env tests: closing the module's environment stops its servers."""
    env.reset()
    runtime = env.unwrapped.runtime
    pids, workdir = runtime.pids(), runtime.workdir
    assert pids and workdir.is_dir() and (workdir / "shared" / "base_dbs").is_dir()
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
