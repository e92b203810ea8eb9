"""Sandbox overhead: eprl's sandboxed Python versus plain subprocesses running the same code.

Persistent REPL (what a multi-turn episode uses): cells per second and time per cell of
- ``PythonSandbox`` in mode ``bwrap`` (namespaces + uid 65534 + rlimits, the default),
- ``PythonSandbox`` in mode ``rlimits-only``,
- the peer: a plain subprocess running the same REPL driver over the same pipes (no bwrap, no
  rlimits, no uid drop), so the difference is what isolation costs per cell.

One-shot (what grading uses: a fresh sandbox per submission): ``run_once`` in a fresh bwrap
sandbox (start, one cell, kill) versus the peer ``subprocess.run([python, "-c", code])``.

Two cells: ``pass`` (pure overhead) and a small workload (``sum(i * i for i in range(20000))``).
Runs are interleaved and repeated; medians are reported, ratios are sandbox / peer.

    python benchmarks/sandbox_overhead.py [--cells 300] [--repeats 5] [--runs 30]
"""

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench_util import machine  # noqa: E402

from envs.sandbox import (  # noqa: E402
    DRIVER_SOURCE,
    PythonSandbox,
    SandboxConfig,
    find_python,
    run_once,
)

CELLS = {"pass": "pass", "workload": "sum(i * i for i in range(20000))"}
PEER = "plain subprocess (peer)"
HEADER = struct.Struct(">I")


class PlainRepl:
    """The same driver and protocol as the sandbox, in an unconfined subprocess."""

    def __init__(self, python: str) -> None:
        command = [python, "-I", "-S", "-X", "utf8", "-c", DRIVER_SOURCE, "2000", "no-reap"]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._read()  # ready

    def _read(self) -> dict:
        size = HEADER.unpack(self.process.stdout.read(HEADER.size))[0]
        return json.loads(self.process.stdout.read(size))

    def run_cell(self, code: str) -> dict:
        body = code.encode()
        self.process.stdin.write(HEADER.pack(len(body)) + body)
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def time_cells(repl, code: str, cells: int) -> float:
    """Seconds per cell over ``cells`` cells."""
    start = time.perf_counter()
    for _ in range(cells):
        repl.run_cell(code)
    return (time.perf_counter() - start) / cells


def ratio_table(
    samples: dict[tuple[str, str], list[float]], kinds: list[str], unit: str, digits: int, rate: str
) -> list[str]:
    """Markdown rows per cell and kind: median ms per ``unit``, ``unit``s per second, and the
    overhead and ratio against the peer's median on the same cell (the peer runs in the same
    interleaved loop, so load moves both)."""
    lines = [
        f"| cell | kind | ms per {unit} | {unit}s/s | overhead vs peer (ms) | ratio vs peer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for cell_name, code in CELLS.items():
        base = statistics.median(samples[(PEER, cell_name)]) * 1000
        for kind in kinds:
            ms = statistics.median(samples[(kind, cell_name)]) * 1000
            lines.append(
                f"| `{code}` | {kind} | {ms:.{digits}f} | {1000 / ms:{rate}} | "
                f"{ms - base:+.{digits}f} | {ms / base:.2f} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=300, help="cells per persistent-REPL trial")
    parser.add_argument("--repeats", type=int, default=5, help="trials per REPL kind and cell")
    parser.add_argument("--runs", type=int, default=30, help="one-shot runs per kind and cell")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "sandbox_overhead.md"
    )
    args = parser.parse_args(argv)
    if shutil.which("bwrap") is None:
        print("bubblewrap is not installed: apt-get install bubblewrap", file=sys.stderr)
        return 1
    python = find_python()
    load_before = os.getloadavg()[0]
    started = dt.datetime.now(dt.UTC)

    # persistent REPLs: one of each kind, warmed up, trials interleaved
    repls = {
        "bwrap sandbox": PythonSandbox(SandboxConfig(mode="bwrap", cpu_seconds=600)),
        "rlimits-only sandbox": PythonSandbox(SandboxConfig(mode="rlimits-only", cpu_seconds=600)),
        PEER: PlainRepl(python),
    }
    per_cell: dict[tuple[str, str], list[float]] = {}
    try:
        for repl in repls.values():
            time_cells(repl, "pass", 20)
        for _ in range(args.repeats):
            for cell_name, code in CELLS.items():
                for kind, repl in repls.items():
                    per_cell.setdefault((kind, cell_name), []).append(
                        time_cells(repl, code, args.cells)
                    )
    finally:
        for repl in repls.values():
            repl.close()

    # one-shot: fresh bwrap sandbox per run vs `python -c`
    one_shot: dict[tuple[str, str], list[float]] = {}
    config = SandboxConfig(mode="bwrap")

    def fresh_sandbox(code: str) -> None:
        assert run_once(code, config).ok

    def plain_process(code: str) -> None:
        subprocess.run([python, "-I", "-S", "-c", code], check=True)

    one_shot_kinds = {"fresh bwrap sandbox": fresh_sandbox, PEER: plain_process}
    for _ in range(args.runs):
        for cell_name, code in CELLS.items():
            for kind, run in one_shot_kinds.items():
                start = time.perf_counter()
                run(code)
                one_shot.setdefault((kind, cell_name), []).append(time.perf_counter() - start)
    load_after = os.getloadavg()[0]

    lines = [
        "# Sandbox overhead: sandboxed Python vs plain subprocesses",
        "",
        f"- Command: `{shlex.join(['python', 'benchmarks/sandbox_overhead.py', *sys.argv[1:]])}`",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine()}; load average before/after: {load_before:.1f} / "
        f"{load_after:.1f} (a shared machine: absolute numbers move with its load, ratios less)",
        f"- Sandbox interpreter: {python}; bubblewrap: "
        f"{subprocess.run(['bwrap', '--version'], capture_output=True, text=True).stdout.strip()}",
        f"- Persistent REPL: {args.repeats} interleaved trials x {args.cells} cells per kind; "
        f"one-shot: {args.runs} runs per kind; medians",
        "",
        "## Persistent REPL (one session, many cells)",
        "",
        *ratio_table(per_cell, list(repls), "cell", digits=3, rate=",.0f"),
        "",
        "## One-shot (fresh process per run: start, run, exit or kill)",
        "",
        *ratio_table(one_shot, list(one_shot_kinds), "run", digits=1, rate=".1f"),
        "",
        "The persistent peer runs the same driver (length-prefixed messages over pipes, output",
        "capture thread) without bwrap, rlimits or the uid drop, so its difference to the",
        "sandbox is the price of isolation per cell (in bwrap mode it includes the sweep that",
        "kills every other process of the sandbox's PID namespace after each cell). The one-shot",
        "sandbox also pays bwrap's namespace setup, the driver's start-up and the kill.",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
