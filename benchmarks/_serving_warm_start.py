"""The warm-session part of ``serving_throughput.py`` (a helper: ``run_all.py`` skips ``_*.py``).

One ``eprl serve`` with ``warm_sessions: {eprl/AppWorld-v0: 1}`` over the offline generated
dataset. Each round times a new session's first reset as a client pays it (create + reset, one
task): cold (kwargs no warm worker has: ``max_turns`` 41 instead of 40, which changes nothing
of the start) and warm (the warm worker's kwargs), alternated, each after the service is quiet
(the warm worker ready, no replacement starting, no other session), so neither pays the other's
background work. Writes ``--appworld-out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
APPWORLD = "eprl/AppWorld-v0"
WARM_KWARGS = {"max_servers": 1}
COLD_KWARGS = {"max_servers": 1, "max_turns": 41}


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def wait_quiet(http: httpx.Client, timeout_s: float = 600.0) -> None:
    """Until the warm worker is ready, nothing is starting and no session is live."""
    deadline = time.monotonic() + timeout_s
    while not (
        metric(http, "eprl_warm_workers", env_id=APPWORLD, state="ready") == 1
        and metric(http, "eprl_warm_workers", env_id=APPWORLD, state="starting") == 0
        and metric(http, "eprl_sessions_active") == 0
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("the warm AppWorld worker never became ready")
        time.sleep(0.2)


def first_reset(http: httpx.Client, kwargs: dict, task_id: str) -> dict:
    """Seconds of create, of the first reset and of both, and how the session started."""
    warm_before = metric(http, "eprl_sessions_started_total", env_id=APPWORLD, start="warm")
    began = time.perf_counter()
    created = http.post("/v1/sessions", json={"env_id": APPWORLD, "env_kwargs": kwargs})
    created.raise_for_status()
    made = time.perf_counter()
    session_id = created.json()["session_id"]
    reset = http.post(f"/v1/sessions/{session_id}/reset", json={"options": {"task_id": task_id}})
    reset.raise_for_status()
    done = time.perf_counter()
    http.delete(f"/v1/sessions/{session_id}").raise_for_status()
    warm = metric(http, "eprl_sessions_started_total", env_id=APPWORLD, start="warm")
    return {
        "create_s": made - began,
        "reset_s": done - made,
        "total_s": done - began,
        "warm": warm == warm_before + 1,
    }


def warm_start(
    args: argparse.Namespace, start_service: Callable, stop: Callable, machine: Callable
) -> None:
    sys.path.insert(0, str(ROOT))
    from envs.appworld import AppWorldRuntimeError
    from envs.appworld import cli as appworld_cli
    from envs.appworld.runtime import resolve_python

    try:
        resolve_python()
    except AppWorldRuntimeError as error:
        print(f"warm sessions: skipped ({error})", flush=True)
        return
    root = Path(tempfile.mkdtemp(prefix="eprl-bench-warm-data-"))
    try:
        if appworld_cli.make_data(out=str(root), seed=0) != 0:
            raise RuntimeError("eprl appworld make-data failed")
        task_id = (root / "data" / "datasets" / "train.txt").read_text().split()[0]
        extra = {
            "env_ids": [APPWORLD],
            "pinned_env_kwargs": {
                APPWORLD: {"root": str(root), "python": None, "server_urls": None}
            },
            "warm_sessions": {APPWORLD: 1},
            "warm_env_kwargs": {APPWORLD: WARM_KWARGS},
        }
        load_before = os.getloadavg()[0]
        service, url = start_service(4, {}, None, extra)
        rounds: list[dict[str, dict]] = []
        try:
            with httpx.Client(base_url=url, timeout=600) as http:
                for _ in range(args.appworld_rounds):
                    wait_quiet(http)
                    cold = first_reset(http, COLD_KWARGS, task_id)
                    wait_quiet(http)
                    warm = first_reset(http, WARM_KWARGS, task_id)
                    assert warm["warm"] and not cold["warm"], (cold, warm)
                    rounds.append({"cold": cold, "warm": warm})
                    print("warm start", rounds[-1], flush=True)
        finally:
            stop(service)
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    write(args, rounds, task_id, machine(), load_before, load_after)


def write(
    args: argparse.Namespace,
    rounds: list[dict[str, dict]],
    task_id: str,
    machine: str,
    load_before: float,
    load_after: float,
) -> None:
    def cell(kind: str, key: str) -> str:
        values = [round_[kind][key] for round_ in rounds]
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    ratios = [r["cold"]["total_s"] / r["warm"]["total_s"] for r in rounds]
    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    lines = [
        "# Warm sessions: the first reset of a new eprl/AppWorld-v0 session, cold vs warm",
        "",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine}; load average before/after: {load_before:.1f} / {load_after:.1f}"
        " (the machine is shared; absolute numbers move with its load, ratios less so)",
        f"- Work: `eprl serve` with `warm_sessions: {{{APPWORLD}: 1}}` and `warm_env_kwargs:"
        f" {WARM_KWARGS}`, the offline generated dataset (seed 0), task `{task_id}`; each"
        " round, on a quiet service (warm worker ready, nothing starting, no session): a cold"
        f" session (kwargs {COLD_KWARGS}: no warm worker matches) then a warm one, each"
        " created, reset once and closed over HTTP on loopback",
        "",
        f"## Seconds ({len(rounds)} rounds; median (range))",
        "",
        "| session | create | first reset | create + first reset |",
        "|---|---:|---:|---:|",
        f"| cold | {cell('cold', 'create_s')} | {cell('cold', 'reset_s')} |"
        f" {cell('cold', 'total_s')} |",
        f"| warm | {cell('warm', 'create_s')} | {cell('warm', 'reset_s')} |"
        f" {cell('warm', 'total_s')} |",
        "",
        f"Cold / warm (create + first reset), per round: median {statistics.median(ratios):.1f}x"
        f" (range {min(ratios):.1f}-{max(ratios):.1f}x).",
        "",
        "Cold: the session's worker makes the env, and its first reset starts a sealed AppWorld"
        " server (bubblewrap sandbox, AppWorld's imports), then installs the task and"
        " `/initialize`s it. Warm: the worker, its env and that server were started before the"
        " session; the reset only installs the task and initialises it. Both resets also start"
        " the runtime's spare server for the next episode in the background.",
        "",
    ]
    from agent.io import atomic_write_text

    atomic_write_text(Path(args.appworld_out), "\n".join(lines))
    print("\n".join(lines))
