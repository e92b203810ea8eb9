"""What every scenario family shares: the task plan, the scenario row, evaluations, helpers.

A scenario's ``make(world, rng, n, used)`` returns the ``TaskPlan`` of its ``n``-th task: the
supervisor (never one already ``used`` by the scenario), the instruction, the reference
solution's body (``<<slot>>`` templates filled by ``render``) and what the evaluation reads
(``answer``, ``private_data``) or the task adds to the world (``setup``, ``texts``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..world import Person, World

# Shared opening of every reference solution: the supervisor's passwords and identity.
LOGIN = """
    passwords = {item["account_name"]: item["password"] for item in apis.supervisor.show_account_passwords()}
    profile = apis.supervisor.show_profile()
"""

# Logs in to Spotify and collects every page of the supervisor's playlist library.
SPOTIFY_PLAYLISTS = """
    token = apis.spotify.login(username=profile["email"], password=passwords["spotify"])["access_token"]
    playlists, page_index = [], 0
    while page := apis.spotify.show_playlist_library(access_token=token, page_index=page_index, page_limit=20):
        playlists += page
        page_index += 1
"""

NO_OP_FAIL, NO_OP_PASS = "no_op_fail", "no_op_pass"  # AppWorld's labels: what doing nothing does
_REQUIREMENT = re.compile(r'with test\("""(.*?)"""\):', re.DOTALL)


@dataclass(frozen=True)
class Evaluation:
    """A task's ``evaluation.py`` and its ``test_data.json`` rows (requirement, label)."""

    code: str
    tests: list[tuple[str, str]]


def evaluation(name: str, labels: tuple[str, ...]) -> Evaluation:
    """Load ``evaluate_<name>.py.txt`` (package data beside this module) and label its tests.

    The requirements are read from the file's ``with test(\"\"\"...\"\"\")`` blocks, so they are
    written once; ``labels`` says, in the same order, whether doing nothing fails each test.
    """
    code = Path(__file__).with_name(f"evaluate_{name}.py.txt").read_text()
    requirements = _REQUIREMENT.findall(code)
    if len(requirements) != len(labels):
        raise ValueError(
            f"evaluate_{name}.py.txt has {len(requirements)} tests, but {len(labels)} labels "
            f"were given ({labels}); expected one {NO_OP_FAIL!r} or {NO_OP_PASS!r} per test"
        )
    return Evaluation(code, list(zip(requirements, labels, strict=True)))


@dataclass
class TaskPlan:
    """One task before it is written: see the module docstring."""

    supervisor: Person
    instruction: str
    solution_body: str
    answer: Any = None
    private_data: dict[str, Any] = field(default_factory=dict)
    public_data: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[Any], None] | None = None  # adds task-specific records to the models
    texts: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Scenario:
    """One scenario (AppWorld's unit of task generation): ``tasks_per_scenario`` tasks of it."""

    name: str
    difficulty: int
    required_apps: list[str]
    split: str
    evaluation: Evaluation
    make: Callable[[World, random.Random, int, set[int]], TaskPlan]


def pick(
    rng: random.Random, world: World, used: set[int], ok: Callable[[Person], bool] = lambda p: True
) -> Person:
    """A supervisor the scenario has not used yet, among the people ``ok`` accepts."""
    candidates = [p for p in world.people if p.index not in used and ok(p)]
    person = rng.choice(candidates)
    used.add(person.index)
    return person


def render(template: str, **values: Any) -> str:
    """Fill <<name>> slots with Python literals (repr), so generated code is always valid."""
    return re.sub(r"<<(\w+)>>", lambda m: repr(values[m.group(1)]), template)
