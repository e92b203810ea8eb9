"""The code-execution environment ``eprl/CodeExec-v0`` and its task sets."""

from envs.codeexec.env import ENV_ID, CodeExecEnv
from envs.codeexec.tasks import TASK_SETS, split_ids


def catalogue() -> list[dict]:
    """One entry per task set: env id, task set, the kwargs selecting it, tasks per split."""
    return [
        {
            "env_id": ENV_ID,
            "task_set": task_set,
            "kwargs": {"task_set": task_set},
            "splits": {split: len(ids) for split, ids in split_ids(task_set).items()},
        }
        for task_set in TASK_SETS
    ]


__all__ = ["CodeExecEnv", "catalogue"]
