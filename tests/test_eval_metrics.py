"""Evaluation metrics by hand: pass@k, TGC/SGC, diversity, sampled-token entropy, tables; the
bootstrap intervals, paired differences and the labels of short and errored tasks."""

import itertools
import json
import math

import pytest

from agent.rollout import Episode
from trainer.evaluation.cli import default_out, evaluate_cli
from trainer.evaluation.compare import paired_differences
from trainer.evaluation.intervals import Bootstrap, score_intervals
from trainer.evaluation.metrics import (
    episode_record,
    goal_completion,
    normalise_code,
    pass_at_k,
    per_task_rows,
    summarize_episodes,
    summarize_tasks,
    task_record,
)
from trainer.evaluation.report import (
    compare_markdown,
    markdown_report,
    print_compare,
    print_result,
)
from trainer.evaluation.sidecar import TaskLog


@pytest.fixture(scope="module")
def tokenizer():
    from agent.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 0, 2, 0.0),
        (4, 4, 2, 1.0),
        (4, 3, 2, 1.0),  # n - c < k: every 2-subset holds a success
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_enumerating_every_subset():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                exact = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="need"):
        pass_at_k(n, c, k)


def make_episode(tokenizer, task_id, success, code=None, scenario=None, logprob=-0.5, text=None):
    """A finished one-turn episode whose sampled turn is ``text`` (default: ``code`` fenced)."""
    prompt = tokenizer.encode("prompt", add_special_tokens=False)
    action = text if text is not None else f"Here:\n```python\n{code}\n```\n"
    sampled = tokenizer.encode(action, add_special_tokens=False)
    ep = Episode(task_id=task_id, group_id=0, seed=0)
    ep.append(prompt, sampled=False)
    ep.prompt_len = len(prompt)
    ep.append(sampled, sampled=True, logprobs=[logprob] * len(sampled))
    ep.finish_reasons.append("stop")
    ep.reward, ep.success, ep.terminated = (1.0 if success else 0.25), success, True
    ep.info = {"task_id": task_id, "turn": 1} | ({"scenario_id": scenario} if scenario else {})
    return ep


# hand-made AppWorld-like results: scenario a has 3 tasks, b has 2; K = 2 samples per task
SAME_A = "def f(x):\n    return x+1"
SAME_B = "def f(x):  # add one\n\n    return (x + 1)"
OTHER = "def f(x):\n    return 1 + x"
HAND = {
    "a_1": [(True, SAME_A), (True, SAME_B)],  # 2/2, one distinct solution (formatting only)
    "a_2": [(True, SAME_A), (False, "def f(x): return 0")],  # 1/2
    "a_3": [(True, SAME_A), (True, OTHER)],  # 2/2, two distinct solutions
    "b_1": [(True, SAME_A), (True, SAME_A)],  # 2/2, one distinct
    "b_2": [(False, "x"), (False, None)],  # 0/2
}


@pytest.fixture(scope="module")
def hand_records(tokenizer):
    records = []
    for index, (task, samples) in enumerate(HAND.items()):
        episodes = [
            make_episode(
                tokenizer,
                task,
                ok,
                code,
                scenario=task.split("_")[0],
                text="no code here" if code is None else None,
            )
            for ok, code in samples
        ]
        records.append(task_record(task, index, episodes, tokenizer))
    return records


def test_tgc_sgc_on_hand_made_episodes(hand_records, tokenizer):
    metrics = summarize_tasks(hand_records, k=2, vocab_size=len(tokenizer))
    # TGC = mean over tasks of c/n; SGC = mean over scenarios of prod(c/n)
    assert metrics["tgc"] == pytest.approx((1 + 0.5 + 1 + 1 + 0) / 5)
    assert metrics["sgc"] == pytest.approx((1 * 0.5 * 1 + 1 * 0) / 2)
    assert metrics["scenarios"] == 2
    assert metrics["pass@1"] == pytest.approx(metrics["tgc"])
    assert metrics["pass@2"] == pytest.approx((1 + 1 + 1 + 1 + 0) / 5)
    assert metrics["success/rate"] == pytest.approx(7 / 10)
    assert metrics["reward/mean"] == pytest.approx((7 * 1.0 + 3 * 0.25) / 10)
    assert metrics["tasks"] == 5 and metrics["episodes"] == 10


def test_sgc_is_the_expectation_over_one_sample_per_task():
    rates = {"a_1": 1.0, "a_2": 0.5, "a_3": 1.0, "b_1": 1.0, "b_2": 0.0, "c_1": 0.5, "c_2": 0.5}
    scenario = {t: t.split("_")[0] for t in rates}
    # enumerate every way of picking one of two samples per task (rate 0.5 = one of two succeeds)
    samples = {t: [r >= 1.0, r >= 0.5] for t, r in rates.items()}
    tasks = list(rates)
    totals = []
    for pick in itertools.product(range(2), repeat=len(tasks)):
        outcome = {t: samples[t][i] for t, i in zip(tasks, pick, strict=True)}
        by_s = {}
        for t, ok in outcome.items():
            by_s.setdefault(scenario[t], []).append(ok)
        totals.append(sum(all(v) for v in by_s.values()) / len(by_s))
    tgc, sgc, count = goal_completion(rates, scenario)
    assert count == 3
    assert tgc == pytest.approx(sum(rates.values()) / len(rates))
    assert sgc == pytest.approx(sum(totals) / len(totals))


def test_diversity_counts_distinct_normalised_successes(hand_records):
    metrics = summarize_tasks(hand_records, k=2)
    # tasks with a success: a_1 -> 1 distinct of 2, a_2 -> 1 of 1, a_3 -> 2 of 2, b_1 -> 1 of 2
    assert metrics["diversity/distinct_solutions"] == pytest.approx((1 + 1 + 2 + 1) / 4)
    assert metrics["diversity/distinct_frac"] == pytest.approx((0.5 + 1 + 1 + 0.5) / 4)
    assert normalise_code(SAME_A) == normalise_code(SAME_B) != normalise_code(OTHER)
    assert normalise_code("def f(:\n   x") == "def f(: x"  # unparsable: whitespace collapsed


def test_sampled_token_entropy_is_mean_negative_logprob(hand_records, tokenizer):
    metrics = summarize_tasks(hand_records, k=2, vocab_size=len(tokenizer))
    assert metrics["entropy/sampled"] == pytest.approx(0.5)
    assert metrics["entropy/normalised"] == pytest.approx(0.5 / math.log(len(tokenizer)))


def test_no_scenarios_no_tgc_and_nan_logprobs_no_entropy(tokenizer):
    eps = [make_episode(tokenizer, "proc/list/L1/1", True, OTHER, logprob=float("nan"))]
    metrics = summarize_tasks([task_record("proc/list/L1/1", 0, eps, tokenizer)], k=1)
    assert "tgc" not in metrics and "sgc" not in metrics
    assert metrics["entropy/sampled"] is None and metrics["pass@1"] == 1.0


def test_summarize_keeps_its_behaviour(tokenizer):
    eps = [
        make_episode(tokenizer, "t1", True, OTHER),
        make_episode(tokenizer, "t1", False, OTHER),
        make_episode(tokenizer, "t2", False, OTHER),
        make_episode(tokenizer, "t2", False, OTHER),
    ]
    # the in-memory summary (training's and the demo's evaluations) is the one summariser
    summary = summarize_episodes(eps, 2, tokenizer)
    assert {key: summary[key] for key in ("pass@1", "pass@2", "reward/mean", "success/rate")} == {
        "pass@1": 0.25,
        "pass@2": 0.5,
        "reward/mean": pytest.approx((1 + 0.25 * 3) / 4),
        "success/rate": 0.25,
    }
    assert summary["tasks"] == 2.0 and summary["episodes"] == 4.0
    record = episode_record(eps[0], tokenizer)
    assert record["success"] and record["sampled_tokens"] == eps[0].num_sampled_tokens


def test_task_log_drops_a_torn_line_and_refuses_other_settings(tmp_path, hand_records):
    path = tmp_path / "r.tasks.jsonl"
    settings = {"model": "m", "env": "e", "split": "test", "k": 2}
    log = TaskLog(path, settings)
    for rec in hand_records[:3]:
        log.add(rec)
    with path.open("a") as handle:
        handle.write('{"kind": "task", "task_id": "b_1", "epi')  # killed mid-write
    again = TaskLog(path, settings)
    assert sorted(again.records) == ["a_1", "a_2", "a_3"]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 4
    with pytest.raises(RuntimeError, match="already"):
        again.add(hand_records[0])
    with pytest.raises(ValueError, match=r"different evaluation \(k: 2 there, 4 now\)"):
        TaskLog(path, {**settings, "k": 4})


def test_task_log_survives_a_kill_while_writing_its_header(tmp_path, hand_records):
    path = tmp_path / "r.tasks.jsonl"
    path.write_text('{"kind": "header", "sch')
    log = TaskLog(path, {"model": "m", "k": 2})
    log.add(hand_records[0])
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == [
        "header",
        "task",
    ]


def test_a_task_without_a_reported_scenario_falls_back_to_its_id_prefix(hand_records, tokenizer):
    failed = make_episode(tokenizer, "b_3", False, OTHER)  # e.g. its reset failed: no scenario_id
    records = [*hand_records, task_record("b_3", 5, [failed, failed], tokenizer)]
    metrics = summarize_tasks(records, k=2)
    assert metrics["scenarios"] == 2 and metrics["sgc"] == pytest.approx((0.5 + 0.0) / 2)


def result_of(records, model, k=2):
    return {
        "model": model,
        "env": "eprl/AppWorld-v0",
        "split": "dev",
        "backend": "hf",
        "env_kwargs": {},
        "k": k,
        "settings": {"temperature": 1.0, "top_p": 1.0, "max_turns": 1, "max_new_tokens": 8},
        "metrics": summarize_tasks(records, k),
        "finished_at": "now",
    }


def compare_files(*paths):
    """`eprl eval --compare PATHS...`: the model, env and sampling arguments go unused."""
    return evaluate_cli(
        model="unused",
        env="unused",
        split="unused",
        k=1,
        backend="hf",
        out=None,
        num_tasks=None,
        env_kwargs=None,
        compare=[str(path) for path in paths],
    )


def test_compare_table_side_by_side(tmp_path, hand_records, capsys):
    a, b = tmp_path / "base.json", tmp_path / "trained.json"
    a.write_text(json.dumps(result_of(hand_records[:2], "base")))
    b.write_text(json.dumps(result_of(hand_records, "trained")))
    table = compare_files(a, b)
    lines = table.splitlines()
    assert lines[0] == "| | base | trained |"
    assert "| model | base | trained |" in lines
    assert "| pass@1 | 0.750 | 0.700 |" in lines
    assert "| TGC (task goal completion) | 0.750 | 0.700 |" in lines
    assert "| SGC (scenario goal completion) | 0.500 | 0.250 |" in lines
    assert "| tasks | 2 | 5 |" in lines
    printed = capsys.readouterr().out
    assert "base" in printed and "trained" in printed and "0.250" in printed
    with pytest.raises(ValueError, match="does not exist"):
        compare_files(a, tmp_path / "missing.json")


def test_compare_with_different_k_keeps_both_pass_at_k_rows(hand_records):
    table = compare_markdown(
        [result_of(hand_records, "x", k=2), result_of(hand_records, "y", k=1)], ["x", "y"]
    )
    assert "| pass@2 | 0.800 | - |" in table.splitlines()


def test_markdown_report_and_default_out(hand_records):
    report = markdown_report(result_of(hand_records, "m"))
    assert "| SGC (scenario goal completion) | 0.250 |" in report
    assert "| sampled-token entropy (nats) | 0.500 |" in report
    assert (
        default_out("runs/r1/checkpoints/step_24", "eprl/CodeExec-v0", "test", 4, {}).as_posix()
        == "evals/r1-step_24__CodeExec-v0__test__k4.json"
    )
    named = default_out("http://host:8000/v1", "eprl/AppWorld-v0", "dev", 2, {"max_turns": 50})
    assert named.name.startswith("host-8000-v1__AppWorld-v0__dev__k2__kw")


def test_eval_cli_compare_takes_result_files_as_arguments(tmp_path, hand_records):
    """`eprl eval --compare A.json B.json` (the documented form) prints the side-by-side table;
    a lone file, or evaluating without --model, is a clear usage error."""
    from typer.testing import CliRunner

    from eprl import app

    a, b = tmp_path / "base.json", tmp_path / "trained.json"
    a.write_text(json.dumps(result_of(hand_records[:2], "base")))
    b.write_text(json.dumps(result_of(hand_records, "trained")))
    runner = CliRunner()
    done = runner.invoke(app, ["eval", "--compare", str(a), str(b)])
    assert done.exit_code == 0, done.output
    row = next(line for line in done.output.splitlines() if "pass@1" in line)
    assert "0.750" in row and "0.700" in row and row.index("0.750") < row.index("0.700")
    lone = runner.invoke(app, ["eval", "--compare", str(a)])
    assert lone.exit_code == 2 and "at least two" in lone.output
    no_model = runner.invoke(app, ["eval", "--split", "test"])
    assert no_model.exit_code == 2 and "--model is required" in no_model.output
    stray = runner.invoke(app, ["eval", "--model", "m", str(a)])
    assert stray.exit_code == 2 and "go with --compare" in stray.output


# ---- intervals, paired differences and labels (issue 22) ----------------------------------


def record(task_id, outcomes, errors=0, scenario=None, rewards=None):
    """A task record of hand-made episodes: ``outcomes`` their successes, then ``errors``
    episodes that failed in the environment (``error`` set, no success)."""
    rewards = rewards or [float(ok) for ok in outcomes]
    fields = {"sampled_tokens": 10, "nll_sum": 5.0, "turns": 1, "stopped": True}
    fields |= {"truncation_reason": None, "scenario_id": scenario, "solution_sha1": "s"}
    episodes = [
        {**fields, "reward": r, "success": ok, "error": None}
        for ok, r in zip(outcomes, rewards, strict=True)
    ]
    episodes += [{**fields, "reward": 0.0, "success": False, "error": "reset failed"}] * errors
    return {"kind": "task", "task_id": task_id, "index": 0, "episodes": episodes}


def wilson(successes, n, z=1.959964):
    """The Wilson score interval of a binomial proportion (Wilson, 1927)."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def test_bootstrap_over_tasks_matches_the_wilson_interval_of_a_binomial():
    # 400 tasks x 1 sample, 120 successes: only the task level varies
    records = [record(f"t{i}", [i < 120]) for i in range(400)]
    out = score_intervals(records, 1, Bootstrap())
    low, high = out["intervals"]["pass@1"]
    assert low == pytest.approx(wilson(120, 400)[0], abs=0.01)
    assert high == pytest.approx(wilson(120, 400)[1], abs=0.01)
    assert out["counts"]["pass@1"] == {"tasks": 400, "samples": 400}


def test_bootstrap_over_samples_within_a_task_matches_the_wilson_interval():
    # one task x 400 samples: only the sample level varies
    out = score_intervals([record("t", [j < 120 for j in range(400)])], 1, Bootstrap())
    low, high = out["intervals"]["pass@1"]
    assert low == pytest.approx(wilson(120, 400)[0], abs=0.01)
    assert high == pytest.approx(wilson(120, 400)[1], abs=0.01)


def test_intervals_are_seeded_and_the_resamples_and_coverage_are_parameters():
    # rewards that all differ, so that the quantiles of the replicates move with the seed
    records = [
        record(f"t{i}", [i % 3 == 0, i % 2 == 0], rewards=[i / 31, ((7 * i) % 30) / 29])
        for i in range(30)
    ]
    first = score_intervals(records, 2, Bootstrap(seed=3))
    assert score_intervals(records, 2, Bootstrap(seed=3)) == first
    other = score_intervals(records, 2, Bootstrap(seed=4))["intervals"]["reward/mean"]
    assert other != first["intervals"]["reward/mean"]
    narrow = score_intervals(records, 2, Bootstrap(confidence=0.5, seed=3))["intervals"]["pass@1"]
    wide = first["intervals"]["pass@1"]
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    assert first["bootstrap"]["resamples"] == 2000 and first["bootstrap"]["confidence"] == 0.95
    with pytest.raises(ValueError, match="resamples must be >= 100, got 5"):
        Bootstrap(resamples=5)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 95"):
        Bootstrap(confidence=95)


def test_every_score_carries_an_interval_and_its_counts(hand_records, tokenizer):
    out = score_intervals(hand_records, 2, Bootstrap(), vocab_size=len(tokenizer))
    metrics = summarize_tasks(hand_records, 2, vocab_size=len(tokenizer))
    for key in (
        "pass@1",
        "pass@2",
        "reward/mean",
        "success/rate",
        "tgc",
        "sgc",
        "entropy/sampled",
        "entropy/normalised",
        "entropy/sampled_stopped",
    ):
        low, high = out["intervals"][key]
        assert low <= metrics[key] + 1e-9 and metrics[key] <= high + 1e-9, key
        assert out["counts"][key]["tasks"] == 5 and out["counts"][key]["samples"] == 10, key
    assert out["counts"]["sgc"]["scenarios"] == 2
    assert out["counts"]["entropy/sampled"]["tokens"] == sum(
        ep["sampled_tokens"] for rec in hand_records for ep in rec["episodes"]
    )


def test_pass_at_k_counts_only_tasks_with_at_least_k_samples():
    # t3 has one sample: before issue 22 it entered pass@2 as pass@1 (min(k, n)), here it is out
    records = [record("t1", [True, False]), record("t2", [False, False]), record("t3", [True])]
    metrics = summarize_tasks(records, k=2)
    assert metrics["pass@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert metrics["tasks/pass@2"] == 2
    assert metrics["pass@1"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)  # pass@1 keeps t3
    out = score_intervals(records, 2, Bootstrap())
    assert out["counts"]["pass@2"] == {"tasks": 2, "samples": 4}
    assert out["counts"]["pass@1"] == {"tasks": 3, "samples": 5}
    assert [row["pass@2"] for row in per_task_rows(records, 2)] == [1.0, 0.0, None]
    only_short = summarize_tasks([record("t3", [True])], k=2)
    assert only_short["pass@2"] is None and only_short["tasks/pass@2"] == 0
    report = markdown_report(result_of(records, "m"))
    assert "| tasks with n >= 2 (counted under pass@2) | 2 |" in report


def test_errored_episodes_are_reported_apart_and_left_out_of_the_scores():
    records = [
        record("t1", [True, True], errors=2),  # 2 of 2 error-free samples succeed
        record("t2", [False, True]),
        record("t3", [], errors=2),  # every episode errored: no score at all
    ]
    metrics = summarize_tasks(records, k=2)
    assert metrics["pass@1"] == pytest.approx((1.0 + 0.5) / 2)  # not (0.5 + 0.5 + 0) / 3
    assert metrics["success/rate"] == pytest.approx(3 / 4)
    assert metrics["reward/mean"] == pytest.approx(3 / 4)
    assert metrics["episodes/errors"] == 4 and metrics["tasks/errored"] == 1
    assert metrics["tasks"] == 3 and metrics["episodes"] == 8
    out = score_intervals(records, 2, Bootstrap())
    assert out["counts"]["pass@1"] == {"tasks": 2, "samples": 4}
    rows = per_task_rows(records, 2)
    assert [(row["n"], row["errors"]) for row in rows] == [(2, 2), (2, 0), (0, 2)]
    assert rows[2]["pass@1"] is None
    report = markdown_report(result_of(records, "m"))
    assert "| environment errors (episodes, left out of the scores) | 4 |" in report
    assert "| tasks with only errored episodes (left out) | 1 |" in report


def full_result(records, model, k=2):
    """A result file as ``run_evaluation`` writes it: metrics, intervals, counts, per-task rows."""
    return {
        **result_of(records, model, k),
        **score_intervals(records, k, Bootstrap()),
        "per_task": per_task_rows(records, k),
    }


def test_paired_comparison_of_identical_files_is_zero_with_an_interval_containing_zero():
    records = [record(f"t{i}", [i % 2 == 0, i % 3 == 0, True, False]) for i in range(30)]
    paired = paired_differences(full_result(records, "a"), full_result(records, "a"), Bootstrap())
    assert paired["tasks"] == {"base": 30, "other": 30, "common": 30} and not paired["notes"]
    for key in ("pass@1", "pass@2", "success/rate", "reward/mean"):
        entry = paired["differences"][key]
        assert entry["difference"] == 0.0, key
        low, high = entry["interval"]
        assert low <= 0.0 <= high and not entry["excludes_zero"], key


def test_paired_comparison_of_clearly_different_files_excludes_zero(tmp_path):
    base = [record(f"t{i}", [False, False, False, i % 4 == 0]) for i in range(40)]
    trained = [record(f"t{i}", [True, True, i % 2 == 0, False]) for i in range(40)]
    paired = paired_differences(full_result(base, "b"), full_result(trained, "t"), Bootstrap())
    entry = paired["differences"]["pass@1"]
    assert entry["difference"] == pytest.approx(0.625 - 0.0625)
    assert entry["interval"][0] > 0 and entry["excludes_zero"]
    a, b = tmp_path / "base.json", tmp_path / "trained.json"
    a.write_text(json.dumps(full_result(base, "b")))
    b.write_text(json.dumps(full_result(trained, "t")))
    table = print_compare([str(a), str(b)])
    row = next(line for line in table.splitlines() if line.startswith("| pass@1 | +"))
    assert row.endswith("| 40 | excludes 0: trained is higher than base |")
    again = tmp_path / "again.json"
    again.write_text(a.read_text())
    same = print_compare([str(a), str(again)])
    assert "| pass@1 | +0.000 |" in same and "contains 0: no difference shown at 95%" in same


def test_markdown_and_terminal_tables_show_each_score_with_interval_and_counts(
    hand_records, tmp_path, capsys, monkeypatch
):
    from pathlib import Path

    monkeypatch.setenv("COLUMNS", "200")  # rich wraps the cells in a narrow terminal
    result = full_result(hand_records, "m")
    low, high = result["intervals"]["pass@1"]
    row = f"| pass@1 | 0.700 | [{low:.3f}, {high:.3f}] | 5 | 10 |"
    assert row in markdown_report(result).splitlines()
    print_result(result, Path(tmp_path / "r.json"))
    printed = capsys.readouterr().out
    assert "95% interval" in printed and f"[{low:.3f}, {high:.3f}]" in printed


def test_compare_flags_task_sets_that_differ_and_refuses_a_pairing_without_common_tasks():
    first = [record(f"t{i}", [i % 2 == 0, True]) for i in range(10)]
    shifted = [record(f"t{i}", [True, True]) for i in range(5, 15)]
    paired = paired_differences(full_result(first, "a"), full_result(shifted, "b"), Bootstrap())
    assert paired["tasks"] == {"base": 10, "other": 10, "common": 5}
    assert any("task sets differ" in note for note in paired["notes"])
    assert paired["differences"]["pass@1"]["tasks"] == 5
    disjoint = [record(f"u{i}", [True, True]) for i in range(10)]
    none = paired_differences(full_result(first, "a"), full_result(disjoint, "b"), Bootstrap())
    assert none["differences"] == {}
    assert "no scored task in common: no paired difference" in none["notes"]
    table = compare_markdown([full_result(first, "a"), full_result(disjoint, "b")], ["a", "b"])
    assert "- note: no scored task in common: no paired difference" in table
