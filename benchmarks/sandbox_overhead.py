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
import platform
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

from envs.sandbox import (  # noqa: E402
    DRIVER_SOURCE,
    PythonSandbox,
    SandboxConfig,
    find_python,
    run_once,
)

CELLS = {"pass": "pass", "workload": "sum(i * i for i in range(20000))"}
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


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} logical CPUs, {mem_gib:.0f} GiB RAM, {platform.platform()}"


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
        "plain subprocess (peer)": PlainRepl(python),
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
    for _ in range(args.runs):
        for cell_name, code in CELLS.items():
            start = time.perf_counter()
            assert run_once(code, config).ok
            one_shot.setdefault(("fresh bwrap sandbox", cell_name), []).append(
                time.perf_counter() - start
            )
            start = time.perf_counter()
            subprocess.run([python, "-I", "-S", "-c", code], check=True)
            one_shot.setdefault(("plain subprocess (peer)", cell_name), []).append(
                time.perf_counter() - start
            )
    load_after = os.getloadavg()[0]

    def median_ms(samples: dict, key: tuple) -> float:
        return statistics.median(samples[key]) * 1000

    peer = "plain subprocess (peer)"
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
        "| cell | kind | ms per cell | cells/s | overhead vs peer (ms) | ratio vs peer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for cell_name, code in CELLS.items():
        base = median_ms(per_cell, (peer, cell_name))
        for kind in repls:
            ms = median_ms(per_cell, (kind, cell_name))
            lines.append(
                f"| `{code}` | {kind} | {ms:.3f} | {1000 / ms:,.0f} | {ms - base:+.3f} | "
                f"{ms / base:.2f} |"
            )
    lines += [
        "",
        "## One-shot (fresh process per run: start, run, exit or kill)",
        "",
        "| cell | kind | ms per run | runs/s | overhead vs peer (ms) | ratio vs peer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for cell_name, code in CELLS.items():
        base = median_ms(one_shot, (peer, cell_name))
        for kind in ("fresh bwrap sandbox", peer):
            ms = median_ms(one_shot, (kind, cell_name))
            lines.append(
                f"| `{code}` | {kind} | {ms:.1f} | {1000 / ms:.1f} | {ms - base:+.1f} | "
                f"{ms / base:.2f} |"
            )
    lines += [
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
