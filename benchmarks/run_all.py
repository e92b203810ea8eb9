"""Run every benchmark (`make bench`): each ``benchmarks/*.py`` script in turn, with a per-script
timeout and a total budget, then a summary of which result files each one wrote.

Scripts are found by globbing (``run_all.py`` itself and ``_*.py`` helpers are skipped), so a
new benchmark is picked up without editing this file. Each runs with its own defaults, in a
fresh process, from the repository root. A script that fails or runs past its timeout is
reported and the others still run; the exit status is 1 if any failed, timed out or was
skipped for lack of budget.

    python benchmarks/run_all.py [--budget 1140] [--timeout 300] [--only NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
# per-script timeouts (s) where the default does not fit; the total budget caps them all
TIMEOUTS = {
    # four workloads since 2026-12-01; on 2026-12-01 here with 1 thread: appworld 5, unrelated
    # 8, varlen ~12 min (group about as long): give them 45 minutes
    "learner_throughput": 2700,
    "serving_throughput": 600,  # + 3 AppWorld cold/warm session rounds with the data generated
    "fp32_path_cost": 420,
    "appworld_latency": 360,
    "loss_path_memory": 360,
}

ONLY_WHEN_NAMED = {"quickstart_seeds"}


def scripts() -> list[Path]:
    return sorted(
        p for p in BENCH.glob("*.py") if p.name != "run_all.py" and not p.name.startswith("_")
    )


def _snapshot() -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in RESULTS.glob("*.md")} if RESULTS.is_dir() else {}


def run_script(path: Path, timeout: float) -> tuple[str, float, str]:
    """(status, seconds, last lines of output); the script runs in its own process group so a
    timeout ends its children too."""
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(path.relative_to(ROOT))],  # results name the command as typed
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
        status = "ok" if process.returncode == 0 else f"failed (exit {process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        status = f"timed out after {timeout:.0f} s"
    tail = "\n".join((output or "").strip().splitlines()[-6:])
    return status, time.monotonic() - start, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget", type=float, default=19 * 60, help="total seconds for all scripts"
    )
    parser.add_argument("--timeout", type=float, default=300, help="default per-script timeout (s)")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="run only these (names without .py)"
    )
    parser.add_argument("--list", action="store_true", help="list the scripts and their timeouts")
    args = parser.parse_args(argv)
    todo = scripts()
    if not args.only:
        # runs of tens of minutes (the quick start over seeds and methods): only when named
        todo = [p for p in todo if p.stem not in ONLY_WHEN_NAMED]
    if args.only:
        unknown = set(args.only) - {p.stem for p in todo}
        if unknown:
            parser.error(
                f"unknown benchmark(s) {sorted(unknown)}; expected some of {[p.stem for p in todo]}"
            )
        todo = [p for p in todo if p.stem in args.only]
    if args.list:
        for path in todo:
            print(f"{path.stem:24s} timeout {TIMEOUTS.get(path.stem, args.timeout):.0f} s")
        return 0

    started = time.monotonic()
    summary = []
    for path in todo:
        left = args.budget - (time.monotonic() - started)
        if left < 30:
            summary.append((path.stem, "skipped (total budget spent)", 0.0, []))
            continue
        timeout = min(TIMEOUTS.get(path.stem, args.timeout), left)
        print(f"==> {path.name} (timeout {timeout:.0f} s)", flush=True)
        before = _snapshot()
        status, seconds, tail = run_script(path, timeout)
        written = sorted(p.name for p, mtime in _snapshot().items() if before.get(p) != mtime)
        print(tail, flush=True)
        print(
            f"<== {path.name}: {status} in {seconds:.0f} s; wrote {', '.join(written) or 'nothing'}\n",
            flush=True,
        )
        summary.append((path.stem, status, seconds, written))

    total = time.monotonic() - started
    width = max(len(name) for name, *_ in summary) if summary else 10
    print(f"benchmark summary ({total / 60:.1f} min):")
    for name, status, seconds, written in summary:
        print(
            f"  {name:{width}s}  {status:32s} {seconds:6.0f} s  {', '.join('results/' + w for w in written) or '-'}"
        )
    bad = [name for name, status, *_ in summary if status != "ok"]
    missing = [name for name, status, _, written in summary if status == "ok" and not written]
    if missing:
        print(f"note: {', '.join(missing)} finished without writing a result file")
    return 1 if bad or missing else 0


if __name__ == "__main__":
    sys.exit(main())
