"""Sequential learning: does an objective that keeps entropy leave a model that learns the next
task family better? (The paper's claim that no framework measures; issue 19.)

Phase 1 trains the base model on one task family (``--phase1-family``) with GRPO (whose entropy
falls) and with REPO-R (the quick start's objective, which regulates it). Phase 2 continues
every phase-1 model, and the base model, on a new family (``--phase2-family``) with the same
objective-neutral recipe (plain RLOO) and budget, evaluating held-out pass@1 on the new family at
its start and every ``eval.every`` steps. Several seeds; the report is the median and the range.

    python benchmarks/sequential/run.py [--seeds 0,1,2] [--phase1-steps 12] [--phase2-steps 12]
    python benchmarks/sequential/run.py --analyze-only

Each run is an eprl run directory ``RUNS/p1_<method>_s<seed>`` or ``RUNS/p2_<start>_s<seed>``
(``start`` = base | grpo | repo_r). A finished run holds ``sequential_done.json`` and is
skipped; an interrupted one resumes from its last checkpoint; so the driver can be stopped at
any time and started again. Finished runs' records (config, metrics, per-task evaluations) are
committed; their checkpoints are not, so a phase-2 run whose phase-1 start lost its weights
(a new clone) says so and names the folder to delete. Phase 2 of a start waits for that
start's phase-1 run of the same seed. After every run it rewrites
``benchmarks/sequential/RESULTS.md`` and ``sequential.png`` (:mod:`analyze`). The shared recipe
is ``config.yaml`` beside this file; ``--set key=value`` overrides it for every run.

Budget: a phase-2 run costs about as much as the quick start's training with four evaluations
(~7 min on 2 free cores at 12 steps), a phase-1 run (one evaluation) less, so 3 seeds x
(2 phase-1 + 3 phase-2 runs) are about 1 h 30 min.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

CONFIG = HERE / "config.yaml"
DONE = "sequential_done.json"
# phase 1's objectives; phase 2 is plain RLOO for every start
PHASE1 = {
    "grpo": ["objective.advantage=grpo", "objective.repo.variant=none"],
    "repo_r": [
        "objective.advantage=rloo",
        "objective.repo.variant=r_submitted",
        "objective.target_entropy_tasks=6",
        "objective.repo.zeta_init=0.1",
        "objective.repo.zeta_min=0.05",
        "objective.repo.zeta_max=1.0",
        "objective.repo.dead_band=0.1",
        "objective.repo.smoothing=0.5",
    ],
}
PHASE2 = ["objective.advantage=rloo", "objective.repo.variant=none"]
# Phase 1 is evaluated once, at its end, on its own family: the report reads phase 1's training
# entropy, and its held-out curve would cost three evaluations per run that nothing reads.
PHASE1_EVAL = ["eval.every=0", "eval.at_start=false", "eval.at_end=true"]
STARTS = ("base", *PHASE1)


def family(name: str, levels: str) -> list[str]:
    return [f"env.kwargs.families=[{name}]", f"env.kwargs.levels=[{levels}]"]


def plan(args) -> list[tuple[str, str, int, list[str]]]:
    """(run name, phase, seed, overrides) in the order they run: per seed, phase 1 of each
    method, then phase 2 of each start."""
    runs = []
    shared = [f"logging.runs_root={args.runs_root}", *args.set]
    for seed in args.seeds:
        for method, objective in PHASE1.items():
            runs.append(
                (
                    f"p1_{method}_s{seed}",
                    "1",
                    seed,
                    [
                        f"seed={seed}",
                        f"steps={args.phase1_steps}",
                        *family(args.phase1_family, args.phase1_levels),
                        *objective,
                        *PHASE1_EVAL,
                        *shared,
                    ],
                )
            )
        for start in STARTS:
            runs.append(
                (
                    f"p2_{start}_s{seed}",
                    "2",
                    seed,
                    [
                        f"seed={seed}",
                        f"steps={args.phase2_steps}",
                        *family(args.phase2_family, args.phase2_levels),
                        *PHASE2,
                        *shared,
                    ],
                )
            )
    return runs


def start_model(runs_root: Path, name: str) -> str | None:
    """The model a phase-2 run starts from: the base model (None: the config's), or the last
    checkpoint of the phase-1 run of its start and seed (which must have finished)."""
    from trainer.checkpoint import latest_checkpoint

    start, seed = name[len("p2_") :].rsplit("_s", 1)
    if start == "base":
        return None
    source = runs_root / f"p1_{start}_s{seed}"
    if not (source / DONE).exists():
        raise RuntimeError(f"{name} starts from {source}, which has not finished")
    checkpoint = latest_checkpoint(source)
    if checkpoint is None:  # run records are committed, checkpoints are not
        raise RuntimeError(
            f"{name} starts from {source}, which finished but has no checkpoint left (weights "
            f"are not committed with the run records): delete {source} to train it again"
        )
    return str(checkpoint)


def run_one(runs_root: Path, name: str, phase: str, overrides: list[str]) -> None:
    from agent.io import atomic_write_text
    from trainer.checkpoint import latest_checkpoint
    from trainer.config import load_config
    from trainer.loop import run_training

    run_dir = runs_root / name
    model = start_model(runs_root, name) if phase == "2" else None
    extra = [f"logging.run_name={name}"] + ([f"model.name={model}"] if model else [])
    cfg = load_config(CONFIG, [*overrides, *extra])
    resume = latest_checkpoint(run_dir) is not None
    started = time.time()
    run_training(cfg, run_dir, resume=resume)
    atomic_write_text(
        run_dir / DONE,
        json.dumps(
            {"phase": phase, "start_model": cfg.model.name, "seconds": time.time() - started}
        ),
    )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--phase1-family", default="arithmetic")
    parser.add_argument("--phase1-levels", default="1")
    parser.add_argument("--phase2-family", default="arithmetic")
    parser.add_argument(
        "--phase2-levels",
        default="2",
        help="phase 2's levels (default 2: the 135M model's reward on the other families is ~0, "
        "so no objective gets a signal there; see docs/entropy_study.md)",
    )
    parser.add_argument("--phase1-steps", type=int, default=12)
    parser.add_argument("--phase2-steps", type=int, default=12)
    parser.add_argument("--runs-root", default=str(HERE / "runs"))
    parser.add_argument("--results", default=str(HERE), help="folder of RESULTS.md and figure")
    parser.add_argument("--set", action="append", default=[], help="key=value for every run")
    parser.add_argument("--analyze-only", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        parser.error("--seeds is empty")
    if (args.phase1_family, args.phase1_levels) == (args.phase2_family, args.phase2_levels):
        parser.error(
            f"phase 2 must be a new task set; both phases are {args.phase1_family} "
            f"levels {args.phase1_levels}"
        )
    for steps in (args.phase1_steps, args.phase2_steps):
        if steps < 1:
            parser.error(f"phase steps must be >= 1, got {steps}")
    return args


def _analyze_module():
    """This folder's analyze.py under its own name (the entropy study has an ``analyze`` too)."""
    spec = importlib.util.spec_from_file_location("sequential_analyze", HERE / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    analyze = _analyze_module()
    args = parse(argv)
    runs_root = Path(args.runs_root)
    if not args.analyze_only:
        for name, phase, _seed, overrides in plan(args):
            if (runs_root / name / DONE).exists():
                print(f"[sequential] {name}: finished, skipped", flush=True)
                continue
            print(f"[sequential] {name}: running", flush=True)
            run_one(runs_root, name, phase, overrides)
            analyze.write(runs_root, Path(args.results), vars(args))
    analyze.write(runs_root, Path(args.results), vars(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
