"""Several bearer tokens from a file (one per trainer), reloaded on SIGHUP without losing sessions."""

import hmac
import secrets
import signal
import time
from pathlib import Path

import gymnasium
import httpx
import pytest
from serving_server import running_service

import envs  # noqa: F401  (registers the ids)
from serving.settings import TOKEN_ENV_VAR
from serving.tokens import TokenFileError, TokenStore, read_tokens_file

A, B, C, STATIC = (secrets.token_urlsafe(24) for _ in range(4))
CODEEXEC = "eprl/CodeExec-v0"


def test_tokens_file_format_and_errors(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# trainers\ntrainer-a {A}\n\n{B}  # no name\n")
    assert [name for name, _ in read_tokens_file(path)] == ["trainer-a", "line-4"]
    for text, message in [
        ("", "holds no token"),
        (f"a {A} extra\n", ":1: expected 'NAME TOKEN' or 'TOKEN', got 3 fields"),
        ("trainer-a short\n", ":1: the token of 'trainer-a' must be at least 16"),
        (f"x {A}\nx {B}\n", ":2: the name 'x' is used twice"),
    ]:
        path.write_text(text)
        with pytest.raises(TokenFileError, match=message) as error:
            read_tokens_file(path)
        assert A not in str(error.value) and "short" not in str(error.value)


def test_every_token_is_compared_whichever_matches(tmp_path, monkeypatch):
    """No early exit: the time of a check does not depend on which token (if any) matched."""
    path = tmp_path / "tokens"
    path.write_text(f"a {A}\nb {B}\nc {C}\n")
    store = TokenStore(STATIC, path)
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda x, y: calls.append(1) or real(x, y))
    for presented, name in [(STATIC, "token"), (A, "a"), (C, "c"), ("nope" * 5, None)]:
        calls.clear()
        assert store.check(presented.encode()) == name
        assert len(calls) == 4


@pytest.fixture
def tokens_service(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"trainer-a {A}\ntrainer-b {B}\n")
    path.chmod(0o600)
    with running_service(
        tmp_path, environ={TOKEN_ENV_VAR: STATIC}, tokens_file=str(path), log_level="debug"
    ) as service:
        yield service, path


def status_with(service, token: str) -> int:
    with service.client(token=token) as http:
        return http.get("/v1/sessions").status_code


def wait_for_log(service, needle: str, count: int = 1, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while service.log().count(needle) < count:
        assert time.monotonic() < deadline, f"{needle!r} never logged:\n{service.log()[-2000:]}"
        time.sleep(0.05)


def test_sighup_reloads_tokens_and_keeps_sessions(tokens_service):
    service, path = tokens_service
    assert [status_with(service, token) for token in (A, B, STATIC, C)] == [200, 200, 200, 401]
    env = gymnasium.make(
        "eprl/Remote-v0", url=service.url, env_id=CODEEXEC, token=A, env_kwargs={"max_turns": 4}
    )
    env.reset(seed=0)
    env.step("```python\nx = 41\n```")
    session_id = env.unwrapped.session_id

    # revoke trainer-b, add trainer-c
    path.write_text(f"trainer-a {A}\ntrainer-c {C}\n")
    service.process.send_signal(signal.SIGHUP)
    wait_for_log(service, "tokens reloaded")
    assert "trainer-a, trainer-c" in service.log()  # names are logged, tokens never
    assert [status_with(service, token) for token in (A, B, STATIC, C)] == [200, 401, 200, 200]
    observation, *_ = env.step("```python\nprint(x + 1)\n```")  # the same session, its state
    assert observation.startswith("42\n") and env.unwrapped.session_id == session_id

    # a broken file leaves the tokens in force
    path.write_text("trainer-a short\n")
    service.process.send_signal(signal.SIGHUP)
    wait_for_log(service, "tokens not reloaded")
    assert [status_with(service, token) for token in (A, B, C)] == [200, 401, 200]

    # no token in any process that runs env code: the worker, its forkserver, their children
    with service.client(token=A) as http:
        pid = http.get(f"/v1/sessions/{session_id}").json()["worker_pid"]
    processes = service.descendants()
    assert pid in [process.pid for process in processes]
    read = set()
    for process in processes:
        try:
            environ = Path(f"/proc/{process.pid}/environ").read_bytes()
        except PermissionError:  # a sandbox under a uid of its own (started with --clearenv)
            continue
        read.add(process.pid)
        for token in (A, B, C, STATIC):
            assert token.encode() not in environ, process.cmdline()
        assert TOKEN_ENV_VAR.encode() + b"=" not in environ
    assert pid in read and len(read) >= 2  # the worker and the forkserver at least
    env.close()
    log = service.log()
    assert '"GET /v1/sessions HTTP/1.1" 401' in log
    for token in (A, B, C, STATIC):
        assert token not in log


def test_a_tokens_file_is_enough_off_loopback(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{A}\n")
    with running_service(tmp_path, host="0.0.0.0", tokens_file=str(path)) as service:
        assert httpx.get(f"{service.url}/v1/envs", timeout=60).status_code == 401
        assert status_with(service, A) == 200


def test_sighup_without_a_tokens_file_keeps_the_service(tmp_path):
    """SIGHUP's default action would end the process: the service handles it in any case."""
    with running_service(tmp_path) as service:
        env = gymnasium.make("eprl/Remote-v0", url=service.url, env_id=CODEEXEC)
        env.reset(seed=0)
        service.process.send_signal(signal.SIGHUP)
        wait_for_log(service, "SIGHUP: no tokens_file to reload")
        assert service.process.poll() is None
        assert env.step("no code")[2]  # the session is still there
        env.close()
