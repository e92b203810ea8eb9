"""Serving overhead: eprl/CodeExec-v0 stepped through the service versus in-process.

The same env, the same cheap cell (``x = 1`` in the sandboxed REPL), stepped by 1 and by 32
concurrent sessions (one thread each): in-process ``gymnasium.make("eprl/CodeExec-v0")`` versus
``gymnasium.make("eprl/Remote-v0", ...)`` against a real ``eprl serve`` on loopback (uvicorn in a
subprocess, one worker process per session). Reports steps/s and p50/p99 step latency, with
remote / in-process ratios, and the resident memory of an idle CodeExec session (its worker plus
the sandbox it holds): RSS (counts pages shared with the forkserver in every worker), PSS
(shared pages split among their users) and USS (pages only this session holds: what one more
session costs). Then the operator's cases: the 32 sessions spread over 2 replicas
(``RemoteEnv(url=[a, b])``) against the same 32 on one, and the cost of TLS per step: 1 session
over HTTPS (uvicorn's TLS, a certificate made with the ``openssl`` CLI) against the same over
plain HTTP, alternated ``--tls-rounds`` times (median and range).

Then warm sessions (``warm_sessions``): the first reset of a new eprl/AppWorld-v0 session
(create + reset, as a client's first ``reset()`` does it) when a warm worker was ready for it
against a cold one (kwargs no warm worker has), alternated ``--appworld-rounds`` times on one
service, over the offline generated dataset; written to its own results file
(``serving_warm_start.md``), so ``--appworld-only`` can refresh it alone.

    python benchmarks/serving_throughput.py [--steps 200] [--concurrency 1 32] [--idle 8]
        [--replica-sessions 32] [--tls-rounds 3] [--appworld-rounds 3] [--appworld-only]
"""

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gymnasium
import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench_util import machine  # noqa: E402

import envs  # noqa: E402, F401  (registers the ids)
from agent.io import atomic_write_text  # noqa: E402

ENV_ID = "eprl/CodeExec-v0"
CELL = "```python\nx = 1\n```"
MEMORY_TARGET_MB = 64


def start_service(
    max_sessions: int, sandbox: dict, tls: dict | None = None, extra: dict | None = None
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = {
        "port": port,
        "max_sessions": max_sessions,
        "access_log": False,
        "log_level": "warning",
        "drain_grace_s": 0.0,
        "pinned_env_kwargs": {ENV_ID: {"sandbox": sandbox}},
    }
    if tls:
        settings.update(tls_certfile=tls["certfile"], tls_keyfile=tls["keyfile"])
    settings.update(extra or {})
    code = "import json, sys\nfrom serving.app import serve\nserve(**json.loads(sys.argv[1]))\n"
    process = subprocess.Popen([sys.executable, "-c", code, json.dumps(settings)], cwd=ROOT)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    verify = ssl.create_default_context(cafile=tls["certfile"]) if tls else True
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2, verify=verify).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the service did not start")


def self_signed(folder: Path) -> dict:
    """A self-signed loopback certificate (it is its own CA) made with the openssl CLI."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return {"certfile": str(cert), "keyfile": str(key)}


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(60)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(make_env, sessions: int, steps: int) -> dict:
    """Reset ``sessions`` envs and warm their REPL, then step them all at once from threads."""
    envs_ = [make_env() for _ in range(sessions)]
    for seed, env in enumerate(envs_):
        env.reset(seed=seed)
        env.step(CELL)  # starts the sandboxed REPL
    latencies: list[list[float]] = [[] for _ in envs_]
    start = threading.Barrier(sessions + 1)

    def stepper(index: int) -> None:
        env, own = envs_[index], latencies[index]
        start.wait()
        for _ in range(steps):
            began = time.perf_counter()
            observation, _, terminated, truncated, _ = env.step(CELL)
            own.append(time.perf_counter() - began)
            assert not (terminated or truncated), observation

    threads = [threading.Thread(target=stepper, args=(i,)) for i in range(sessions)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    for env in envs_:
        env.close()
    flat = [latency for own in latencies for latency in own]
    assert len(flat) == sessions * steps, "a stepping thread failed"
    return {
        "steps_per_s": len(flat) / wall,
        "p50_ms": statistics.median(flat) * 1e3,
        "p99_ms": percentile(flat, 0.99) * 1e3,
    }


def session_memory(url: str, session_id: str) -> dict:
    """RSS / PSS / USS (MiB) of a session's worker process plus everything it started."""
    pid = httpx.get(f"{url}/v1/sessions/{session_id}", timeout=30).json()["worker_pid"]
    worker = psutil.Process(pid)
    totals = {"rss": 0.0, "pss": 0.0, "uss": 0.0}
    for process in [worker, *worker.children(recursive=True)]:
        info = process.memory_full_info()
        for key in totals:
            totals[key] += getattr(info, key) / 2**20
    return totals


def idle_memory(url: str, idle: int, kwargs: dict, warm_cell: bool) -> dict:
    remotes = [
        gymnasium.make("eprl/Remote-v0", url=url, env_id=ENV_ID, env_kwargs=kwargs)
        for _ in range(idle)
    ]
    for seed, env in enumerate(remotes):
        env.reset(seed=seed)
        if warm_cell:
            env.step(CELL)
    time.sleep(1.0)
    per_session = [session_memory(url, env.unwrapped.session_id) for env in remotes]
    for env in remotes:
        env.close()
    return {
        key: (statistics.mean(m[key] for m in per_session), max(m[key] for m in per_session))
        for key in ("rss", "pss", "uss")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per session")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--idle", type=int, default=8, help="idle sessions measured for memory")
    parser.add_argument(
        "--replica-sessions", type=int, default=32, help="sessions spread over 2 replicas"
    )
    parser.add_argument("--tls-rounds", type=int, default=3, help="HTTP/HTTPS alternations")
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "serving_throughput.md")
    )
    parser.add_argument(
        "--appworld-rounds", type=int, default=3, help="cold/warm AppWorld first-reset pairs"
    )
    parser.add_argument(
        "--appworld-only", action="store_true", help="only the warm-session measurement"
    )
    parser.add_argument(
        "--appworld-out", default=str(ROOT / "benchmarks" / "results" / "serving_warm_start.md")
    )
    args = parser.parse_args()
    if not args.appworld_only:
        codeexec(args)
    if args.appworld_rounds > 0:
        from _serving_warm_start import warm_start

        warm_start(args, start_service, stop, machine)


def codeexec(args: argparse.Namespace) -> None:
    """Steps, idle memory, replicas and TLS of eprl/CodeExec-v0 (results: ``--out``)."""
    most = max(args.concurrency + [args.replica_sessions])
    # default sandboxes: each runs under a host uid of its own on a root host
    sandbox: dict = {}
    kwargs = {"max_turns": args.steps + 10}
    load_before = os.getloadavg()[0]
    service, url = start_service(max(most, args.idle) + 2, sandbox)
    results: dict[int, dict[str, dict]] = {}
    replicas: dict[str, dict] = {}
    tls_rounds: list[dict[str, dict]] = []

    def remote(urls: str | list[str], ca_file: str | None = None):
        return lambda: gymnasium.make(
            "eprl/Remote-v0", url=urls, env_id=ENV_ID, env_kwargs=kwargs, ca_file=ca_file
        )

    try:
        for sessions in args.concurrency:
            results[sessions] = {
                "in-process": run(
                    lambda: gymnasium.make(ENV_ID, sandbox=sandbox, **kwargs), sessions, args.steps
                ),
                "remote": run(remote(url), sessions, args.steps),
            }
            print(sessions, json.dumps(results[sessions]), flush=True)
        memory_single = idle_memory(url, args.idle, {}, warm_cell=False)
        memory_repl = idle_memory(url, args.idle, {"max_turns": 3}, warm_cell=True)
        forkserver = [
            p
            for p in psutil.Process(service.pid).children()
            if "forkserver" in " ".join(p.cmdline())
        ]
        forkserver_rss = forkserver[0].memory_info().rss / 2**20 if forkserver else float("nan")

        second, second_url = start_service(args.replica_sessions + 2, sandbox)
        try:
            replicas["1 replica"] = run(remote(url), args.replica_sessions, args.steps)
            replicas["2 replicas"] = run(
                remote([url, second_url]), args.replica_sessions, args.steps
            )
        finally:
            stop(second)
        print("replicas", json.dumps(replicas), flush=True)

        with tempfile.TemporaryDirectory() as folder:
            tls = self_signed(Path(folder))
            secure, secure_url = start_service(4, sandbox, tls)
            try:
                for _ in range(args.tls_rounds):
                    tls_rounds.append(
                        {
                            "http": run(remote(url), 1, args.steps),
                            "https": run(remote(secure_url, tls["certfile"]), 1, args.steps),
                        }
                    )
            finally:
                stop(secure)
        print("tls", json.dumps(tls_rounds), flush=True)
    finally:
        stop(service)
    load_after = os.getloadavg()[0]

    command = "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    lines = [
        "# Serving throughput: eprl/CodeExec-v0 through `eprl serve` vs in-process",
        "",
        f"- Command: `{command}`",
        f"- Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine()}; load average before/after: {load_before:.1f} / {load_after:.1f}"
        " (the machine is shared; absolute numbers move with its load, ratios less so)",
        f"- Work: each session resets, runs one cell to start its sandboxed REPL, then {args.steps}"
        " steps of the cell `x = 1`, one thread per session; remote = RemoteEnv -> HTTP on"
        " loopback -> uvicorn -> the session's worker process -> the env -> its sandbox",
        "",
        "## Steps (remote / in-process; throughput ratio < 1 and latency ratio > 1 are the cost)",
        "",
        "| sessions | in-process steps/s | remote steps/s | ratio | in-process p50 / p99 (ms) |"
        " remote p50 / p99 (ms) | p50 ratio | p99 ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for sessions, pair in results.items():
        local, remote = pair["in-process"], pair["remote"]
        lines.append(
            f"| {sessions} | {local['steps_per_s']:.0f} | {remote['steps_per_s']:.0f} | "
            f"{remote['steps_per_s'] / local['steps_per_s']:.2f} | "
            f"{local['p50_ms']:.2f} / {local['p99_ms']:.2f} | "
            f"{remote['p50_ms']:.2f} / {remote['p99_ms']:.2f} | "
            f"{remote['p50_ms'] / local['p50_ms']:.2f} | {remote['p99_ms'] / local['p99_ms']:.2f} |"
        )
    lines += [
        "",
        f"## Memory of an idle CodeExec session ({args.idle} sessions, mean / max, MiB; target: RSS < {MEMORY_TARGET_MB})",
        "",
        "| session state | processes | RSS | PSS | USS |",
        "|---|---|---:|---:|---:|",
    ]
    for label, processes, memory in (
        ("after reset, single-turn (default kwargs)", "worker", memory_single),
        (
            "after a cell, max_turns=3 (REPL alive)",
            "worker + bwrap + sandboxed python",
            memory_repl,
        ),
    ):
        cells = " | ".join(
            f"{memory[key][0]:.1f} / {memory[key][1]:.1f}" for key in ("rss", "pss", "uss")
        )
        lines.append(f"| {label} | {processes} | {cells} |")
    verdict = "met" if memory_repl["rss"][1] < MEMORY_TARGET_MB else "missed"
    lines += [
        "",
        f"Target {verdict}: the largest idle session (worker + REPL sandbox) has an RSS of "
        f"{memory_repl['rss'][1]:.1f} MiB. Workers fork from a forkserver that has imported"
        f" gymnasium and the env modules (its own RSS: {forkserver_rss:.1f} MiB), so most of a"
        " worker's RSS is shared; USS is what each additional session adds.",
        "",
    ]
    one, two = replicas["1 replica"], replicas["2 replicas"]
    lines += [
        "",
        f"## {args.replica_sessions} sessions on 1 replica vs spread over 2 (same machine)",
        "",
        "| replicas | steps/s | p50 / p99 (ms) | throughput ratio vs 1 |",
        "|---:|---:|---:|---:|",
        f"| 1 | {one['steps_per_s']:.0f} | {one['p50_ms']:.2f} / {one['p99_ms']:.2f} | 1.00 |",
        f"| 2 | {two['steps_per_s']:.0f} | {two['p50_ms']:.2f} / {two['p99_ms']:.2f} | "
        f"{two['steps_per_s'] / one['steps_per_s']:.2f} |",
        "",
        "Both replicas share this machine's cores, so the ratio shows the cost of spreading"
        " (none expected beyond noise), not the gain of a second host.",
    ]

    def spread(key: str, scheme: str) -> str:
        values = [round_[scheme][key] for round_ in tls_rounds]
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    def extra(key: str) -> str:
        values = [round_["https"][key] - round_["http"][key] for round_ in tls_rounds]
        return f"{statistics.median(values):+.2f} ({min(values):+.2f} to {max(values):+.2f})"

    lines += [
        "",
        f"## TLS cost per step (1 session, {args.tls_rounds} alternating rounds; median (range))",
        "",
        "| | HTTP | HTTPS | HTTPS - HTTP |",
        "|---|---:|---:|---:|",
        f"| p50 (ms) | {spread('p50_ms', 'http')} | {spread('p50_ms', 'https')} | "
        f"{extra('p50_ms')} |",
        f"| p99 (ms) | {spread('p99_ms', 'http')} | {spread('p99_ms', 'https')} | "
        f"{extra('p99_ms')} |",
        f"| steps/s | {spread('steps_per_s', 'http')} | {spread('steps_per_s', 'https')} | "
        f"{extra('steps_per_s')} |",
        "",
        "HTTPS: uvicorn's TLS (TLS 1.3, an ECDSA P-256 certificate), RemoteEnv verifying it by a"
        " CA file; the connection is kept alive, so the handshake is paid once per session.",
        "",
    ]
    atomic_write_text(Path(args.out), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
