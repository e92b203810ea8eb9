"""The entropy study's pieces that need no training: held-out task selection, the analysis."""

import importlib.util
import json
import os
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
    assert configs["repo_r"]["objective"]["repo"]["variant"] == "r_submitted"
    assert configs["repo_d"]["objective"]["repo"]["variant"] == "const_beta"
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
    fake_run(tmp_path, "repo_r", [1.0, 1.0, 1.05, 0.95, 1.0, 1.0], {3: (0.35, 0.6), 6: (0.4, 0.7)})
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
    assert "| REPO-R keeps entropy near its start | +7% | -3% | agrees |" in text
    assert "REPO-R beats GRPO on held-out tasks" in text and "within noise" in text
    assert "plus 2 min for the" in text


def test_wall_time_of_an_attempt_killed_without_an_end_record(tmp_path):
    fake_run(tmp_path, "grpo", [1.0, 0.9], {})
    run_dir = tmp_path / "grpo_s0"
    with (run_dir / "study_attempts.jsonl").open("a") as handle:
        handle.write(json.dumps({"attempt": "b", "start": 1000.0, "from_step": 2}) + "\n")
    os.utime(run_dir / "metrics.jsonl", (1300.0, 1300.0))
    assert analyze.wall_seconds(run_dir) == pytest.approx(600 + 300)
