"""The entropy study: SmolLM2-135M-Instruct on CodeExec procedural tasks, ten objectives, the
same seeds and budget, entropy and held-out pass@k against steps (our small-scale version of the
table of "Entropy-Preserving Reinforcement Learning", methods.md).

Methods (``configs/<method>.yaml``; only ``objective`` and ``precision`` differ): grpo, dapo
(clip-higher), rloo_fp32 (RLOO/LOOP with the FP32 loss path), rloo_bf16 and rloo_fp16 (the same
with ``precision.loss: bf16`` / ``fp16``), repo_r_arxiv (REPO-R as in the arXiv version, with
the faithful controller), repo_r_submitted (the submitted version's positive-only form),
repo_d (constant-beta REPO: not REPO-D as described), repo_d_dh (REPO-D as described,
``beta = zeta dH``, eprl's reading in trainer/objectives.py), adapo. K=8 answers per task for every
method (since 2026-12-01; the committed RESULTS.md ran at K=4 with seven methods).

Budget (the configs' defaults, sized for about 75 minutes on 2 CPU cores as measured here:
~50 s per step of 3 tasks x K=4 x 96 tokens with two mini-batch updates, ~1 s per evaluation
sample): 8 steps per method at lr 3e-5 on arithmetic tasks of levels 1-2 (as the quick start:
the only family where the 135M model's pass rate gives a learning signal); held-out pass@1 /
pass@4 on 24 test tasks (12 per level) x K=4 after steps 4 and 8, and once for the untrained model
(``baseline.json``, the step-0 point of every method). rloo_bf16 runs last: bf16 matmuls are
slow on this CPU (see benchmarks/results/fp32_path_cost.md), so it costs more wall time than
the others. Longer runs: ``--steps 24 --eval-every 8``.

Every method run is an eprl run directory ``RUNS/<method>_s<seed>`` (checkpoint every 4 steps).
The driver skips finished runs (``study_done.json``), resumes interrupted ones from their last
checkpoint (``--resume`` semantics) and starts the rest; so stopping it at any moment and
starting it again loses at most a few steps. After each finished run it calls ``analyze.py``, so
RESULTS.md and the figure grow run by run.

    python benchmarks/entropy_study/run.py --background   # detached; log: RUNS/study.log
    python benchmarks/entropy_study/run.py --status       # progress of every run
    python benchmarks/entropy_study/run.py --stop         # stop it (resume by starting it again)
    python benchmarks/entropy_study/run.py                # foreground (also resumes)
    python benchmarks/entropy_study/run.py --extra-seeds 1,2   # + seeds 1, 2 of every method
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STUDY = Path(__file__).resolve().parent
ROOT = STUDY.parents[1]
sys.path.insert(0, str(ROOT))

from trainer.tasks import stratified_tasks  # noqa: E402  (re-exported for the tests)

METHODS = [
    "grpo",
    "dapo",
    "rloo_fp32",
    "repo_r_arxiv",
    "repo_r_submitted",
    "repo_d",
    "repo_d_dh",
    "adapo",
    "rloo_fp16",
    "rloo_bf16",
]
SEED_METHODS = tuple(METHODS)  # --extra-seeds runs every method at the extra seeds
DONE = "study_done.json"
ATTEMPTS = "study_attempts.jsonl"


# ---------------------------------------------------------------------------------- helpers


def overrides_for(args, method: str, seed: int) -> list[str]:
    out = [
        f"seed={seed}",
        f"logging.runs_root={args.runs_root}",
        f"logging.run_name={method}_s{seed}",
    ]
    if args.steps is not None:
        out.append(f"steps={args.steps}")
    if args.eval_every is not None:
        out.append(f"eval.every={args.eval_every}")
    if args.eval_k is not None:
        out.append(f"eval.k={args.eval_k}")
    return out + list(args.set or [])


def _append_json(path: Path, row: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _raise_on_sigterm() -> None:
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


# ---------------------------------------------------------------------------------- children


def run_one(args) -> int:
    """One method run (a child process): start, or resume from the last checkpoint."""
    from trainer.checkpoint import latest_checkpoint
    from trainer.config import load_config
    from trainer.loop import Trainer
    from trainer.tasks import split_task_ids

    _raise_on_sigterm()
    method, seed = args.one, args.seed
    run_dir = Path(args.runs_root) / f"{method}_s{seed}"
    if (run_dir / DONE).exists():
        return 0
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None and run_dir.exists():
        # killed before its first checkpoint: nothing to resume, but its wall time was spent
        attempts = (run_dir / ATTEMPTS).read_text() if (run_dir / ATTEMPTS).exists() else ""
        shutil.rmtree(run_dir)
        if attempts:
            run_dir.mkdir(parents=True)
            (run_dir / ATTEMPTS).write_text(attempts)
    source = (
        run_dir / "config.yaml" if checkpoint is not None else STUDY / "configs" / f"{method}.yaml"
    )
    cfg = load_config(source, overrides_for(args, method, seed))
    trainer = Trainer(cfg, run_dir, resume=checkpoint is not None)
    trainer.setup()
    test_tasks = split_task_ids(trainer.make_env, cfg.eval.split)
    trainer.eval_tasks = stratified_tasks(test_tasks, args.eval_tasks_per_group)
    attempt = {
        "attempt": f"{os.getpid()}-{time.time():.0f}",
        "start": time.time(),
        "from_step": trainer.step,
    }
    _append_json(run_dir / ATTEMPTS, attempt)
    try:
        trainer.train()
    finally:
        trainer.cleanup()
        saved = latest_checkpoint(run_dir)
        _append_json(
            run_dir / ATTEMPTS,
            {
                "attempt": attempt["attempt"],
                "end": time.time(),
                "checkpoint_step": int(saved.name.split("_")[1]) if saved else 0,
            },
        )
    spans = [
        json.loads(line) for line in (run_dir / ATTEMPTS).read_text().splitlines() if line.strip()
    ]
    (run_dir / DONE).write_text(
        json.dumps(
            {
                "method": method,
                "seed": seed,
                "steps": trainer.step,
                "eval_tasks": trainer.eval_tasks,
                "finished_at": time.time(),
                "attempts": len([s for s in spans if "start" in s]),
            },
            indent=2,
        )
    )
    # the optimizer state is only needed to resume; the final weights stay for `eprl eval`
    for state in (run_dir / "checkpoints").glob("step_*/learner.pt"):
        state.unlink()
    return 0


def run_baseline(args) -> int:
    """The untrained model on the same held-out tasks (step 0 of every method), resumable."""
    from agent.backends import build_policy
    from agent.chat import ChatFormat
    from trainer.config import load_config
    from trainer.evaluation.runner import run_evaluation
    from trainer.tasks import make_env_factory, split_task_ids

    _raise_on_sigterm()
    cfg = load_config(
        STUDY / "configs" / f"{METHODS[0]}.yaml", overrides_for(args, METHODS[0], args.seeds[0])
    )
    make_env = make_env_factory(cfg)
    tasks = stratified_tasks(split_task_ids(make_env, cfg.eval.split), args.eval_tasks_per_group)
    policy = build_policy(cfg.policy, cfg.model.name, seed=cfg.seed)
    tokenizer = policy.tokenizer
    settings = {
        "model": cfg.model.name,
        "env": cfg.env.id,
        "split": cfg.eval.split,
        "backend": "hf",
        "env_kwargs": cfg.env.kwargs,
        "temperature": cfg.eval.temperature,
        "top_p": cfg.policy.top_p,
        "vocab_size": len(tokenizer),
    }
    run_evaluation(
        policy,
        make_env,
        ChatFormat(tokenizer),
        tasks,
        cfg.eval.k,
        Path(args.runs_root) / "baseline.json",
        settings,
        temperature=cfg.eval.temperature,
        seed=cfg.seed + 99_991,
        progress=False,
        **cfg.rollout.budget(),
    )
    return 0


# ---------------------------------------------------------------------------------- driver


def _child_args(args) -> list[str]:
    out = [
        "--runs-root",
        str(args.runs_root),
        "--eval-tasks-per-group",
        str(args.eval_tasks_per_group),
        "--seeds",
        ",".join(map(str, args.seeds)),
    ]
    for flag, value in (
        ("--steps", args.steps),
        ("--eval-every", args.eval_every),
        ("--eval-k", args.eval_k),
    ):
        if value is not None:
            out += [flag, str(value)]
    for item in args.set or []:
        out += ["--set", item]
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Child:
    """The current child process; a SIGTERM to the driver is passed on to it."""

    process: subprocess.Popen | None = None
    stopping = False


def _run_child(extra: list[str], args) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra, *_child_args(args)]
    _Child.process = subprocess.Popen(cmd, cwd=ROOT)
    try:
        return _Child.process.wait()
    finally:
        _Child.process = None


def plan(args) -> list[tuple[str, int]]:
    runs = [(m, s) for s in args.seeds for m in args.methods]
    runs += [
        (m, s)
        for s in args.extra_seeds
        for m in SEED_METHODS
        if m in args.methods and s not in args.seeds
    ]
    return runs


def drive(args) -> int:
    runs_root = Path(args.runs_root)
    runs_root.mkdir(parents=True, exist_ok=True)
    pid_file = runs_root / "study.pid"
    if pid_file.exists():
        other = int(pid_file.read_text().strip() or 0)
        if other and other != os.getpid() and _pid_alive(other):
            raise SystemExit(
                f"a study is already running in {runs_root} (pid {other}); "
                f"stop it with: python {Path(__file__).name} --stop --runs-root {runs_root}"
            )
    pid_file.write_text(str(os.getpid()))
    (runs_root / "study_args.json").write_text(json.dumps(args.argv))

    def forward(signum, frame):
        # only pass it on: the main thread is waiting for the child and sees it exit
        _Child.stopping = True
        if _Child.process is not None:
            _Child.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    failures = []
    started = time.time()
    try:
        if not (runs_root / "baseline.json").exists():
            print(
                f"[study] baseline: the untrained model on the held-out tasks -> {runs_root / 'baseline.json'}",
                flush=True,
            )
            if _run_child(["--baseline"], args) != 0:
                failures.append("baseline")
            if _Child.stopping:
                print(
                    "[study] stopped during the baseline; start the study again to resume",
                    flush=True,
                )
                return 143
        for method, seed in plan(args):
            run_dir = runs_root / f"{method}_s{seed}"
            if (run_dir / DONE).exists():
                print(f"[study] {method} seed {seed}: finished, skipped", flush=True)
                continue
            verb = "resuming" if (run_dir / "checkpoints").is_dir() else "starting"
            print(
                f"[study] {method} seed {seed}: {verb} ({(time.time() - started) / 60:.1f} min into this "
                "invocation)",
                flush=True,
            )
            rc = _run_child(["--one", method, "--seed", str(seed)], args)
            if _Child.stopping:
                print(
                    f"[study] stopped during {method} seed {seed}; start the study again to resume",
                    flush=True,
                )
                return 143
            if rc != 0:
                failures.append(f"{method}_s{seed} (exit {rc})")
                print(
                    f"[study] {method} seed {seed}: FAILED with exit code {rc}; going on",
                    flush=True,
                )
            elif not args.no_analyze:  # RESULTS.md grows run by run
                import analyze

                analyze.main(["--runs-root", str(runs_root)])
    finally:
        pid_file.unlink(missing_ok=True)
    print(
        f"[study] done in {(time.time() - started) / 60:.1f} min"
        + (f"; failed: {', '.join(failures)}" if failures else ""),
        flush=True,
    )
    return 1 if failures else 0


def background(argv: list[str], args) -> int:
    runs_root = Path(args.runs_root)
    runs_root.mkdir(parents=True, exist_ok=True)
    log = runs_root / "study.log"
    rest = [a for a in argv if a != "--background"]
    with log.open("a") as handle:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), *rest],
            cwd=ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    me = (
        Path(__file__).relative_to(ROOT)
        if Path(__file__).resolve().is_relative_to(ROOT)
        else Path(__file__)
    )
    print(
        f"entropy study running in the background: pid {process.pid}\n"
        f"  follow:  tail -f {log}\n  status:  python {me} --status --runs-root {runs_root}\n"
        f"  stop:    python {me} --stop --runs-root {runs_root}   (start it again to resume)"
    )
    return 0


def status(args) -> int:
    runs_root = Path(args.runs_root)
    saved = runs_root / "study_args.json"
    if saved.exists():  # the plan of the last driver started here (methods, seeds, steps)
        args = parse([*json.loads(saved.read_text()), "--runs-root", str(runs_root)])
    pid_file = runs_root / "study.pid"
    pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
    print(f"driver: {'running, pid ' + str(pid) if pid and _pid_alive(pid) else 'not running'}")
    print(f"baseline: {'done' if (runs_root / 'baseline.json').exists() else 'not yet'}")
    from trainer.config import load_config
    from trainer.logger import read_metrics

    for method, seed in plan(args):
        run_dir = runs_root / f"{method}_s{seed}"
        steps = load_config(
            STUDY / "configs" / f"{method}.yaml", overrides_for(args, method, seed)
        ).steps
        done_steps = 0
        done_steps = max((r["step"] for r in read_metrics(run_dir)), default=0)
        state = (
            "finished"
            if (run_dir / DONE).exists()
            else ("in progress" if run_dir.exists() else "not started")
        )
        print(f"  {method:10s} seed {seed}: {state:11s} {done_steps}/{steps} steps")
    return 0


def stop(args) -> int:
    pid_file = Path(args.runs_root) / "study.pid"
    if not pid_file.exists():
        print("no study is running")
        return 0
    pid = int(pid_file.read_text().strip())
    if not _pid_alive(pid):
        pid_file.unlink()
        print(f"the study (pid {pid}) is not running any more")
        return 0
    os.kill(pid, signal.SIGTERM)
    print(
        f"sent SIGTERM to the study driver (pid {pid}); it stops its current run, which resumes from its "
        "last checkpoint when the study is started again"
    )
    return 0


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}"
    )
    parser.add_argument("--seeds", default="0", help="seeds of every method (comma-separated)")
    parser.add_argument(
        "--extra-seeds", default="", help="more seeds (comma-separated) for every method"
    )
    parser.add_argument("--steps", type=int, help="override steps (default: the configs' 8)")
    parser.add_argument("--eval-every", type=int, help="override eval.every (default 4)")
    parser.add_argument("--eval-k", type=int, help="override eval.k (default 4)")
    parser.add_argument(
        "--eval-tasks-per-group",
        type=int,
        default=12,
        help="held-out tasks per (family, level) (default 12: 24 arithmetic tasks, levels 1-2)",
    )
    parser.add_argument("--runs-root", default=str(STUDY / "runs"))
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a config override for every method, e.g. --set rollout.tasks_per_step=2",
    )
    parser.add_argument(
        "--no-analyze", action="store_true", help="do not run analyze.py after each run"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--background", action="store_true", help="run detached; log in RUNS/study.log"
    )
    group.add_argument("--status", action="store_true")
    group.add_argument("--stop", action="store_true")
    group.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    group.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; expected some of {METHODS}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.extra_seeds = [int(s) for s in args.extra_seeds.split(",") if s]
    args.runs_root = str(Path(args.runs_root).resolve())
    args.argv = [a for a in (argv or []) if a not in ("--background", "--status", "--stop")]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.one:
        return run_one(args)
    if args.baseline:
        return run_baseline(args)
    if args.background:
        return background(argv, args)
    if args.status:
        return status(args)
    if args.stop:
        return stop(args)
    return drive(args)


if __name__ == "__main__":
    sys.path.insert(0, str(STUDY))
    sys.exit(main())
