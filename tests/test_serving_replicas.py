"""Replicas that fail cleanly: one of two real replicas SIGKILLed under 16 concurrent episodes.

Every episode on the survivor finishes with its reward; every episode on the dead one ends with a
RemoteEnvError naming that replica, and its next reset() runs on the survivor; none hangs. The
dead replica's workers and sandboxes go with it (a parent-death signal), not left running.
"""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import gymnasium
import pytest
from serving_server import is_alive, running_service

import envs  # noqa: F401  (registers the ids)
from envs.codeexec.tasks import load_task
from serving.client import RemoteEnvError, SessionLostError

CODEEXEC = "eprl/CodeExec-v0"
EPISODES = 16


def fence(code: str) -> str:
    return f"```python\n{code}\n```"


def submit(env, task_id: str) -> tuple:
    reference = load_task("procedural", task_id).reference_solution
    return env.step(fence("# submit\n" + reference))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_replica_fails_only_its_episodes(tmp_path):
    with (
        running_service(tmp_path, max_sessions=EPISODES) as survivor,
        running_service(tmp_path, max_sessions=EPISODES) as doomed,
    ):
        urls = [survivor.url, doomed.url]
        remotes = [
            gymnasium.make("eprl/Remote-v0", url=urls, env_id=CODEEXEC, env_kwargs={"max_turns": 4})
            for _ in range(EPISODES)
        ]
        infos = [env.reset(seed=index)[1] for index, env in enumerate(remotes)]  # one by one
        placed = [env.unwrapped.session_url for env in remotes]
        assert placed.count(survivor.url) == placed.count(doomed.url) == EPISODES // 2, placed
        doomed_processes = doomed.descendants()
        killed = threading.Event()

        def episode(index: int) -> tuple:
            env, info = remotes[index], infos[index]
            if placed[index] == survivor.url:
                env.step(fence(f"token = {index}"))
                assert killed.wait(timeout=300)
                observation, *_ = env.step(fence("print('token', token)"))
                assert observation.startswith(f"token {index}\n")  # its state survived
                return ("finished", submit(env, info["task_id"])[1:])
            try:  # in flight when the replica dies
                env.step(fence("import time; time.sleep(120)"))
            except RemoteEnvError as exc:
                error = exc
            else:
                raise AssertionError("a step on the killed replica returned")
            _, info = env.reset(seed=100 + index)  # the next episode runs on the survivor
            assert env.unwrapped.session_url == survivor.url
            return ("failed", error, submit(env, info["task_id"])[1:])

        with ThreadPoolExecutor(EPISODES) as pool:
            futures = [pool.submit(episode, index) for index in range(EPISODES)]
            # SIGKILL the replica once every one of its sessions has a step running
            with doomed.client() as http:
                deadline = time.monotonic() + 300
                while True:
                    states = [s["status"] for s in http.get("/v1/sessions").json()["sessions"]]
                    if states.count("busy") == EPISODES // 2:
                        break
                    assert time.monotonic() < deadline, states
                    time.sleep(0.05)
            os.kill(doomed.process.pid, signal.SIGKILL)
            doomed.process.wait(timeout=60)
            killed.set()
            results = [future.result(timeout=300) for future in futures]  # none hangs

        for index, result in enumerate(results):
            if placed[index] == survivor.url:
                assert result[0] == "finished"
                reward, terminated, truncated, info = result[1]
                assert (reward, terminated, info["success"]) == (1.0, True, True), result
            else:
                _, error, (reward, terminated, _, info) = result
                assert isinstance(error, SessionLostError)
                assert error.replica == doomed.url and doomed.url in str(error)
                assert error.session_id is not None and error.session_id in str(error)
                assert (reward, terminated, info["success"]) == (1.0, True, True)
        for env in remotes:
            env.close()
        # nothing of the dead replica keeps running env code for nobody
        deadline = time.monotonic() + 120
        while alive := [p for p in doomed_processes if is_alive(p)]:
            assert time.monotonic() < deadline, [f"{p.pid} {p.name()}" for p in alive]
            time.sleep(0.1)
        with survivor.client() as http:
            assert http.get("/v1/sessions").json()["active"] == 0
