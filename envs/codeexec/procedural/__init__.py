"""The built-in procedural task family: small seeded Python function tasks.

Four families (arithmetic, string, list, dict) at three levels, as in the calibration of
platform-notes.md: L1 one arithmetic or indexing step, L2 one builtin or method call, L3 a small
loop or comprehension. ``SHAPES`` is the table: one row per (family, level), each a tuple of
``Shape`` rows (``shape.py``) in the family's module. A task's seeded ``random.Random`` picks
one shape, draws its constants, then the inputs; the task is the function name, signature,
one-line description, reference body, an example and four hidden tests (expected outputs are
computed by running the reference body on the host: it is our code, not the agent's).

Task ids are ``proc/<family>/L<level>/<seed>``. Splits are disjoint by construction: a task's
split is a hash of its *content* key (shape + constants), not of its seed, and content keys
are de-duplicated, so no two ids of different splits (or of one split) pose the same function.
For each (family, level) the seeds are enumerated in order until every split has its quota.
The order of the rows and of each shape's draws is part of the task ids' meaning: changing it
changes which function an id poses.
"""

import hashlib
import random
from dataclasses import dataclass
from functools import cache

from envs.codeexec.procedural import arithmetic, dicts, lists, strings
from envs.codeexec.procedural.shape import Constants, Shape

FAMILIES = ("arithmetic", "string", "list", "dict")
LEVELS = (1, 2, 3)
SPLIT_QUOTAS = {"train": 200, "dev": 10, "test": 20}  # per (family, level): 12 x these in total
N_TESTS = 4
# A content key lands in test with 9%, dev 5%, train 86% (about the quota ratios).
_SPLIT_BUCKETS = (("test", 9), ("dev", 14), ("train", 100))
_MAX_SEEDS = 20000

_FAMILY_LEVELS = {
    "arithmetic": arithmetic.LEVELS,
    "string": strings.LEVELS,
    "list": lists.LEVELS,
    "dict": dicts.LEVELS,
}
SHAPES: dict[tuple[str, int], tuple[Shape, ...]] = {
    (family, level): _FAMILY_LEVELS[family][level] for family in FAMILIES for level in LEVELS
}


@dataclass(frozen=True)
class ProceduralSpec:
    """One generated function task (before it becomes an env ``Task``)."""

    task_id: str
    family: str
    level: int
    key: tuple  # content key: family, shape kind, constants
    name: str  # function name
    signature: str  # "(x: int) -> int"
    description: str  # completes "Write a function `name(...)` that ..."
    body: str  # reference body, indented by 4 spaces
    example_args: tuple
    test_args: tuple[tuple, ...]

    @property
    def reference_solution(self) -> str:
        return f"def {self.name}{self.signature}:\n{self.body}\n"

    def call(self, args: tuple) -> str:
        return f"{self.name}({', '.join(repr(arg) for arg in args)})"


def split_of(key: tuple) -> str:
    """The split of a content key: a stable hash, so it never depends on the seed."""
    bucket = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16) % 100
    return next(split for split, bound in _SPLIT_BUCKETS if bucket < bound)


def _draw(family: str, level: int, seed: int) -> tuple[random.Random, Shape, Constants]:
    """The seed's generator after it picked the shape and drew its constants."""
    rng = random.Random(f"eprl-procedural/{family}/{level}/{seed}")
    shape = rng.choice(SHAPES[family, level])
    return rng, shape, shape.draw(rng)


def generate(family: str, level: int, seed: int) -> ProceduralSpec:
    """The task of (family, level, seed): pure and deterministic (its own seeded generator)."""
    if (family, level) not in SHAPES:
        raise ValueError(
            f"no procedural template for family={family!r} level={level!r}; "
            f"families are {FAMILIES}, levels {LEVELS}"
        )
    rng, shape, constants = _draw(family, level, seed)
    name, signature, description, body = shape.text(constants)
    seen: set[str] = set()
    inputs: list[tuple] = []
    for _ in range(200):  # distinct inputs: one example plus the hidden tests
        args = shape.inputs(rng, constants)
        if repr(args) not in seen:
            seen.add(repr(args))
            inputs.append(args)
            if len(inputs) == N_TESTS + 1:
                break
    return ProceduralSpec(
        task_id=f"proc/{family}/L{level}/{seed}",
        family=family,
        level=level,
        key=shape.key(family, constants),
        name=name,
        signature=signature,
        description=description,
        body=body,
        example_args=inputs[0],
        test_args=tuple(inputs[1:]),
    )


def parse_task_id(task_id: str) -> tuple[str, int, int]:
    """``proc/<family>/L<level>/<seed>`` -> (family, level, seed); ValueError when malformed."""
    parts = task_id.split("/")
    levels = {f"L{level}" for level in LEVELS}
    valid = len(parts) == 4 and parts[0] == "proc" and parts[1] in FAMILIES
    if not (valid and parts[2] in levels and parts[3].isdigit()):
        raise ValueError(
            f"not a procedural task id: {task_id!r} "
            "(expected proc/<family>/L<level>/<seed>, e.g. proc/list/L2/17)"
        )
    return parts[1], int(parts[2][1:]), int(parts[3])


@cache
def catalogue_ids() -> dict[str, tuple[str, ...]]:
    """Every split's task ids, by enumerating seeds per (family, level) until quotas fill.

    A seed whose content key was already taken (by any split) is skipped, so ids and contents
    are one-to-one and the splits are disjoint.
    """
    ids: dict[str, list[str]] = {split: [] for split in SPLIT_QUOTAS}
    for family in FAMILIES:
        for level in LEVELS:
            taken: set[tuple] = set()
            counts = dict.fromkeys(SPLIT_QUOTAS, 0)
            for seed in range(_MAX_SEEDS):
                _, shape, constants = _draw(family, level, seed)
                key = shape.key(family, constants)
                split = split_of(key)
                if key in taken or counts[split] >= SPLIT_QUOTAS[split]:
                    continue
                taken.add(key)
                counts[split] += 1
                ids[split].append(f"proc/{family}/L{level}/{seed}")
                if counts == SPLIT_QUOTAS:
                    break
            else:
                raise RuntimeError(
                    f"procedural family {family} L{level} has too few distinct "
                    f"tasks for the quotas {SPLIT_QUOTAS}: got {counts}"
                )
    return {split: tuple(task_ids) for split, task_ids in ids.items()}


@cache
def split_by_id() -> dict[str, str]:
    """Task id -> split, for every id of the catalogue."""
    return {task_id: split for split, ids in catalogue_ids().items() for task_id in ids}
