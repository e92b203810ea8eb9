"""Graceful drain: SIGTERM -> no new sessions, /healthz 503, episodes finish, processes closed, exit 0.

Real uvicorn services on loopback (tests/serving_server.py); every wait is on observable state
(a session showing busy, /healthz answering 503, the process exiting), never a guessed sleep.
"""

import concurrent.futures
import signal
import time

import gymnasium
import httpx
from serving_server import is_alive, running_service

import envs  # noqa: F401  (registers the ids)

CODEEXEC = "eprl/CodeExec-v0"


def fence(code: str) -> str:
    return f"```python\n{code}\n```"


def wait_until(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def health(service) -> httpx.Response:
    return httpx.get(f"{service.url}/healthz", timeout=10)


def test_sigterm_drains_then_exits_0(tmp_path):
    # a second replica, its only slot held, so that the env below starts on the drained one
    with (
        running_service(tmp_path, max_sessions=1) as other,
        running_service(tmp_path, drain_grace_s=120.0, max_sessions=4) as service,
    ):
        holder = gymnasium.make("eprl/Remote-v0", url=other.url, env_id=CODEEXEC)
        holder.reset(seed=0)
        moving = gymnasium.make(
            "eprl/Remote-v0",
            url=[service.url, other.url],
            env_id=CODEEXEC,
            env_kwargs={"max_turns": 3},
        )
        moving.reset(seed=1)
        assert moving.unwrapped.session_url == service.url
        holder.close()  # the other replica has room again

        http = service.client()
        sid = http.post(
            "/v1/sessions", json={"env_id": CODEEXEC, "env_kwargs": {"max_turns": 4}}
        ).json()["session_id"]
        http.post(f"/v1/sessions/{sid}/reset", json={"seed": 2})
        http.post(f"/v1/sessions/{sid}/step", json={"action": fence("x = 41")})
        processes = service.descendants()
        assert "bwrap" in {process.name() for process in processes}

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(
                service.client().post,
                f"/v1/sessions/{sid}/step",
                json={"action": fence("import time; time.sleep(2); print(x + 1)")},
            )
            wait_until(lambda: http.get(f"/v1/sessions/{sid}").json()["status"] == "busy", "busy")
            service.process.send_signal(signal.SIGTERM)
            wait_until(lambda: health(service).status_code == 503, "/healthz 503")
            assert health(service).json()["status"] == "draining"

            refused = http.post("/v1/sessions", json={"env_id": CODEEXEC})
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "shutting_down" and "draining" in refused.text
            assert refused.headers["retry-after"]

            step = slow.result(timeout=120)  # the step in flight at SIGTERM finished
            assert step.status_code == 200 and step.json()["observation"].startswith("42\n")

        # a live episode goes on; its next reset moves it (the service frees the session)
        observation, *_ = moving.step(fence("print('still here')"))
        assert observation.startswith("still here\n")
        observation, info = moving.reset(seed=3)
        assert moving.unwrapped.session_url == other.url and info["turn"] == 0
        moving.close()
        with service.client() as check:
            assert check.get("/metrics").text.count("eprl_draining 1.0") == 1

        assert http.delete(f"/v1/sessions/{sid}").status_code == 200  # the last session
        service.process.wait(timeout=60)  # drained: it exits without waiting out the grace
        assert service.process.returncode == 0, service.log()[-3000:]
        wait_until(lambda: not any(is_alive(p) for p in processes), "the session processes")
        log = service.log()
        assert "drained: no session left" in log and "ended (drain)" in log
        assert "Traceback" not in log


def test_the_grace_period_ends_the_drain(tmp_path):
    """Sessions still open when drain_grace_s runs out are closed, processes and all; exit 0."""
    with running_service(tmp_path, drain_grace_s=1.0) as service:
        env = gymnasium.make(
            "eprl/Remote-v0", url=service.url, env_id=CODEEXEC, env_kwargs={"max_turns": 3}
        )
        env.reset(seed=0)
        env.step(fence("print(1)"))  # a sandboxed REPL is alive
        processes = service.descendants()
        service.process.send_signal(signal.SIGTERM)
        service.process.wait(timeout=120)
        assert service.process.returncode == 0
        wait_until(lambda: not any(is_alive(p) for p in processes), "the session processes")
        log = service.log()
        assert "drain grace over with 1 sessions live" in log
        assert "ended (shutdown)" in log and "Traceback" not in log
        env.close()  # the service is gone: close() does not raise
