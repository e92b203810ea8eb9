"""`eprl eval` end to end with a tiny model: outputs, resume after SIGKILL, clear errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.evaluation.cli import evaluate_cli

REPO = Path(__file__).resolve().parents[1]


def task_lines(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["kind"] == "task"]


def eval_env() -> dict:
    # one task per generation batch, so the sidecar grows task by task; one thread for the tiny model
    return {**os.environ, "EPRL_EVAL_BATCH_EPISODES": "2", "OMP_NUM_THREADS": "1"}


def procedural_eval(model: str, **settings) -> dict:
    """``evaluate_cli`` arguments: ``model`` on 2 samples of procedural CodeExec dev tasks."""
    return dict(
        model=model,
        env="eprl/CodeExec-v0",
        split="dev",
        k=2,
        backend="hf",
        env_kwargs='{"task_set": "procedural"}',
        compare=None,
        progress=False,
        **settings,
    )


@pytest.fixture
def one_thread():
    """The tiny model runs faster on one thread than on two shared with other processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_eval_writes_json_markdown_and_resumes_from_a_partial_sidecar(
    tiny_model_dir, tmp_path, monkeypatch, one_thread
):
    monkeypatch.setenv("EPRL_EVAL_BATCH_EPISODES", "2")
    out = tmp_path / "tiny.json"
    args = procedural_eval(tiny_model_dir, out=str(out), num_tasks=3)
    first = evaluate_cli(**args)
    assert first["metrics"]["tasks"] == 3 and first["metrics"]["episodes"] == 6
    assert first["tasks_resumed"] == 0
    for key in (
        "pass@1",
        "pass@2",
        "reward/mean",
        "success/rate",
        "diversity/distinct_solutions",
        "entropy/sampled",
        "entropy/normalised",
    ):
        assert key in first["metrics"]
    assert 0 < first["metrics"]["entropy/normalised"] <= 1
    assert "tgc" not in first["metrics"]  # CodeExec reports no scenario ids
    assert json.loads(out.read_text())["metrics"] == first["metrics"]
    assert "| pass@2 |" in out.with_suffix(".md").read_text()

    sidecar = tmp_path / "tiny.tasks.jsonl"
    kept = sidecar.read_text().splitlines()[:3]  # header + 2 of 3 tasks, then a torn line
    sidecar.write_text("\n".join(kept) + '\n{"kind": "task", "task_id": "proc/arith')
    out.unlink()
    second = evaluate_cli(**args)
    rows = task_lines(sidecar)
    assert [r["task_id"] for r in rows] == [t["task_id"] for t in first["per_task"]]
    assert [json.dumps(r) for r in rows[:2]] == kept[1:]  # the first two tasks did not run again
    assert second["tasks_resumed"] == 2 and second["metrics"]["tasks"] == 3
    # a rerun of a complete evaluation runs nothing and gives the same numbers
    third = evaluate_cli(**args)
    assert third["tasks_resumed"] == 3 and third["metrics"] == second["metrics"]


@pytest.mark.slow
def test_eval_killed_half_way_continues_without_running_a_task_twice(tiny_model_dir, tmp_path):
    out = tmp_path / "killed.json"
    sidecar = tmp_path / "killed.tasks.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "eprl",
        "eval",
        "--model",
        tiny_model_dir,
        "--split",
        "dev",
        "--k",
        "2",
        "--num-tasks",
        "6",
        "--backend",
        "hf",  # the tiny model's head size has no vLLM CPU kernel
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=eval_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if sidecar.exists() and len(task_lines(sidecar)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (
            f"the evaluation ended before it could be killed: {proc.stderr.read()[-2000:]}"
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = task_lines(sidecar)
    assert 2 <= len(before) < 6
    assert not out.exists()  # the final JSON is written only at the end

    done = subprocess.run(
        cmd, cwd=REPO, env=eval_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    after = task_lines(sidecar)
    ids = [row["task_id"] for row in after]
    assert len(ids) == len(set(ids)) == 6
    assert after[: len(before)] == before  # finished tasks were kept, not rerun
    assert {row["pid"] for row in after[len(before) :]} != {before[0]["pid"]}
    result = json.loads(out.read_text())
    assert result["tasks_resumed"] == len(before)
    assert result["metrics"]["tasks"] == 6 and result["metrics"]["episodes"] == 12
    assert [t["task_id"] for t in result["per_task"]] == ids
    assert out.with_suffix(".md").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"split": "nope"},
            r"unknown split 'nope' for eprl/CodeExec-v0; expected one of \['train', 'dev', 'test'\]",
        ),
        ({"env": "eprl/Nope-v0"}, r"unknown environment 'eprl/Nope-v0'"),
        ({"model": "/no/such/model"}, r"model '/no/such/model' is not embedded"),
        ({"backend": "tpu"}, r"unknown --backend 'tpu'"),
        ({"env_kwargs": "[1]"}, r"--env-kwargs must be a JSON object"),
        ({"env_kwargs": "{bad"}, r"--env-kwargs '\{bad' is not valid JSON"),
        (
            {"backend": "openai", "model": "smollm2-135m-instruct"},
            r"needs --model to be the server's http\(s\) URL",
        ),
        ({"model": "http://127.0.0.1:9/v1"}, r"is a URL: use --backend openai"),
        ({"k": 0}, r"--k must be >= 1, got 0"),
        ({"confidence": 95}, r"--confidence must be in \(0, 1\), got 95"),
        ({"resamples": 10}, r"--resamples must be >= 100, got 10"),
    ],
)
def test_bad_values_give_clear_errors(tmp_path, overrides, message):
    args = dict(
        model="smollm2-135m-instruct",
        env="eprl/CodeExec-v0",
        split="dev",
        k=1,
        backend="hf",
        out=str(tmp_path / "x.json"),
        num_tasks=1,
        env_kwargs=None,
        compare=None,
        progress=False,
    )
    with pytest.raises(ValueError, match=message):
        evaluate_cli(**{**args, **overrides})


def test_cli_error_exits_2_naming_the_value(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "eprl",
            "eval",
            "--model",
            "smollm2-135m-instruct",
            "--split",
            "holdout",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "eprl: error: unknown split 'holdout'" in done.stderr


class SimulatedKill(Exception):
    """What :class:`KilledAfterGenerateCalls` raises in place of a SIGKILL."""


class KilledAfterGenerateCalls:
    """A test double for a kill mid-evaluation: forwards to ``policy`` and raises
    :class:`SimulatedKill` on generate call number ``limit + 1`` (None: never); counts calls."""

    def __init__(self, policy, limit: int | None = None) -> None:
        self.policy, self.limit, self.calls = policy, limit, 0

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def generate(self, *args, **kwargs):
        if self.limit is not None and self.calls >= self.limit:
            raise SimulatedKill(f"killed before generate call {self.calls + 1}")
        self.calls += 1
        return self.policy.generate(*args, **kwargs)


def test_an_evaluation_killed_half_way_and_resumed_writes_the_uninterrupted_results(
    tiny_model_dir, tmp_path, monkeypatch, one_thread
):
    """Same seeds: killed after about half its generate calls (past the first task's batch) and
    resumed, the results file equals that of a run straight through, timing fields aside."""
    from trainer.evaluation import cli

    monkeypatch.setenv("EPRL_EVAL_BATCH_EPISODES", "2")  # one task per batch
    real_load = cli._load_policy
    doubles: list[KilledAfterGenerateCalls] = []

    def load_with(limit):
        def load(*args, **kwargs):
            doubles.append(KilledAfterGenerateCalls(real_load(*args, **kwargs), limit))
            return doubles[-1]

        return load

    args = procedural_eval(tiny_model_dir, num_tasks=4)
    monkeypatch.setattr(cli, "_load_policy", load_with(None))
    straight_out = tmp_path / "straight.json"
    evaluate_cli(**args, out=str(straight_out))
    total_calls = doubles[-1].calls

    resumed_out = tmp_path / "resumed.json"
    monkeypatch.setattr(cli, "_load_policy", load_with(total_calls // 2))
    with pytest.raises(SimulatedKill):
        evaluate_cli(**args, out=str(resumed_out))
    logged = task_lines(tmp_path / "resumed.tasks.jsonl")
    assert 1 <= len(logged) < 4 and not resumed_out.exists()
    monkeypatch.setattr(cli, "_load_policy", real_load)
    evaluate_cli(**args, out=str(resumed_out))

    straight, resumed = json.loads(straight_out.read_text()), json.loads(resumed_out.read_text())
    assert resumed["tasks_resumed"] == len(logged) and straight["tasks_resumed"] == 0
    timing = {"tasks_resumed", "wall_s_this_run", "finished_at"}
    assert straight.keys() == resumed.keys()
    for key in straight.keys() - timing:
        assert resumed[key] == straight[key], key
    assert resumed["intervals"]["pass@1"] is not None and resumed["per_task"]
