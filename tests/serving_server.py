"""Test helper: run the real service (uvicorn via ``serving.app.serve``) in a subprocess.

``running_service(**settings)`` starts ``serve(...)`` on a free loopback port, waits for
``/healthz``, yields a :class:`Service`, then stops it with SIGTERM (the graceful path) and
checks that every process it started (workers, their sandboxes, the forkserver) is gone.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from serving.settings import TOKEN_ENV_VAR

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    url: str
    process: subprocess.Popen
    log_path: Path
    token: str | None = None

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        token = token if token is not None else self.token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []


def serve_command(settings: dict) -> list[str]:
    code = "import json, sys\nfrom serving.app import serve\nserve(**json.loads(sys.argv[1]))\n"
    return [sys.executable, "-c", code, json.dumps(settings)]


@contextlib.contextmanager
def running_service(
    tmp_path: Path, startup_s: float = 60.0, environ: dict[str, str] | None = None, **settings
) -> Iterator[Service]:
    """``settings`` are serve() arguments; ``environ`` adds environment variables."""
    settings = {"host": "127.0.0.1", "port": free_port(), **settings}
    log_path = tmp_path / f"service-{settings['port']}.log"
    env = {key: value for key, value in os.environ.items() if key != TOKEN_ENV_VAR}
    env.update(PYTHONUNBUFFERED="1", **(environ or {}))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            serve_command(settings), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
        )
    token = settings.get("token") or env.get(TOKEN_ENV_VAR)
    service = Service(f"http://127.0.0.1:{settings['port']}", process, log_path, token)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the service exited with {process.returncode}:\n{service.log()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{service.url}/healthz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start in {startup_s} s:\n{service.log()}")
            time.sleep(0.2)
        yield service
    finally:
        stop_service(service)


def stop_service(service: Service, timeout_s: float = 60.0) -> None:
    """SIGTERM (graceful shutdown), then assert that no process of the service is left."""
    process = service.process
    started = service.descendants()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"the service ignored SIGTERM:\n{service.log()[-3000:]}") from None
    deadline = time.monotonic() + 10
    while (alive := [p for p in started if is_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftovers = [f"{p.pid} {p.name()}" for p in alive]
    for leftover in alive:
        with contextlib.suppress(psutil.Error):
            leftover.kill()
    assert not leftovers, f"processes left behind by the service: {leftovers}"


def is_alive(process: psutil.Process) -> bool:
    """Running and not a zombie (an exited orphan waits for PID 1 to reap it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
