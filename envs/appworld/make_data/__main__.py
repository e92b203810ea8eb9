"""Generate a small AppWorld dataset offline (``--validate``: and check every task in AppWorld)."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .dataset import generate
from .validation import validate


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, generate, optionally validate; the exit code is 1 on failures."""
    parser = argparse.ArgumentParser(prog="make_data", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="AppWorld root to write (data/ goes under it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks-per-scenario", type=int, default=3)
    parser.add_argument(
        "--validate", action="store_true", help="run every reference solution through AppWorld"
    )
    args = parser.parse_args(argv)
    start = time.time()
    splits = generate(args.out, seed=args.seed, tasks_per_scenario=args.tasks_per_scenario)
    n_tasks = sum(len(ids) for ids in splits.values())
    print(
        f"wrote {n_tasks} tasks ({', '.join(f'{s}={len(i)}' for s, i in splits.items())}) "
        f"under {os.path.join(os.path.abspath(args.out), 'data')} in {time.time() - start:.1f}s"
    )
    if args.validate:
        failures = validate(os.path.abspath(args.out), [t for ids in splits.values() for t in ids])
        if failures:
            print(
                "reference solutions that did not pass all tests:\n" + "\n".join(failures),
                file=sys.stderr,
            )
            return 1
        print(
            f"validated: all {n_tasks} reference solutions pass all tests ({time.time() - start:.1f}s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
