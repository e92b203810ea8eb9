"""Checking the generated tasks through AppWorld itself, as AppWorld's own generator does."""

from __future__ import annotations

import os
import shutil


def validate(out: str, task_ids: list[str]) -> list[str]:
    """Check every task through AppWorld in-process, as AppWorld's own generator does.

    Doing nothing must fail exactly the tests labelled ``no_op_fail``; the reference solution
    must then pass all tests. Returns one message per failed task (empty if all are good).
    """
    from appworld import AppWorld

    failures = []
    for task_id in task_ids:
        experiment = f"eprl_validate_{task_id}"
        with AppWorld(
            task_id=task_id, experiment_name=experiment, ground_truth_mode="full"
        ) as world:
            no_op = world.evaluate(suppress_errors=True)
            expected = [
                t["requirement"]
                for t in world.task.ground_truth.test_data
                if t["label"] == "no_op_fail"
            ]
            if sorted(f["requirement"] for f in no_op.failures) != sorted(expected):
                failures.append(
                    f"{task_id}: doing nothing failed {[f['requirement'] for f in no_op.failures]}, "
                    f"expected exactly the no_op_fail tests {expected}"
                )
            code = (
                world.task.ground_truth.compiled_solution_code + "\n\nsolution(apis, requester)\n"
            )
            output = world.execute(code)
            tracker = world.evaluate(suppress_errors=True)
            if not tracker.success:
                traces = [f["requirement"] + "\n" + f["trace"] for f in tracker.failures]
                failures.append(
                    f"{task_id}: reference solution output {output[-800:]!r}; failed: {traces}"
                )
        shutil.rmtree(os.path.join(out, "experiments", "outputs", experiment), ignore_errors=True)
    return failures
