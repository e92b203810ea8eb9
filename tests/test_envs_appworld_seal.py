"""eprl/AppWorld-v0's seal, in-process: cells that try to escape the sandbox or reach the answer
(the same through the service: test_envs_appworld_service.py). Each is contained and the next
episode starts normally.
"""

import os
import socket
import time
import uuid
from pathlib import Path

import gymnasium as gym
import psutil
import pytest
from appworld_helpers import (
    APPWORLD_MARKS,
    READ,
    REPO,
    load_scenarios,
    module_env,
    next_episode_is_normal,
    run_cell,
    sleeping,
    task_of,
)

import envs  # noqa: F401  (registers the ids)
from envs.appworld import (
    AppWorldServerError,
    sealed,
)
from envs.appworld.sealed import SANDBOX_SITE_PACKAGES

pytestmark = APPWORLD_MARKS


@pytest.fixture(scope="module")
def scenarios(appworld_root):
    return load_scenarios(appworld_root)


@pytest.fixture(scope="module")
def env(appworld_root):
    yield from module_env(appworld_root)


# ------------------------------------------------------------------ sealed: escape attempts
# Cells an agent could send. AppWorld's own guard reads the code's text (it bans `open`,
# `os.listdir`, `import socket`, ...) and swaps functions such as `os.fork`, `os.kill` or
# `Path.read_bytes` for no-ops while a cell runs; `__import__` and the `posix` module get past
# both, so each probe uses them and only the sandbox stands in the way.


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
    next_episode_is_normal(env, appworld_root, scenarios)


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
    next_episode_is_normal(env, appworld_root, scenarios)


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
        while time.monotonic() < deadline and not sleeping(marker):
            time.sleep(0.1)
        assert sleeping(marker)  # it runs, detached from the server, after its cell ended
    finally:
        environment.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and sleeping(marker):
        time.sleep(0.1)
    assert not sleeping(marker)


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
    next_episode_is_normal(env, appworld_root, scenarios)


def test_a_memory_bomb_is_contained(env, appworld_root, scenarios):
    env.reset(options={"task_id": task_of(scenarios, "address")})
    obs, *_ = run_cell(env, "x = bytearray(8 << 30)")
    assert "MemoryError" in obs, obs
    obs, *_ = run_cell(env, "chunks = []\nwhile True:\n    chunks.append(bytearray(256 << 20))")
    assert "MemoryError" in obs, obs
    obs, *_ = run_cell(env, "del chunks\nprint('alive')")
    assert obs.strip() == "alive"
    next_episode_is_normal(env, appworld_root, scenarios)


def test_a_fork_bomb_stops_at_the_process_limit_and_dies_with_the_episode(
    env, appworld_root, scenarios
):
    """Every child forks again and then sleeps: the sandbox's RLIMIT_NPROC (its own uid) stops
    the tree well below the host's limits, and ending the episode kills all of it."""
    marker = str(600_000 + uuid.uuid4().int % 99_999)
    _, info = env.reset(options={"task_id": task_of(scenarios, "address")})
    # straight to /execute: at the limit the server cannot start a thread for the env's
    # /task_completed check either (HTTP 500, the episode is lost), so it is not asked
    obs = env.unwrapped.server.call(
        "execute",
        timeout_s=120,
        task_id=info["task_id"],
        code="P = __import__('posix')\nmade, why = 0, 'no limit'\nfor _ in range(500):\n"
        "    try:\n        pid = P.fork()\n    except OSError as error:\n"
        "        why = type(error).__name__\n        break\n"
        "    if pid == 0:\n        try:\n            P.fork()\n        except OSError:\n"
        f"            pass\n        P.execv('/bin/sleep', ['sleep', '{marker}'])\n"
        "    made += 1\nprint('made', made, why)",
    )
    made, why = obs.split("made ", 1)[1].split()[:2]
    limit = sealed.SERVER_LIMITS.max_processes
    assert why == "BlockingIOError" and 0 < int(made) < limit, obs
    sleepers = sum(
        (p.info["cmdline"] or [])[-1:] == [marker] for p in psutil.process_iter(["cmdline"])
    )
    assert 0 < sleepers <= limit  # the whole tree, children and grandchildren, under the limit
    next_episode_is_normal(env, appworld_root, scenarios)  # ends the bomb's episode first
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sleeping(marker):
        time.sleep(0.1)
    assert not sleeping(marker)


def test_a_planted_link_reads_nothing_and_is_not_collected(env, appworld_root, scenarios):
    """Links a cell plants in its writable area (beside its saved state, at its top, in /tmp)
    to the host's copy of the answer, to the evaluator's view of it and to the ground-truth
    folder lead nowhere inside the sandbox: the episode is graded on what it did."""
    task_id = task_of(scenarios, "address")
    host_answer = appworld_root / "data" / "tasks" / task_id / "ground_truth" / "answer.json"
    env.reset(options={"task_id": task_id})
    experiment = env.unwrapped.experiment_name
    # beside the saved state: AppWorld itself empties dbs/ before each save, see the next test
    dbs = f"/aw/experiments/outputs/{experiment}"
    obs, *_ = run_cell(
        env,
        READ
        + f"targets = [{str(host_answer)!r}, '/aw/data/tasks/{task_id}/ground_truth/answer.json',\n"
        f"           {str(appworld_root / 'data' / 'tasks' / task_id / 'ground_truth')!r}]\n"
        "for n, target in enumerate(targets):\n"
        f"    for place in ['{dbs}', '/aw/experiments', '/tmp']:\n"
        "        link = f'{place}/leak{n}.jsonl'\n        P.symlink(target, link)\n"
        "        try:\n            read(link); print('READ', link)\n"
        "        except OSError as error:\n            print('nothing', type(error).__name__)\n"
        f"print('planted', sorted(e.name for e in P.scandir('{dbs}') if e.name.startswith('leak')))",
    )
    assert "READ" not in obs and obs.count("nothing") == 9, obs
    assert "planted ['leak0.jsonl', 'leak1.jsonl', 'leak2.jsonl']" in obs, obs
    obs, reward, terminated, _, info = run_cell(
        env, "apis.supervisor.complete_task(answer='no idea')"
    )
    assert terminated and (info["tests_passed"], info["tests_total"], reward) == (1, 2, 0.5)
    next_episode_is_normal(env, appworld_root, scenarios)


def test_collecting_saved_state_copies_regular_files_only(tmp_path):
    """The host side of the planted-link case, on a server directory laid out by hand: links in
    the saved ``dbs/`` are skipped, and a link in place of a directory is refused."""
    secret = tmp_path / "secret.json"
    secret.write_text("the answer")
    server, inbox = tmp_path / "server", tmp_path / "inbox"
    dbs = server / "experiments" / "outputs" / "run" / "tasks" / "t_1" / "dbs"
    dbs.mkdir(parents=True)
    (dbs / "spotify.jsonl").write_text("real state")
    (dbs / "answer.jsonl").symlink_to(secret)
    sealed.collect_saved_state(server, inbox, "t_1", "run")
    copied = inbox / "experiments" / "outputs" / "run" / "tasks" / "t_1" / "dbs"
    assert sorted(p.name for p in copied.iterdir()) == ["spotify.jsonl"]
    assert (copied / "spotify.jsonl").read_text() == "real state"
    linked = server / "experiments" / "outputs" / "linked" / "tasks" / "t_1"
    linked.mkdir(parents=True)
    (linked / "dbs").symlink_to(secret.parent)
    with pytest.raises(FileNotFoundError, match="saved no state for t_1"):
        sealed.collect_saved_state(server, inbox, "t_1", "linked")
