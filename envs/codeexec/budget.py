"""A wall-clock budget for the model-code part of grading one submission.

Why: a submission that loops forever used to cost ``tests x cell_timeout_s`` plus a session
restart and a re-run of the submission after every timed-out test (21-32 s with the default
10 s cell timeout), and the rollout waited on it. Under a budget every cell of model code runs
with ``timeout_s = min(cell_timeout_s, remaining budget)``; restarting a lost session and
re-running the submission are charged to it too; once it is spent, the cells left are not run
and their tests count as failed.

The budget can only lower a reward, never raise it: a cell whose timeout it does not shorten
runs exactly as without a budget, and a cell it shortens ends at the budget's deadline, after
which nothing more runs. So a budgeted grading is the unbudgeted one cut at a point, with
every test from there on failed (up to code whose result depends on how fast it runs).

The clock starts once the grading sandbox is up (that first start is the same fixed cost for
every submission, so it is not charged) and runs through everything after it.
"""

import math
import time

from envs.sandbox import CellResult, PythonSandbox

# Why 5 s: measured on the shared 2-core machine (load ~2), the model code of a correct
# reference solution is charged at most 0.019 s over the 240 procedural test tasks and at most
# 0.26 s over all 164 HumanEval canonical solutions (HumanEval/75; median 0.06 s), so 5 s
# leaves a margin of about 19x for a slower or busier machine, while a submission that loops
# forever costs about 5 s of grading instead of tests x 10 s. It also caps one test at 5 s
# (the sandbox's default cell timeout is 10 s): a correct but slower answer still has 19x the
# canonical solution's time.
DEFAULT_GRADING_BUDGET_S = 5.0


def check_budget(value: object) -> float:
    """``value`` as a budget in seconds; ValueError naming it unless it is a number > 0."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and not math.isnan(value) and value > 0):
        raise ValueError(f"grading_budget_s must be a number of seconds > 0, got {value!r}")
    return float(value)


class GradingBudget:
    """Runs the cells of model code of one grading in ``sandbox`` under ``seconds`` of wall time.

    ``spent``: the budget stopped grading (a cell it cut short timed out, or a cell was not run
    because nothing was left). ``used_s``: seconds charged so far.
    """

    def __init__(self, sandbox: PythonSandbox, seconds: float) -> None:
        self.sandbox = sandbox
        self.seconds = check_budget(seconds)
        self.cell_timeout_s = sandbox.config.cell_timeout_s
        self.spent = False
        self._cut: CellResult | None = None
        self._deadline: float | None = None
        self._started_at = 0.0

    def remaining(self) -> float:
        if self._deadline is None:
            return self.seconds
        return self._deadline - time.monotonic()

    @property
    def used_s(self) -> float:
        return 0.0 if self._deadline is None else time.monotonic() - self._started_at

    def run(self, code: str) -> CellResult | None:
        """The cell's result, or None when the budget is spent (the cell was not run). A result
        that timed out because the budget shortened its timeout also marks the budget spent."""
        if not self.sandbox.alive:  # first start (free) or a restart after a lost session
            self.sandbox.restart()
            self.sandbox.start()
        if self._deadline is None:
            self._started_at = time.monotonic()
            self._deadline = self._started_at + self.seconds
        remaining = self.remaining()
        if remaining <= 0:
            self.spent = True
            return None
        timeout_s = min(self.cell_timeout_s, remaining)
        result = self.sandbox.run_cell(code, timeout_s=timeout_s)
        if result.timed_out and timeout_s < self.cell_timeout_s:
            self.spent, self._cut = True, result
        return result

    def cut(self, result: CellResult | None) -> bool:
        """Whether ``result`` (from ``run``) is a cell the budget stopped: not run, or cut short."""
        return result is None or result is self._cut
