"""Where a run's tasks come from: the environment factory, the splits' task ids, the seeded
order training draws them in, and the kind-stratified subsets that evaluations hold out."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from typing import Any

from trainer.config import RunConfig


def make_env_factory(cfg: RunConfig, extra_kwargs: dict | None = None) -> Callable[[], Any]:
    """A callable returning a fresh environment: local, or remote when ``env.urls`` is set."""
    import gymnasium

    import envs  # noqa: F401  (registers the ids)

    kwargs = {**cfg.env.kwargs, **(extra_kwargs or {})}
    if cfg.env.urls:
        token = os.environ.get(cfg.env.token_env)
        urls = list(cfg.env.urls)
        remote = {"token": token, "ca_file": cfg.env.ca_file}
        return lambda: gymnasium.make(
            "eprl/Remote-v0", url=urls, env_id=cfg.env.id, env_kwargs=kwargs, **remote
        )
    return lambda: gymnasium.make(cfg.env.id, **kwargs)


def split_task_ids(make_env: Callable[[], Any], split: str) -> list[str]:
    env = make_env()
    try:
        return list(env.unwrapped.task_ids(split))
    finally:
        env.close()


class TaskCursor:
    """Draws tasks from a split in seeded random order, epoch after epoch; its state (epoch,
    position) is saved with each checkpoint so a resumed run sees the same tasks."""

    def __init__(self, task_ids: list[str], seed: int) -> None:
        if not task_ids:
            raise ValueError("the training split has no tasks")
        self.task_ids = task_ids
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def _order(self) -> list[str]:
        order = list(self.task_ids)
        random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        return order

    def next(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            order = self._order()
            take = order[self.position : self.position + n - len(out)]
            out.extend(take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def task_kinds(task_ids: Sequence[str]) -> dict[str, list[str]]:
    """Tasks by kind (the id up to its last ``/``; ``proc/<family>/L<level>`` for procedural
    CodeExec tasks; ids without ``/`` form one kind), kinds and tasks in the split's order."""
    kinds: dict[str, list[str]] = {}
    for task in task_ids:
        kinds.setdefault(task.rpartition("/")[0], []).append(task)
    return kinds


def stratified_tasks(task_ids: Sequence[str], per_group: int) -> list[str]:
    """The first ``per_group`` tasks of each kind, in the split's order, kinds in order of first
    appearance: a held-out subset that covers every family and level, where the split's own
    first N tasks would all be of one kind."""
    if per_group < 1:
        raise ValueError(f"per_group must be >= 1, got {per_group}")
    return [task for members in task_kinds(task_ids).values() for task in members[:per_group]]


def held_out_tasks(task_ids: Sequence[str], num_tasks: int) -> list[str]:
    """``num_tasks`` tasks taken in turn from each kind of the split, not the split's first
    ones (which are all of one kind); fewer when the split has fewer."""
    kinds = task_kinds(task_ids)
    chosen: list[str] = []
    for rank in range(max((len(members) for members in kinds.values()), default=0)):
        for members in kinds.values():
            if rank < len(members) and len(chosen) < num_tasks:
                chosen.append(members[rank])
    return chosen
