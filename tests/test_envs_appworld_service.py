"""Escape attempts against eprl/AppWorld-v0 through the service: ``eprl serve`` (the real
uvicorn app on loopback, ``tests/serving_server.py``) and ``eprl/Remote-v0`` as the client.

Whoever holds the service's token can send any cell, so every probe of the in-process tests
that matters on a service host is repeated here: the service's own loopback port, the token in
the service's environment (``/proc/<pid>/environ``), the ground truth by path and by walk, a
daemon outliving the session, and signals to the service. After each, the next episode on the
same service scores the reference solution 1.0.
"""

import json
import os
import socket
import time
import uuid
from pathlib import Path

import gymnasium
import httpx
import psutil
import pytest
from serving_server import running_service

import envs  # noqa: F401  (registers the ids)
from envs.appworld import AppWorldRuntimeError
from envs.appworld.runtime import resolve_python
from envs.appworld.sealed import SANDBOX_SITE_PACKAGES

APPWORLD = "eprl/AppWorld-v0"
REPO = Path(__file__).resolve().parents[1]

try:
    resolve_python()
    MISSING = None
except AppWorldRuntimeError:
    MISSING = "needs the AppWorld venv (.venv-appworld): run `make setup` or set EPRL_APPWORLD_VENV"

pytestmark = [
    pytest.mark.appworld,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]

# As in tests/test_envs_appworld.py: `__import__` and `posix` get past AppWorld's own code guard,
# so only the sandbox stands in the way.
READ = "P = __import__('posix')\ndef read(path):\n    fd = P.open(path, P.O_RDONLY)\n    return P.read(fd, 1 << 20)\n"
TOKEN = f"eprl-service-token-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def scenarios(appworld_root) -> dict[str, dict]:
    return json.loads((appworld_root / "data" / "eprl_generated.json").read_text())["scenarios"]


def task_of(scenarios: dict, name: str, n: int = 1) -> str:
    return next(f"{sid}_{n}" for sid, meta in scenarios.items() if meta["name"] == name)


@pytest.fixture(scope="module")
def service(appworld_root, tmp_path_factory):
    """One service for the module; the token lives in its environment, as `EPRL_TOKEN=...
    eprl serve` leaves it, so /proc/<service pid>/environ holds it for the service's life."""
    pinned = {APPWORLD: {"root": str(appworld_root), "python": None, "server_urls": None}}
    with running_service(
        tmp_path_factory.mktemp("service"),
        environ={"EPRL_TOKEN": TOKEN},
        pinned_env_kwargs=pinned,
        env_ids=[APPWORLD],
    ) as running:
        yield running


def remote_env(service):
    return gymnasium.make(
        "eprl/Remote-v0",
        url=service.url,
        env_id=APPWORLD,
        token=TOKEN,
        env_kwargs={"max_servers": 1},
    )


@pytest.fixture(scope="module")
def remote(service):
    environment = remote_env(service)
    yield environment
    environment.close()


def run_cell(env, code: str) -> str:
    return env.step(f"```python\n{code}\n```")[0]


def assert_service_alive(service) -> None:
    assert service.process.poll() is None, service.log()[-3000:]
    assert httpx.get(f"{service.url}/healthz", timeout=10).status_code == 200


def next_episode_is_normal(env, root: Path, scenarios) -> None:
    task_id = task_of(scenarios, "venmopay", 3)
    env.reset(options={"task_id": task_id})
    solution = (root / "data" / "tasks" / task_id / "ground_truth" / "solution.py").read_text()
    obs, reward, terminated, _, info = env.step(
        f"```python\n{solution}\nsolution(apis, requester)\n```"
    )
    assert (reward, terminated, info["success"]) == (1.0, True, True), obs[-500:]


def test_remote_cells_reach_no_loopback_socket(service, remote, appworld_root, scenarios):
    """Neither the service's own port nor any other loopback listener (TCP, UDP, abstract
    unix) on the service host is reachable from a cell."""
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0eprl-service-probe-{uuid.uuid4().hex}")
    abstract.listen(1)
    for sock in (tcp, udp, abstract):
        sock.setblocking(False)
    service_port = int(service.url.rsplit(":", 1)[1])
    remote.reset(options={"task_id": task_of(scenarios, "address")})
    obs = run_cell(
        remote,
        "s = __import__('socket')\n"
        f"for family, kind, address in [(s.AF_INET, s.SOCK_STREAM, ('127.0.0.1', {service_port})),\n"
        f"        (s.AF_INET, s.SOCK_STREAM, ('127.0.0.1', {tcp.getsockname()[1]})),\n"
        f"        (s.AF_UNIX, s.SOCK_STREAM, {abstract.getsockname()!r})]:\n"
        "    try:\n        s.socket(family, kind).connect(address); print('CONNECTED', address)\n"
        "    except OSError as error:\n        print('refused', type(error).__name__)\n"
        f"s.socket(s.AF_INET, s.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp.getsockname()[1]}))\n"
        "print('interfaces', [name for _, name in s.if_nameindex()])",
    )
    assert "CONNECTED" not in obs and obs.count("refused") == 3, obs
    assert "interfaces ['lo']" in obs, obs
    for accept in (tcp.accept, abstract.accept, lambda: udp.recvfrom(10)):
        with pytest.raises(BlockingIOError):
            accept()
    for sock in (tcp, udp, abstract):
        sock.close()
    assert_service_alive(service)
    next_episode_is_normal(remote, appworld_root, scenarios)


def test_remote_cells_see_neither_the_token_nor_host_processes(
    service, remote, appworld_root, scenarios
):
    """The token is in the service's /proc/<pid>/environ (checked here); a cell scans every
    environ it can see, its own os.environ, and the service's pid by number; it signals the
    service, this test process and every process it may (-1): the service keeps answering."""
    with open(f"/proc/{service.process.pid}/environ", "rb") as handle:
        assert TOKEN.encode() in handle.read()  # the secret the cell looks for is really there
    remote.reset(options={"task_id": task_of(scenarios, "address")})
    hidden = TOKEN[::-1]  # the cell's source must not contain the token itself
    obs = run_cell(
        remote,
        READ + "o = __import__('os')\n"
        "pids = sorted(int(e.name) for e in P.scandir('/proc') if e.name.isdigit())\n"
        f"extra = [{service.process.pid}, {os.getpid()}]\n"
        "blobs = []\nfor pid in pids + extra:\n    try:\n"
        "        blobs.append(read(f'/proc/{pid}/environ'))\n"
        "    except OSError:\n        pass\n"
        "blobs.append(repr(dict(o.environ)).encode())\n"
        f"print('leak' if any({hidden!r}[::-1].encode() in b for b in blobs) else 'clean')\n"
        "print('keys', sorted(o.environ))\nprint('pids', pids)\n"
        "for pid, sig in [(extra[0], 9), (extra[1], 9), (-1, 15)]:\n"
        "    try:\n        P.kill(pid, sig); print('SIGNALLED', pid)\n"
        "    except OSError as error:\n        print('no signal', pid, type(error).__name__)",
    )
    assert TOKEN not in obs and "clean" in obs, obs
    keys = eval(obs.split("keys ", 1)[1].splitlines()[0])
    assert set(keys) <= {"APPWORLD_CACHE", "APPWORLD_ROOT", "HOME", "LANG", "PATH", "PWD"}
    assert "EPRL_TOKEN" not in keys
    pids = eval(obs.split("pids ", 1)[1].splitlines()[0])
    assert len(pids) <= 3 and service.process.pid not in pids, pids
    assert f"SIGNALLED {service.process.pid}" not in obs and f"SIGNALLED {os.getpid()}" not in obs
    # those pids do not exist in its namespace, and -1 finds no process it may signal there
    assert obs.count("ProcessLookupError") == 3 and "SIGNALLED" not in obs, obs
    assert_service_alive(service)
    next_episode_is_normal(remote, appworld_root, scenarios)


def test_remote_cells_cannot_reach_the_ground_truth(service, remote, appworld_root, scenarios):
    task_id = task_of(scenarios, "address")
    host_answer = appworld_root / "data" / "tasks" / task_id / "ground_truth" / "answer.json"
    remote.reset(options={"task_id": task_id})
    obs = run_cell(
        remote,
        READ + f"for path in ['/aw/data/tasks/{task_id}/ground_truth/answer.json',\n"
        f"             {str(host_answer)!r}, {str(REPO / 'serving' / 'settings.py')!r}]:\n"
        "    try:\n        read(path); print('READ', path)\n"
        "    except OSError as error:\n        print('absent', type(error).__name__, path)\n"
        "found, todo = [], ['/']\nwhile todo:\n    top = todo.pop()\n"
        "    for entry in P.scandir(top):\n"
        f"        if entry.path in ('/proc', '/sys', '/usr', {SANDBOX_SITE_PACKAGES!r}):\n"
        "            continue\n"
        "        if 'ground_truth' in entry.name or entry.name in ('answer.json', 'solution.py',\n"
        "                'evaluation.py', 'private_data.json'):\n            found.append(entry.path)\n"
        "        if entry.is_dir(follow_symlinks=False):\n            todo.append(entry.path)\n"
        "print('found', found)",
    )
    assert "READ" not in obs and obs.count("absent") == 3, obs
    assert "found []" in obs, obs
    _, reward, terminated, _, info = remote.step(
        "```python\napis.supervisor.complete_task(answer=globals().get('answer'))\n```"
    )
    assert terminated and (info["tests_passed"], info["tests_total"], reward) == (1, 2, 0.5)
    next_episode_is_normal(remote, appworld_root, scenarios)


def _sleeping(marker: str) -> bool:
    return any(
        (process.info["cmdline"] or [])[-1:] == [marker]
        for process in psutil.process_iter(["cmdline"])
    )


def test_a_remote_daemon_does_not_survive_the_session(service, appworld_root, scenarios):
    marker = str(700_000 + uuid.uuid4().int % 99_999)
    environment = remote_env(service)
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
        assert _sleeping(marker)  # it runs on the service host, detached from the server
    finally:
        environment.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _sleeping(marker):
        time.sleep(0.1)
    assert not _sleeping(marker)
    assert_service_alive(service)
    again = remote_env(service)
    try:
        next_episode_is_normal(again, appworld_root, scenarios)
    finally:
        again.close()
