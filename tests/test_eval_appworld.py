"""`eprl eval` on eprl/AppWorld-v0 (real engine, generated data): TGC and SGC are reported."""

import json

import pytest

from envs.appworld import cli as appworld_cli
from trainer.evaluation.cli import evaluate_cli

# skipped, with the way to run it, where the AppWorld venv is missing (tests/conftest.py)
pytestmark = [pytest.mark.appworld, pytest.mark.slow]


def test_eval_on_appworld_reports_task_and_scenario_goal_completion(
    tiny_model_dir, tmp_path, monkeypatch
):
    import torch

    root = tmp_path / "appworld"
    assert appworld_cli.make_data(out=str(root), seed=0) == 0
    dev = (root / "data" / "datasets" / "dev.txt").read_text().split()
    scenario = dev[0].split("_")[0]
    # two of its tasks keep the test short
    first_scenario = [task for task in dev if task.split("_")[0] == scenario][:2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is faster on one thread than on two shared ones
    try:
        result = evaluate_cli(
            model=tiny_model_dir,
            env="eprl/AppWorld-v0",
            split="dev",
            k=1,
            backend="hf",
            out=str(tmp_path / "aw.json"),
            num_tasks=len(first_scenario),
            compare=None,
            progress=False,
            env_kwargs=json.dumps({"root": str(root), "max_turns": 1, "max_servers": 1}),
        )
    finally:
        torch.set_num_threads(threads)
    metrics = result["metrics"]
    assert metrics["tasks"] == len(first_scenario) and metrics["scenarios"] == 1
    assert metrics["tgc"] == pytest.approx(metrics["pass@1"])
    assert 0.0 <= metrics["sgc"] <= metrics["tgc"]
    assert metrics["episodes/errors"] == 0
    assert result["settings"]["max_new_tokens"] == 1500  # LOOP's per-turn budget
    assert {row["scenario_id"] for row in result["per_task"]} == {scenario}
    report = (tmp_path / "aw.md").read_text()
    assert "SGC (scenario goal completion)" in report
    # the results say which data they ran on: the generated world, not the released data
    assert result["data"] == ["appworld-generated"]
    assert "appworld-generated" in report
