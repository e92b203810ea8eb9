"""The AppWorld server pool: server URLs leased across processes, and nothing left behind by an
environment that is dropped, an interpreter that exits, or a process killed with SIGKILL.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gymnasium as gym
import pytest
from appworld_helpers import (
    APPWORLD_MARKS,
    REPO,
    gone,
    load_scenarios,
    solution_action,
    task_of,
)

import envs  # noqa: F401  (registers the ids)
from envs.appworld import (
    AppWorldRuntime,
    AppWorldRuntimeError,
)
from envs.appworld.runtime import resolve_python

pytestmark = APPWORLD_MARKS


@pytest.fixture(scope="module")
def scenarios(appworld_root):
    return load_scenarios(appworld_root)


# ------------------------------------------------------------------ a pool of servers shared by processes
LOOPBACK_SERVER = (
    "import sys\nfrom appworld import update_root\nupdate_root(sys.argv[1])\nimport uvicorn\n"
    "from appworld.serve.environment import app\n"
    "uvicorn.run(app, host='127.0.0.1', port=int(sys.argv[2]), log_level='warning')"
)
LEASE_HOLDER = """
import sys
from envs.appworld.runtime import AppWorldRuntime
runtime = AppWorldRuntime(sys.argv[1], server_urls=sys.argv[3:], lease_dir=sys.argv[2])
print(runtime.acquire(timeout_s=60).url, flush=True)
sys.stdin.readline()  # held until the test kills this process
"""


@pytest.fixture(scope="module")
def loopback_servers(appworld_root):
    """Two real `appworld serve environment` apps (the AppWorld venv, uvicorn on 127.0.0.1),
    the kind of servers someone else runs: eprl neither starts nor seals them in the test."""
    import httpx

    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    processes = [
        subprocess.Popen(
            [str(resolve_python()), "-c", LOOPBACK_SERVER, str(appworld_root), str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url, process in zip(urls, processes, strict=True):
            deadline = time.monotonic() + 180
            while True:
                assert process.poll() is None, f"the AppWorld server for {url} exited"
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"{url} did not answer in 180 s"
                time.sleep(0.2)
        yield urls
    finally:
        for process in processes:
            process.kill()
            process.wait()


def test_processes_sharing_server_urls_lease_each_server_to_one_episode(
    appworld_root, loopback_servers, tmp_path, scenarios
):
    """Another process holds the first URL: this one gets the second, waits with a clear error
    while both are held, and gets the first the moment the holder dies (SIGKILL included)."""
    leases = tmp_path / "leases"
    holder = subprocess.Popen(
        [sys.executable, "-c", LEASE_HOLDER, str(appworld_root), str(leases), *loopback_servers],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    runtime = AppWorldRuntime(appworld_root, server_urls=loopback_servers, lease_dir=leases)
    try:
        held = holder.stdout.readline().strip()
        assert held == loopback_servers[0]  # every process tries the URLs in the same order
        mine = runtime.acquire(timeout_s=10)
        assert mine.url == loopback_servers[1]
        with pytest.raises(
            AppWorldRuntimeError, match=f"leased by other processes.*pid {holder.pid}"
        ):
            runtime.acquire(timeout_s=1)
        holder.kill()  # the kernel drops its lock with its last file descriptor
        holder.wait()
        second = runtime.acquire(timeout_s=10)
        assert second.url == held
        runtime.release(second)
        runtime.release(mine)
        # released leases are free for a real episode, graded by the server's own /evaluate
        environment = gym.make(
            "eprl/AppWorld-v0", root=str(appworld_root), server_urls=loopback_servers[:1]
        )
        try:
            task_id = task_of(scenarios, "venmopay", 1)
            environment.reset(options={"task_id": task_id})
            *_, reward, terminated, _, info = environment.step(
                solution_action(appworld_root, task_id)
            )
            assert (reward, terminated, info["success"]) == (1.0, True, True)
        finally:
            environment.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        holder.stdin.close()
        holder.stdout.close()
        runtime.close()


# ------------------------------------------------------------------ the spare for the next episode


def test_the_next_episodes_spare_is_reserved_after_initialize_not_beside_it(
    appworld_root, scenarios
):
    """A spare's start takes seconds of CPU, so the env's reset asks for it only after its own
    /initialize (``acquire(start_spare=False)``, then ``start_spare()``): the reset leaves one
    spare starting, reserved at once (observable without waiting), and a release refills its
    slot at once too."""
    environment = gym.make("eprl/AppWorld-v0", root=str(appworld_root), max_servers=2)
    try:
        environment.reset(options={"task_id": task_of(scenarios, "address")})
        runtime = environment.unwrapped.runtime
        assert runtime.starting_servers() + runtime.ready_servers() == 1
        second = runtime.acquire(timeout_s=300, start_spare=False)  # waits for that spare
        assert (runtime.starting_servers(), runtime.ready_servers()) == (0, 0)
        runtime.start_spare()
        assert runtime.starting_servers() == 1
        runtime.start_spare()  # full: two episodes and one spare
        assert runtime.starting_servers() + runtime.ready_servers() == 1
        pid = second.process.pid
        runtime.release(second)  # killed before release returns; its slot refilled at once
        assert gone(pid) and runtime.starting_servers() + runtime.ready_servers() == 2
    finally:
        environment.close()


# ------------------------------------------------------------------ no process left behind


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
    while not all(map(gone, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(map(gone, pids)) and not Path(workdir).exists()


def test_a_sigkilled_runtimes_work_directory_is_swept_by_the_next_runtime(appworld_root):
    """SIGKILL runs no close() and no finalizer: the sandboxes die with their parent
    (--die-with-parent), the work directory (shared data, saved states) stays on the host
    until the next runtime of this pid namespace starts and removes it."""
    script = textwrap.dedent(f"""
        import time
        from envs.appworld.runtime import AppWorldRuntime
        runtime = AppWorldRuntime({str(appworld_root)!r}, max_servers=1)
        server = runtime.acquire(timeout_s=300)
        print(server.process.pid, runtime.workdir, flush=True)
        time.sleep(600)
    """)
    victim = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        pid, workdir = victim.stdout.readline().split()
    finally:
        victim.kill()
        victim.wait()
        victim.stdout.close()
    workdir = Path(workdir)
    deadline = time.monotonic() + 10
    while not gone(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(int(pid)) and (workdir / "shared" / "base_dbs").is_dir()
    runtime = AppWorldRuntime(appworld_root, max_servers=1)
    try:
        fresh = runtime._ensure_workdir()  # what the first server start does
        assert not workdir.exists() and fresh.is_dir()
    finally:
        runtime.close()
    assert not fresh.exists()
