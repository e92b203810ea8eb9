"""Evaluation: K samples per task -> pass@1, pass@k, reward, success, TGC/SGC, diversity, each
score with its bootstrap interval and the tasks and samples it rests on.

- ``metrics.py``: the estimators and the one summariser (training, the demo, ``eprl eval``);
- ``intervals.py``: the bootstrap intervals on every score, paired differences;
- ``compare.py``: the paired difference of two result files (``--compare``);
- ``sidecar.py``: the resumable per-task log ``OUT.tasks.jsonl``;
- ``runner.py``: :func:`run_evaluation` (resumable, writes results) and :func:`evaluate_policy`;
- ``report.py``: the JSON/Markdown results, the terminal table, ``--compare``;
- ``cli.py``: ``eprl eval``.
"""

from trainer.evaluation.metrics import pass_at_k, summarize_episodes, summarize_tasks
from trainer.evaluation.runner import evaluate_policy, run_evaluation

__all__ = [
    "evaluate_policy",
    "pass_at_k",
    "run_evaluation",
    "summarize_episodes",
    "summarize_tasks",
]
