"""The entropy study's pieces that need no training: held-out task selection, the analysis."""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from trainer.config import load_config, save_config

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "benchmarks" / "entropy_study"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"entropy_study_{name}", STUDY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


study = load_script("run")
analyze = load_script("analyze")


def test_stratified_tasks_cover_every_family_and_level():
    import gymnasium

    import envs  # noqa: F401

    env = gymnasium.make("eprl/CodeExec-v0")
    try:
        test_ids = env.unwrapped.task_ids("test")
    finally:
        env.close()
    chosen = study.stratified_tasks(test_ids, 3)
    groups = {tuple(t.split("/")[1:3]) for t in chosen}
    assert len(chosen) == 36 and len(groups) == 12
    assert chosen == study.stratified_tasks(test_ids, 3)  # deterministic
    assert set(chosen) <= set(test_ids)


def test_every_method_has_a_config_that_differs_only_in_objective_and_precision():
    configs = {m: load_config(STUDY / "configs" / f"{m}.yaml").model_dump() for m in study.METHODS}
    shared = {
        k: v for k, v in configs["grpo"].items() if k not in ("objective", "precision", "logging")
    }
    for method, cfg in configs.items():
        assert {
            k: v for k, v in cfg.items() if k not in ("objective", "precision", "logging")
        } == shared, method
    assert configs["rloo_bf16"]["precision"]["loss"] == "bf16"
    assert configs["rloo_bf16"]["objective"] == configs["rloo_fp32"]["objective"]
    assert configs["rloo_fp16"]["precision"]["loss"] == "fp16"
    assert configs["rloo_fp16"]["objective"] == configs["rloo_fp32"]["objective"]
    assert configs["repo_r_submitted"]["objective"]["repo"]["variant"] == "r_submitted"
    arxiv = configs["repo_r_arxiv"]["objective"]["repo"]
    assert arxiv["variant"] == "r" and (arxiv["zeta_min"], arxiv["zeta_max"]) == (1e-4, 0.05)
    assert arxiv["controller"] == "faithful" and arxiv["dead_band"] == arxiv["smoothing"] == 0
    assert {cfg["rollout"]["group_size"] for cfg in configs.values()} == {8}
    assert configs["repo_d"]["objective"]["repo"]["variant"] == "const_beta"
    assert configs["repo_d_dh"]["objective"]["repo"]["variant"] == "d"
    assert configs["adapo"]["objective"]["adapo"]["enabled"]


def fake_run(
    root: Path, method: str, entropy: list[float], evals: dict[int, tuple[float, float]]
) -> None:
    run_dir = root / f"{method}_s0"
    run_dir.mkdir(parents=True)
    save_config(
        load_config(STUDY / "configs" / f"{method}.yaml", [f"steps={len(entropy)}"]),
        run_dir / "config.yaml",
    )
    rows = []
    for step, value in enumerate(entropy, start=1):
        row = {
            "step": step,
            "entropy/mean": value,
            "reward/mean": 0.1 * step,
            "clip/low_frac": 0.01,
            "clip/high_frac": 0.02,
        }
        if step in evals:
            row |= {"eval/test/pass@1": evals[step][0], "eval/test/pass@k": evals[step][1]}
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "study_attempts.jsonl").write_text(
        json.dumps({"attempt": "a", "start": 100.0, "from_step": 0})
        + "\n"
        + json.dumps({"attempt": "a", "end": 700.0, "checkpoint_step": len(entropy)})
        + "\n"
    )
    (run_dir / "study_done.json").write_text(json.dumps({"eval_tasks": ["t"] * 36}))


def test_analyze_writes_results_and_figure(tmp_path):
    (tmp_path / "baseline.json").write_text(
        json.dumps({"metrics": {"pass@1": 0.2, "pass@4": 0.4, "tasks": 36}, "wall_s_this_run": 120})
    )
    fake_run(tmp_path, "grpo", [1.0, 0.8, 0.6, 0.5, 0.4, 0.4], {3: (0.3, 0.5), 6: (0.3, 0.5)})
    fake_run(
        tmp_path,
        "repo_r_submitted",
        [1.0, 1.0, 1.05, 0.95, 1.0, 1.0],
        {3: (0.35, 0.6), 6: (0.4, 0.7)},
    )
    assert analyze.main(["--runs-root", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "entropy_study.png").stat().st_size > 10_000
    grpo = next(line for line in text.splitlines() if line.startswith("| GRPO |"))
    assert (
        "0.800 -> 0.433" in grpo
        and "-46%" in grpo
        and "0.200 -> 0.300" in grpo
        and "| 10.0 |" in grpo
    )
    assert "| GRPO lowers entropy | -57% | -46% | agrees |" in text
    assert "| REPO-R (submitted) keeps entropy near its start | +7% | -3% | agrees |" in text
    assert "REPO-R (submitted) beats GRPO on held-out tasks" in text and "within noise" in text
    assert "plus 2 min for the" in text


def test_wall_time_of_an_attempt_killed_without_an_end_record(tmp_path):
    fake_run(tmp_path, "grpo", [1.0, 0.9], {})
    run_dir = tmp_path / "grpo_s0"
    with (run_dir / "study_attempts.jsonl").open("a") as handle:
        handle.write(json.dumps({"attempt": "b", "start": 1000.0, "from_step": 2}) + "\n")
    os.utime(run_dir / "metrics.jsonl", (1300.0, 1300.0))
    assert analyze.wall_seconds(run_dir) == pytest.approx(600 + 300)


def fake_records(run_dir: Path, successes: list[int], k: int = 4) -> None:
    """The trainer's per-task records of a final evaluation: task i solved by successes[i] of
    its k samples."""

    def episode(solved: bool) -> dict:
        return {
            "reward": float(solved),
            "success": solved,
            "error": None,
            "solution_sha1": "s" if solved else None,
            "stopped": True,
            "sampled_tokens": 10,
            "nll_sum": 5.0,
            "turns": 1,
            "truncation_reason": None,
            "scenario_id": None,
        }

    records = [
        {"task_id": f"t{i}", "index": i, "episodes": [episode(j < c) for j in range(k)]}
        for i, c in enumerate(successes)
    ]
    evals = run_dir / "evals"
    evals.mkdir()
    (evals / "test_step00006.json").write_text(
        json.dumps({"split": "test", "step": 6, "k": k, "records": records})
    )


def test_held_out_claims_use_the_paired_bootstrap_of_the_runs_task_records(tmp_path):
    """With the trainer's per-task records, 'X beats GRPO' rests on the paired interval over the
    same tasks: a clear gain excludes 0 (agrees), an identical evaluation gives +0.000 with an
    interval around it (within noise)."""
    (tmp_path / "baseline.json").write_text(
        json.dumps({"metrics": {"pass@1": 0.2, "pass@4": 0.4, "tasks": 36}, "wall_s_this_run": 1})
    )
    entropy = [1.0, 0.9, 0.8, 0.8, 0.7, 0.7]
    fake_run(tmp_path, "grpo", entropy, {6: (0.1, 0.3)})
    fake_run(tmp_path, "repo_r_arxiv", entropy, {6: (0.9, 1.0)})
    fake_run(tmp_path, "dapo", entropy, {6: (0.1, 0.3)})
    weak = [0, 1] * 18
    fake_records(tmp_path / "grpo_s0", weak)
    fake_records(tmp_path / "repo_r_arxiv_s0", [4, 3] * 18)
    fake_records(tmp_path / "dapo_s0", weak)
    assert analyze.main(["--runs-root", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    # the results table carries the end's 95% interval over the pooled records
    arxiv_row = next(line for line in text.splitlines() if line.startswith("| REPO-R (arXiv) |"))
    assert re.search(r"-> 0\.900 \[0\.8\d\d, 0\.9\d\d\]", arxiv_row), arxiv_row
    repo = next(line for line in text.splitlines() if "REPO-R (arXiv) beats GRPO" in line)
    assert "95% paired, 36 tasks" in repo and repo.endswith("| agrees |")
    dapo = next(line for line in text.splitlines() if "DAPO (clip-higher) beats GRPO" in line)
    # the samples within a task are resampled on each side: the interval is not a point
    assert "difference +0.000 [-" in dapo and dapo.endswith("| within noise |")


def test_sequential_learning_continues_each_phase_one_model_and_resumes(tiny_model_dir, tmp_path):
    """benchmarks/sequential: phase 2 of GRPO's and REPO-R's starts trains from their phase-1
    run's last checkpoint, the base start from the base model; the results name all three; a
    second invocation runs nothing."""
    spec = importlib.util.spec_from_file_location(
        "sequential_run", REPO / "benchmarks" / "sequential" / "run.py"
    )
    sequential = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sequential)
    from trainer.checkpoint import latest_checkpoint
    from trainer.config import load_config

    tiny = [
        f"model.name={tiny_model_dir}",
        "rollout.tasks_per_step=2",
        "rollout.group_size=2",
        "rollout.max_new_tokens=8",
        "eval.num_tasks=2",
        "eval.k=2",
        "eval.every=1",
        "trainer.micro_batch_size=2",
        "trainer.skip_no_signal=false",
        "objective.overlong_filter=false",
        "objective.target_entropy_tasks=0",
        "checkpoint.every=1",
        # the untrained tiny model earns no reward: an entropy bonus gives phase 1 a gradient,
        # so its models differ from the base model
        "objective.entropy_coef=0.01",
        "trainer.lr=1e-3",
    ]
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["--seeds", "0", "--phase1-steps", "1", "--phase2-steps", "1"]
    argv += ["--runs-root", str(runs), "--results", str(out)]
    argv += [a for item in tiny for a in ("--set", item)]
    assert sequential.main(argv) == 0
    for start in ("grpo", "repo_r"):
        cfg = load_config(runs / f"p2_{start}_s0" / "config.yaml")
        assert cfg.model.name == str(latest_checkpoint(runs / f"p1_{start}_s0"))
        assert cfg.objective.advantage == "rloo" and cfg.objective.repo.variant == "none"
        assert cfg.env.kwargs["levels"] == [2]
    assert load_config(runs / "p2_base_s0" / "config.yaml").model.name == str(tiny_model_dir)
    assert load_config(runs / "p1_grpo_s0" / "config.yaml").objective.advantage == "grpo"
    assert load_config(runs / "p1_repo_r_s0" / "config.yaml").objective.repo.variant != "none"
    # phase 1 is evaluated at its end only; phase 2 from its step 0 (its curve's start)
    assert not load_config(runs / "p1_grpo_s0" / "config.yaml").eval.at_start
    assert load_config(runs / "p2_grpo_s0" / "config.yaml").eval.at_start
    # different starting weights: the first phase-2 batch's entropy differs from the base start's
    first = {
        s: next(r for r in rows(runs / f"p2_{s}_s0") if "entropy/mean" in r)["entropy/mean"]
        for s in ("base", "grpo")
    }
    assert first["base"] != first["grpo"]
    text = (out / "RESULTS.md").read_text()
    for label in ("base model", "after GRPO (phase 1)", "after REPO-R (phase 1)"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
        assert "not run yet" not in row and "(1 finished)" in row
    # the paired comparison of the starts, seed by seed, once both have finished
    assert "after REPO-R (phase 1) minus after GRPO (phase 1), seed 0: final pass@1" in text
    assert (out / "sequential.png").stat().st_size > 5_000
    sizes = {p.name: (p / "metrics.jsonl").stat().st_size for p in runs.iterdir() if p.is_dir()}
    assert sequential.main(argv) == 0  # everything finished: skipped
    assert sizes == {
        p.name: (p / "metrics.jsonl").stat().st_size for p in runs.iterdir() if p.is_dir()
    }


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sequential_phase_two_names_a_finished_start_whose_weights_are_gone(tmp_path):
    """Run records are committed, checkpoints not: a new clone's phase 2 must say which phase-1
    folder lost its weights, not start from a model named 'None'."""
    spec = importlib.util.spec_from_file_location(
        "sequential_run", REPO / "benchmarks" / "sequential" / "run.py"
    )
    sequential = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sequential)
    source = tmp_path / "p1_grpo_s0"
    source.mkdir()
    with pytest.raises(RuntimeError, match="has not finished"):
        sequential.start_model(tmp_path, "p2_grpo_s0")
    (source / sequential.DONE).write_text("{}")
    with pytest.raises(RuntimeError, match=r"no checkpoint left.*delete .*p1_grpo_s0"):
        sequential.start_model(tmp_path, "p2_grpo_s0")
    assert sequential.start_model(tmp_path, "p2_base_s0") is None
