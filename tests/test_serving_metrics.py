"""The Prometheus metrics an operator alerts on move with what the service does (not only exist)."""

import concurrent.futures
import os
import secrets
import signal
import time

import pytest
from serving_server import running_service, scrape

CODEEXEC = "eprl/CodeExec-v0"
TOKEN = secrets.token_urlsafe(24)


def fence(code: str) -> str:
    return f"```python\n{code}\n```"


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with running_service(
        tmp_path_factory.mktemp("service"), token=TOKEN, max_sessions=2, max_body_bytes=65536
    ) as running:
        yield running


def wait_for_status(http, sid: str, status: str, call) -> None:
    deadline = time.monotonic() + 60
    while http.get(f"/v1/sessions/{sid}").json()["status"] != status:
        assert not call.done() and time.monotonic() < deadline, f"{sid} never {status}"
        time.sleep(0.01)


def test_metrics_move(service):
    http = service.client()
    before = scrape(http)
    for reason in ("unauthorized", "body_too_large", "too_many_sessions", "session_busy"):
        assert ("eprl_requests_rejected_total", (("reason", reason),)) in before  # from 0

    assert service.client(token="x" * 20).get("/v1/sessions").status_code == 401
    big = http.post("/v1/sessions", content=b"x" * 70000, headers={"content-type": "text/plain"})
    assert big.status_code == 413

    sid = http.post("/v1/sessions", json={"env_id": CODEEXEC, "env_kwargs": {"max_turns": 9}})
    sid = sid.json()["session_id"]
    http.post(f"/v1/sessions/{sid}/reset", json={"seed": 0})
    http.post(f"/v1/sessions/{sid}/step", json={"action": fence("x = 1")})
    idle = scrape(http)
    assert value(idle, "eprl_sessions", state="ready") == 1
    assert value(idle, "eprl_sessions", state="busy") == 0

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(
            service.client().post,
            f"/v1/sessions/{sid}/step",
            json={"action": fence("import time; time.sleep(1)")},
        )
        wait_for_status(http, sid, "busy", slow)
        busy = scrape(http)
        assert value(busy, "eprl_sessions", state="busy") == 1
        assert value(busy, "eprl_sessions", state="ready") == 0
        assert http.post(f"/v1/sessions/{sid}/step", json={"action": "x"}).status_code == 409
        assert slow.result().status_code == 200

    other = http.post("/v1/sessions", json={"env_id": CODEEXEC}).json()["session_id"]
    assert http.post("/v1/sessions", json={"env_id": CODEEXEC}).status_code == 429
    bad_task = {"options": {"task_id": "proc/nope"}}
    assert http.post(f"/v1/sessions/{other}/reset", json=bad_task).status_code == 422
    os.kill(http.get(f"/v1/sessions/{other}").json()["worker_pid"], signal.SIGKILL)
    assert http.post(f"/v1/sessions/{other}/step", json={"action": "x"}).status_code == 410
    after = scrape(http)

    def moved(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    for reason in ("unauthorized", "body_too_large", "too_many_sessions", "session_busy"):
        assert moved("eprl_requests_rejected_total", reason=reason) == 1, reason
    assert moved("eprl_env_steps_total", env_id=CODEEXEC) == 2
    assert moved("eprl_step_seconds_count", env_id=CODEEXEC) == 2
    assert moved("eprl_step_seconds_sum", env_id=CODEEXEC) >= 1.0  # the 1 s step is in it
    assert moved("eprl_step_seconds_bucket", env_id=CODEEXEC, le="0.5") <= 1  # and not fast
    assert moved("eprl_env_errors_total", env_id=CODEEXEC, kind="env_error") == 1
    assert moved("eprl_env_errors_total", env_id=CODEEXEC, kind="session_lost") == 1
    assert moved("eprl_worker_restarts_total", env_id=CODEEXEC, reason="lost") == 1
    assert moved("eprl_sessions_ended_total", reason="lost") == 1
    assert value(after, "eprl_sessions", state="ready") == 1  # the lost one is gone
    assert value(after, "eprl_draining") == 0
    assert http.delete(f"/v1/sessions/{sid}").status_code == 200
    assert value(scrape(http), "eprl_sessions", state="ready") == 0
