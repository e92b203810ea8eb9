"""Starts a script on several gloo ranks under ``torch.distributed.run`` (CPU DeepSpeed), the
way the multi-process tests do. Each launch asks the kernel for a free rendezvous port, so two
launches of one session never share a port, and a port another process on the machine holds is
never picked (what remains is the moment between picking the port and torchrun binding it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback TCP port nothing holds now: the kernel's pick for port 0. Chosen per launch
    rather than derived from the pid, which gave different tests of one session the same port
    (``30500 + pid % 1000`` in two of them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_environment() -> dict[str, str]:
    """The ranks' environment: the repository importable, DeepSpeed on its CPU accelerator, one
    OpenMP thread per rank (two ranks on a small machine would otherwise oversubscribe it)."""
    return {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def run_ranks(
    script: Path, *args: str, nproc: int = 2, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``script args...`` on ``nproc`` ranks from the repository root and wait; a non-zero
    exit fails the calling test with the tail of the ranks' stderr."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(script),
        *args,
    ]
    done = subprocess.run(
        command, cwd=REPO, env=rank_environment(), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done
