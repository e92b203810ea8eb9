"""The environment service's defaults keep env code sealed: which env ids it serves, the kwargs
clients may not send, and the bearer token kept out of every process that runs env code."""

import multiprocessing
import os

import pytest

import envs  # noqa: F401  (registers the ids)
from serving.settings import SEALED_ENV_IDS, TOKEN_ENV_VAR, ServeSettings, served_env_ids
from serving.workers import start_process


def test_the_service_offers_only_sealed_environments():
    assert served_env_ids(ServeSettings()) == ("eprl/AppWorld-v0", "eprl/CodeExec-v0")
    assert set(served_env_ids(ServeSettings())) <= set(SEALED_ENV_IDS)
    with pytest.raises(ValueError, match=r"\['eprl/Remote-v0'\] are not sealed"):
        served_env_ids(ServeSettings(env_ids=("eprl/CodeExec-v0", "eprl/Remote-v0")))


def test_isolation_weakening_kwargs_stay_pinned():
    settings = ServeSettings()
    assert settings.pinned_kwargs("eprl/CodeExec-v0") == {"sandbox": None}
    assert settings.pinned_kwargs("eprl/AppWorld-v0") == {
        "python": None,
        "root": None,
        "server_urls": None,
    }


def test_an_operators_pins_add_to_the_isolation_pins_never_replace_them():
    """A config that pins AppWorld's `root` (as every AppWorld service does) must not hand the
    choice of `python` or `server_urls` to clients; pinned values of its own are kept."""
    settings = ServeSettings(
        pinned_env_kwargs={
            "eprl/AppWorld-v0": {"root": "/data/appworld"},
            "eprl/CodeExec-v0": {"max_turns": 3},
        }
    )
    assert settings.pinned_kwargs("eprl/AppWorld-v0") == {
        "python": None,
        "root": "/data/appworld",
        "server_urls": None,
    }
    assert settings.pinned_kwargs("eprl/CodeExec-v0") == {"sandbox": None, "max_turns": 3}


def _report_environment(conn) -> None:
    with open("/proc/self/environ", "rb") as handle:
        initial = handle.read()
    conn.send([os.environ.get(TOKEN_ENV_VAR), TOKEN_ENV_VAR.encode() in initial])
    conn.close()


def test_a_worker_starts_without_the_bearer_token(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV_VAR, "a-token-the-worker-must-not-see")
    worker = start_process(multiprocessing.get_context("spawn"), _report_environment, ())
    try:
        assert worker.conn.poll(60)
        assert worker.conn.recv() == [None, False]  # neither in os.environ nor in /proc
    finally:
        worker.kill()
    assert os.environ[TOKEN_ENV_VAR] == "a-token-the-worker-must-not-see"  # the server keeps it


FORKSERVER_PROBE = """
import os, time
from multiprocessing import forkserver
from serving.pool import SessionPool
pool = SessionPool(max_sessions=1, env_modules=(), start_method="forkserver")
pool._start_forkserver()
pid = forkserver._forkserver._forkserver_pid
environ = b""
for _ in range(300):  # empty until the forkserver's exec has happened
    with open(f"/proc/{pid}/environ", "rb") as handle:
        environ = handle.read()
    if environ:
        break
    time.sleep(0.1)
assert environ, "the forkserver never showed its environment"
print(b"EPRL_TOKEN=" in environ, os.environ.get("EPRL_TOKEN") is not None)
"""


def test_the_forkserver_every_worker_forks_from_starts_without_the_token():
    """Workers are forked from the forkserver: its environment (in /proc/<pid>/environ for its
    whole life) is theirs, so the service must start it with the token hidden."""
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, TOKEN_ENV_VAR: "a-token-the-forkserver-must-not-see"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", FORKSERVER_PROBE],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"]  # not in the forkserver; the server keeps it
