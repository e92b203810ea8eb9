"""Warm sessions (serving/warm.py): workers started and warmed before any client asks.

The AppWorld tests share one real service (uvicorn in a subprocess, real bubblewrap, the real
AppWorld engine over a generated dataset) with one warm AppWorld worker; they follow the warm
worker by its process (the forkserver's child that no session owns) and the sealed server under
it, never by elapsed time. The CodeExec test drives the SessionPool directly (cheap workers) to
check that warm workers give their slots to sessions.
"""

import asyncio
import os
import secrets
import signal
import time
from pathlib import Path

import psutil
import pytest
from appworld_helpers import APPWORLD_MARKS
from serving_server import is_alive, running_service, scrape, stop_service

import envs  # noqa: F401  (registers the ids)
from serving.app import create_app
from serving.config import ServeConfigError, load_serve_settings
from serving.settings import TOKEN_ENV_VAR, ServeSettings

APPWORLD = "eprl/AppWorld-v0"
CODEEXEC = "eprl/CodeExec-v0"
WARM_KWARGS = {"max_servers": 1}
TOKEN = secrets.token_urlsafe(24)
WAIT_S = 300.0  # a cold AppWorld start takes 6-25 s here, more while other tests load the CPU


def appworld_test(test):
    for mark in APPWORLD_MARKS:
        test = mark(test)
    return pytest.mark.slow(test)


def running(pid: int) -> bool:
    try:
        return is_alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate, what: str, timeout_s: float = WAIT_S):
    """Poll observable state until ``predicate()`` is truthy; return it."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return result


# ---- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"warm_sessions": {APPWORLD: -1}}, "warm_sessions.eprl/AppWorld-v0"),
        ({"warm_sessions": {APPWORLD: "two"}}, "(got 'two')"),
        ({"warm_sessions": {"eprl/Nope-v0": 1}}, "'eprl/Nope-v0' is not a served env id"),
        (
            {"env_ids": [CODEEXEC], "warm_sessions": {APPWORLD: 1}},
            "warm_sessions: 'eprl/AppWorld-v0' is not a served env id (served: ['eprl/CodeExec-v0'])",
        ),
        ({"max_sessions": 2, "warm_sessions": {APPWORLD: 2, CODEEXEC: 1}}, "3 warm workers"),
        ({"warm_env_kwargs": {APPWORLD: {"root": "/data"}}}, "sets ['root'], which are pinned"),
    ],
)
def test_bad_warm_settings_are_refused_naming_the_value(overrides, named):
    with pytest.raises(ServeConfigError) as error:
        load_serve_settings(None, overrides, environ={})
    assert named in str(error.value)


def test_warm_kwargs_are_checked_like_a_clients():
    settings = ServeSettings(
        env_ids=[CODEEXEC],
        warm_sessions={CODEEXEC: 1},
        warm_env_kwargs={CODEEXEC: {"max_turn": 3}},
    )
    with pytest.raises(ServeConfigError, match=r"warm_env_kwargs\.eprl/CodeExec-v0: max_turn"):
        create_app(settings)


# ---- the pool: warm workers share max_sessions with sessions (CodeExec: cheap workers) ----------


def test_warm_workers_yield_their_slots_to_sessions():
    settings = ServeSettings(
        env_ids=[CODEEXEC],
        max_sessions=2,
        warm_sessions={CODEEXEC: 1},
        warm_env_kwargs={CODEEXEC: {"max_turns": 3}},
    )
    pool = create_app(settings).state.pool

    async def ready_pids(exclude=()) -> list[int]:
        deadline = time.monotonic() + 120
        while not (pids := [p for p in pool.warm.ready_pids(CODEEXEC) if p not in exclude]):
            assert time.monotonic() < deadline, "no warm CodeExec worker became ready"
            await asyncio.sleep(0.05)
        return pids

    async def scenario() -> list[int]:
        await pool.start()
        try:
            (first,) = await ready_pids()
            # max_turns 3 given as the warm kwargs, task_set at its default: a match
            taken = await pool.create(CODEEXEC, {"max_turns": 3, "task_set": "procedural"})
            assert (taken.warm, taken.worker.pid) == (True, first)
            reset = await pool.call(taken.session_id, "reset", seed=0)
            assert reset["info"]["turn"] == 0
            (second,) = await ready_pids(exclude={first})  # the replacement, in the free slot
            # 1 session + 1 warm worker fill max_sessions=2: a cold session evicts the warm one
            cold = await pool.create(CODEEXEC, {"max_turns": 5})
            assert not cold.warm and cold.worker.pid != second
            assert pool.warm.total == 0 and not running(second)
            assert pool.warm.discarded == {(CODEEXEC, "evicted"): 1}
            await pool.close(cold.session_id)
            (third,) = await ready_pids(exclude={first, second})  # back once a slot is free
            assert pool.starts == {(CODEEXEC, "warm"): 1, (CODEEXEC, "cold"): 1}
            return [first, second, third]
        finally:
            await pool.shutdown(5.0)

    pids = asyncio.run(scenario())
    assert not any(map(running, pids))


# ---- AppWorld through the real service ---------------------------------------------------------


@pytest.fixture(scope="module")
def service(appworld_root, tmp_path_factory):
    pinned = {APPWORLD: {"root": str(appworld_root), "python": None, "server_urls": None}}
    with running_service(
        tmp_path_factory.mktemp("warm-service"),
        environ={TOKEN_ENV_VAR: TOKEN},  # in the service's environment, never in a worker's
        env_ids=[APPWORLD],
        pinned_env_kwargs=pinned,
        max_sessions=3,
        warm_sessions={APPWORLD: 1},
        warm_env_kwargs={APPWORLD: WARM_KWARGS},
    ) as running:
        yield running


def metric(http, name: str, **labels) -> float:
    return scrape(http).get((name, tuple(sorted(labels.items()))), 0.0)


def warm_worker(service, http, exclude: set[int] = frozenset()) -> psutil.Process:
    """The one warm AppWorld worker, once ready: the forkserver's child no session owns."""

    def find():
        if metric(http, "eprl_warm_workers", env_id=APPWORLD, state="ready") != 1:
            return None
        owned = {s["worker_pid"] for s in http.get("/v1/sessions").json()["sessions"]}
        forkserver = next(p for p in service.descendants() if "forkserver" in " ".join(p.cmdline()))
        spare = [
            p
            for p in forkserver.children()
            if is_alive(p) and p.pid not in owned and p.pid not in exclude
        ]
        return spare[0] if len(spare) == 1 else None

    return wait_until(find, "a ready warm AppWorld worker")


def outer_sandboxes(worker: psutil.Process, script: str) -> list[tuple[psutil.Process, list]]:
    """(process, cmdline) of each sandbox under ``worker`` that runs ``script``: the outer bwrap
    of each (bwrap forks a copy of itself inside the sandbox)."""
    found = []
    for process in worker.children(recursive=True):
        try:
            cmdline, parent = process.cmdline(), process.parent()
        except psutil.NoSuchProcess:
            continue
        if process.name() == "bwrap" and script in cmdline and parent.name() != "bwrap":
            found.append((process, cmdline))
    return found


def sealed_servers(worker: psutil.Process) -> dict[int, tuple[float, Path]]:
    """bwrap pid -> (start time, the server's task directory) of the AppWorld servers."""
    return {
        process.pid: (process.create_time(), Path(cmdline[cmdline.index("/aw/data/tasks") - 1]))
        for process, cmdline in outer_sandboxes(worker, "/eprl/serve.py")
    }


def evaluators(worker: psutil.Process) -> list[tuple[int, float]]:
    """(pid, start time) of the sandboxed AppWorld evaluators under ``worker``."""
    return [(p.pid, p.create_time()) for p, _ in outer_sandboxes(worker, "/eprl/evaluate.py")]


def first_task(appworld_root: Path) -> str:
    from envs.appworld.env import task_ids_of

    return task_ids_of(appworld_root, "train")[0]


@appworld_test
def test_first_reset_runs_on_a_server_started_before_the_session(service, appworld_root):
    http = service.client()
    warm = warm_worker(service, http)
    servers = sealed_servers(warm)
    assert len(servers) == 1, "the warm worker holds one started AppWorld server"
    (server_pid, (server_started, tasks_dir)), *_ = servers.items()
    (evaluator,) = evaluators(warm)  # started by the warm-up too, not by the first episode's end
    for process in [warm, *warm.children(recursive=True)]:
        assert TOKEN.encode() not in Path(f"/proc/{process.pid}/environ").read_bytes()
    warm_before = metric(http, "eprl_sessions_started_total", env_id=APPWORLD, start="warm")

    # max_turns=40 is the constructor's default: the same kwargs as the warm worker's
    created = http.post(
        "/v1/sessions", json={"env_id": APPWORLD, "env_kwargs": {**WARM_KWARGS, "max_turns": 40}}
    )
    assert created.status_code == 201, created.text
    session = created.json()
    assert session["worker_pid"] == warm.pid
    assert server_started < session["created_at"] and warm.create_time() < session["created_at"]
    assert evaluator[1] < session["created_at"]
    assert metric(http, "eprl_sessions_started_total", env_id=APPWORLD, start="warm") == (
        warm_before + 1
    )

    task_id = first_task(appworld_root)
    reset = http.post(
        f"/v1/sessions/{session['session_id']}/reset", json={"options": {"task_id": task_id}}
    )
    assert reset.status_code == 200, reset.text
    assert reset.json()["info"]["task_id"] == task_id
    # the episode runs on the server that was ready before the session: its task is installed
    # there, and it is still running
    assert (tasks_dir / task_id / "specs.json").is_file()
    assert server_pid in sealed_servers(warm)

    step = http.post(
        f"/v1/sessions/{session['session_id']}/step",
        json={"action": "```python\napis.supervisor.complete_task()\n```"},
    ).json()
    assert step["terminated"] and 0 <= step["reward"] < 1  # graded by that same evaluator
    assert evaluators(warm) == [evaluator]

    replacement = warm_worker(service, http, exclude={warm.pid})  # the pool is refilled
    assert replacement.pid != warm.pid and len(sealed_servers(replacement)) == 1
    assert http.delete(f"/v1/sessions/{session['session_id']}").status_code == 200


@appworld_test
def test_other_kwargs_start_cold_and_leave_the_warm_worker(service):
    http = service.client()
    warm = warm_worker(service, http)
    cold_before = metric(http, "eprl_sessions_started_total", env_id=APPWORLD, start="cold")
    created = http.post("/v1/sessions", json={"env_id": APPWORLD, "env_kwargs": {"max_servers": 2}})
    assert created.status_code == 201, created.text
    session = created.json()
    assert session["worker_pid"] != warm.pid
    assert metric(http, "eprl_sessions_started_total", env_id=APPWORLD, start="cold") == (
        cold_before + 1
    )
    assert is_alive(warm) and metric(http, "eprl_warm_workers", env_id=APPWORLD, state="ready") == 1
    assert http.delete(f"/v1/sessions/{session['session_id']}").status_code == 200


@appworld_test
def test_a_warm_worker_killed_while_waiting_is_replaced_not_handed_out(service):
    http = service.client()
    warm = warm_worker(service, http)
    tree = [warm, *warm.children(recursive=True)]
    died_before = metric(http, "eprl_warm_workers_discarded_total", env_id=APPWORLD, reason="died")
    os.kill(warm.pid, signal.SIGKILL)
    wait_until(
        lambda: (
            metric(http, "eprl_warm_workers_discarded_total", env_id=APPWORLD, reason="died")
            == died_before + 1
        ),
        "the pool noticing the killed warm worker",
    )
    wait_until(lambda: not any(map(is_alive, tree)), "the killed worker's sandbox to die with it")
    replacement = warm_worker(service, http, exclude={warm.pid})
    created = http.post("/v1/sessions", json={"env_id": APPWORLD, "env_kwargs": WARM_KWARGS})
    assert created.status_code == 201, created.text
    assert created.json()["worker_pid"] == replacement.pid != warm.pid
    assert http.delete(f"/v1/sessions/{created.json()['session_id']}").status_code == 200


@appworld_test
def test_shutdown_leaves_no_warm_worker_or_sandbox(service):
    http = service.client()
    warm = warm_worker(service, http)
    tree = [warm, *warm.children(recursive=True)]
    assert any(process.name() == "bwrap" for process in tree)
    stop_service(service)  # SIGTERM: drain, shutdown; asserts no process of the service is left
    assert service.process.returncode == 0
    assert not [process.pid for process in tree if is_alive(process)]
