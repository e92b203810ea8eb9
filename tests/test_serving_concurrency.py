"""64 real CodeExec sessions at once, the bound on sessions, and a worker killed mid-episode."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import gymnasium
import pytest
from serving_server import running_service

import envs  # noqa: F401  (registers the ids)
from envs.codeexec.tasks import load_task
from serving.client import ServiceBusyError, SessionLostError

CODEEXEC = "eprl/CodeExec-v0"
MAX_SESSIONS = 64


# Default sandboxes: each runs under a host uid of its own, so 64 of them at once stay within
# their per-sandbox process limit (RLIMIT_NPROC counts processes per uid host-wide).
SANDBOX: dict = {}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(
        tmp_path_factory.mktemp("service"),
        max_sessions=MAX_SESSIONS,
        retry_after_s=1,
        pinned_env_kwargs={CODEEXEC: {"sandbox": SANDBOX}},
    ) as running:
        yield running


def fence(code: str) -> str:
    return f"```python\n{code}\n```"


def remote_env(service, **kwargs):
    return gymnasium.make(
        "eprl/Remote-v0", url=service.url, env_id=CODEEXEC, env_kwargs={"max_turns": 3}, **kwargs
    )


@pytest.mark.slow
def test_64_sessions_step_concurrently_and_the_65th_is_rejected(service):
    probe = remote_env(service)
    task_ids = probe.unwrapped.task_ids("train")[:MAX_SESSIONS]
    probe.close()
    remotes = [remote_env(service) for _ in range(MAX_SESSIONS)]
    all_reset = threading.Barrier(MAX_SESSIONS + 1, timeout=300)
    rejections_checked = threading.Event()

    def run_episode(index: int) -> tuple:
        env = remotes[index]
        try:
            observation, info = env.reset(seed=index, options={"task_id": task_ids[index]})
        except BaseException:
            all_reset.abort()
            raise
        all_reset.wait()  # every session is live before the 65th asks for one
        # and stays live (an ended episode may free its slot) until the rejections are checked
        assert rejections_checked.wait(timeout=300)
        # a REPL cell whose output only this session can produce (state persists across cells)
        _, _, _, _, _ = env.step(fence(f"token = {index} * 1000 + 7"))
        cell = env.step(fence("print('token', token)"))
        reference = load_task("procedural", info["task_id"]).reference_solution
        final = env.step(fence("# submit\n" + reference))
        return info["task_id"], cell[0], final[1:]

    with ThreadPoolExecutor(MAX_SESSIONS) as pool:
        futures = [pool.submit(run_episode, index) for index in range(MAX_SESSIONS)]
        all_reset.wait()
        with service.client() as http:
            assert http.get("/v1/sessions").json()["active"] == MAX_SESSIONS
            rejected = http.post("/v1/sessions", json={"env_id": CODEEXEC})
            assert rejected.status_code == 429, rejected.text
            assert rejected.headers["retry-after"] == "1"
            assert rejected.json()["error"] == "too_many_sessions"
            rejections = rejected_creates(http)
            # create is safe to repeat: retried with backoff (honouring Retry-After), then a
            # clear error
            began = time.monotonic()
            with pytest.raises(ServiceBusyError, match="64 session slots are in use"):
                remote_env(service, max_retries=2, backoff_s=0.1).reset(seed=0)
            assert time.monotonic() - began >= 2 * 1.0  # two waits of Retry-After (1 s)
            assert rejected_creates(http) == rejections + 3
            rejections_checked.set()
        results = [future.result(timeout=600) for future in futures]

    for index, (task_id, cell_observation, final) in enumerate(results):
        assert task_id == task_ids[index]
        assert cell_observation.startswith(f"token {index * 1000 + 7}\n"), cell_observation
        reward, terminated, truncated, info = final
        assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)
    for env in remotes:
        env.close()
    with service.client() as http:
        assert http.get("/v1/sessions").json()["active"] == 0


def rejected_creates(http) -> float:
    """How many creates the service has answered with 429 (from /metrics)."""
    needle = 'eprl_http_requests_total{method="POST",route="/v1/sessions",status="429"} '
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(needle):
            return float(line.split()[-1])
    return 0.0


def test_a_killed_worker_ends_only_its_session(service):
    victim, *others = [remote_env(service) for _ in range(3)]
    for seed, env in enumerate([victim, *others]):
        env.reset(seed=seed)
        env.step(fence("x = 41"))
    session_id = victim.unwrapped.session_id
    with service.client() as http:
        pid = http.get(f"/v1/sessions/{session_id}").json()["worker_pid"]

    def kill_soon() -> None:
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_soon)
    killer.start()
    with pytest.raises(SessionLostError) as lost:
        victim.step(fence("import time; time.sleep(5)"))  # killed while this call runs
    killer.join()
    assert lost.value.session_id == session_id
    assert f"pid {pid}" in str(lost.value) and "SIGKILL" in str(lost.value)
    assert session_id in str(lost.value)
    with pytest.raises(gymnasium.error.ResetNeeded):
        victim.step(fence("print(x)"))  # the episode is over; reset() starts a new session

    for env in others:  # the other episodes carry on with their state
        observation, *_ = env.step(fence("print(x + 1)"))
        assert observation.startswith("42\n")
    fresh = remote_env(service)
    observation, info = fresh.reset(seed=9)
    observation, *_ = fresh.step(fence("print('fresh')"))
    assert observation.startswith("fresh\n")
    observation, info = victim.reset(seed=3)  # the victim's env works again, on a new session
    assert victim.unwrapped.session_id != session_id and info["turn"] == 0
    for env in [victim, *others, fresh]:
        env.close()


def test_a_worker_dying_between_calls_is_reported(service):
    env = remote_env(service)
    env.reset(seed=0)
    session_id = env.unwrapped.session_id
    with service.client() as http:
        pid = http.get(f"/v1/sessions/{session_id}").json()["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(SessionLostError, match=f"{session_id}.*SIGKILL"):
            env.step(fence("print(1)"))
        assert http.get(f"/v1/sessions/{session_id}").json()["error"] == "session_lost"
    env.close()
