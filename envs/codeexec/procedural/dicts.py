"""The dict family: L1 one key, L2 one builtin over the dict, L3 a comprehension or a count."""

import random

from envs.codeexec.procedural.shape import (
    KEYS,
    WORDS,
    Constants,
    Shape,
    bounds,
    direction,
    draw_mapping,
    one_mapping,
)


def _maybe_with_key(rng: random.Random, constants: Constants) -> tuple:
    """A mapping that holds the task's key half of the time (so both answers get tested)."""
    return (draw_mapping(rng, constants["key"] if rng.random() < 0.5 else None),)


def _longer_than(rng: random.Random) -> Constants:
    n = rng.randint(0, 5)
    return {"n": n, "longer": "" if n == 0 else f" longer than {n} characters"}


LEVELS: dict[int, tuple[Shape, ...]] = {
    1: (
        Shape(
            "value_plus",
            lambda rng: {"key": rng.choice(KEYS), "k": rng.randint(1, 20)},
            "value_plus",
            "(d: dict[str, int]) -> int",
            "returns the value stored under the key {key!r} in d, plus {k}",
            "    return d[{key!r}] + {k}",
            lambda rng, constants: (draw_mapping(rng, constants["key"]),),
        ),
        Shape(
            "get_default",
            lambda rng: {"key": rng.choice(KEYS), "default": rng.randint(-5, 20)},
            "value_or_default",
            "(d: dict[str, int]) -> int",
            "returns the value stored under the key {key!r} in d, or {default} if the key "
            "is missing",
            "    return d.get({key!r}, {default})",
            _maybe_with_key,
        ),
        Shape(
            "set_key",
            lambda rng: {"key": rng.choice(KEYS), "value": rng.randint(-5, 50)},
            "with_key",
            "(d: dict[str, int]) -> dict[str, int]",
            "returns a new dict: a copy of d in which the key {key!r} maps to {value}",
            "    return {{**d, {key!r}: {value}}}",
            one_mapping,
        ),
    ),
    2: (
        Shape(
            "size_plus",
            lambda rng: {"k": rng.randint(1, 60)},
            "size_plus",
            "(d: dict[str, int]) -> int",
            "returns the number of keys in d plus {k}",
            "    return len(d) + {k}",
            one_mapping,
        ),
        Shape(
            "sum_plus",
            lambda rng: {"k": rng.randint(1, 150)},
            "values_sum_plus",
            "(d: dict[str, int]) -> int",
            "returns the sum of the values of d plus {k}",
            "    return sum(d.values()) + {k}",
            one_mapping,
        ),
        Shape(
            "max_minus",
            lambda rng: {"k": rng.randint(1, 80)},
            "max_value_minus",
            "(d: dict[str, int]) -> int",
            "returns the largest value in d minus {k}",
            "    return max(d.values()) - {k}",
            one_mapping,
        ),
        Shape(
            "has_key",
            lambda rng: {"key": rng.choice(KEYS)},
            "has_key",
            "(d: dict[str, int]) -> bool",
            "returns True if {key!r} is a key of d, else False",
            "    return {key!r} in d",
            _maybe_with_key,
        ),
        Shape(
            "sorted_keys",
            lambda rng: direction(rng, "alphabetical", "reverse alphabetical"),
            "sorted_keys",
            "(d: dict[str, int]) -> list[str]",
            "returns the keys of d as a list in {order} order",
            "    return sorted(d{reverse_arg})",
            one_mapping,
            key_fields=("reverse",),
        ),
    ),
    3: (
        Shape(
            "keys_above",
            lambda rng: {"t": rng.randint(-5, 30)},
            "keys_above",
            "(d: dict[str, int]) -> list[str]",
            "returns the keys of d whose value is greater than {t}, sorted alphabetically",
            "    return sorted(k for k, v in d.items() if v > {t})",
            one_mapping,
        ),
        Shape(
            "scale",
            lambda rng: {"m": rng.randint(2, 12)},
            "scale_values",
            "(d: dict[str, int]) -> dict[str, int]",
            "returns a new dict with the same keys and every value multiplied by {m}",
            "    return {{k: v * {m} for k, v in d.items()}}",
            one_mapping,
        ),
        Shape(
            "add",
            lambda rng: {"m": rng.randint(1, 50)},
            "add_to_values",
            "(d: dict[str, int]) -> dict[str, int]",
            "returns a new dict with the same keys and {m} added to every value",
            "    return {{k: v + {m} for k, v in d.items()}}",
            one_mapping,
        ),
        Shape(
            "keys_between",
            bounds,
            "keys_between",
            "(d: dict[str, int]) -> list[str]",
            "returns the keys of d whose value lies between {low} and {high} inclusive, "
            "sorted alphabetically",
            "    return sorted(k for k, v in d.items() if {low} <= v <= {high})",
            one_mapping,
        ),
        Shape(
            "count_words",
            _longer_than,
            "count_words",
            "(words: list[str]) -> dict[str, int]",
            "returns a dict mapping each word of the list words{longer} to the number of "
            "times it occurs",
            "    counts = {{}}\n    for w in words:\n        if len(w) > {n}:\n"
            "            counts[w] = counts.get(w, 0) + 1\n    return counts",
            lambda rng, constants: ([rng.choice(WORDS[:8]) for _ in range(rng.randint(3, 8))],),
            key_fields=("n",),
        ),
    ),
}
