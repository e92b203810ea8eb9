"""The list family: L1 indexing or concatenation, L2 one builtin, L3 a filter or comprehension."""

import random

from envs.codeexec.procedural.shape import (
    Constants,
    Shape,
    bounds,
    direction,
    draw_ints,
    one_list,
    sorted_pair,
)


def _scaled_differences(rng: random.Random) -> Constants:
    k = rng.randint(1, 9)
    return {"k": k, "scaled": "" if k == 1 else f", multiplied by {k}"}


def _clip(rng: random.Random) -> Constants:
    """A bound, then a coin: cap the values at it from above, or floor them from below."""
    k = rng.randint(0, 30)
    if rng.random() < 0.5:
        return {
            "bound": "max",
            "k": k,
            "function": "cap_values",
            "compare": "greater",
            "clamp": "min",
        }
    return {
        "bound": "min",
        "k": k,
        "function": "floor_values",
        "compare": "smaller",
        "clamp": "max",
    }


LEVELS: dict[int, tuple[Shape, ...]] = {
    1: (
        Shape(
            "first_plus",
            lambda rng: {"k": rng.randint(1, 50)},
            "first_plus",
            "(xs: list[int]) -> int",
            "returns the first element of xs plus {k}",
            "    return xs[0] + {k}",
            one_list,
        ),
        Shape(
            "last_times",
            lambda rng: {"k": rng.randint(2, 20)},
            "last_times",
            "(xs: list[int]) -> int",
            "returns the last element of xs multiplied by {k}",
            "    return xs[-1] * {k}",
            one_list,
        ),
        Shape(
            "append",
            lambda rng: {"k": rng.randint(-50, 100)},
            "append_value",
            "(xs: list[int]) -> list[int]",
            "returns a new list: the elements of xs followed by {k}",
            "    return xs + [{k}]",
            one_list,
        ),
        Shape(
            "prepend",
            lambda rng: {"k": rng.randint(-50, 100)},
            "prepend_value",
            "(xs: list[int]) -> list[int]",
            "returns a new list: {k} followed by the elements of xs",
            "    return [{k}] + xs",
            one_list,
        ),
        Shape(
            "length_times",
            lambda rng: {"k": rng.randint(2, 20)},
            "length_times",
            "(xs: list[int]) -> int",
            "returns the number of elements of xs multiplied by {k}",
            "    return len(xs) * {k}",
            one_list,
        ),
        Shape(
            "pair",
            lambda rng: sorted_pair(rng, ("i", "j"), range(3)),
            "pair_sum",
            "(xs: list[int]) -> int",
            "returns the element at index {i} of xs plus the element at index {j}",
            "    return xs[{i}] + xs[{j}]",
            one_list,
        ),
    ),
    2: (
        Shape(
            "max_plus",
            lambda rng: {"k": rng.randint(1, 100)},
            "max_plus",
            "(xs: list[int]) -> int",
            "returns the largest element of xs plus {k}",
            "    return max(xs) + {k}",
            one_list,
        ),
        Shape(
            "min_minus",
            lambda rng: {"k": rng.randint(1, 100)},
            "min_minus",
            "(xs: list[int]) -> int",
            "returns the smallest element of xs minus {k}",
            "    return min(xs) - {k}",
            one_list,
        ),
        Shape(
            "sum_plus",
            lambda rng: {"k": rng.randint(1, 100)},
            "sum_plus",
            "(xs: list[int]) -> int",
            "returns the sum of the elements of xs plus {k}",
            "    return sum(xs) + {k}",
            one_list,
        ),
        Shape(
            "sum_times",
            lambda rng: {"k": rng.randint(2, 12)},
            "sum_times",
            "(xs: list[int]) -> int",
            "returns the sum of the elements of xs multiplied by {k}",
            "    return sum(xs) * {k}",
            one_list,
        ),
        Shape(
            "count",
            lambda rng: {"k": rng.randint(-5, 20)},
            "count_value",
            "(xs: list[int]) -> int",
            "returns how many elements of xs are equal to {k}",
            "    return xs.count({k})",
            lambda rng, constants: (draw_ints(rng, constants["k"] - 2, constants["k"] + 2),),
        ),
        Shape(
            "sorted",
            lambda rng: direction(rng, "increasing", "decreasing"),
            "sort_{order}",
            "(xs: list[int]) -> list[int]",
            "returns a new list with the elements of xs in {order} order",
            "    return sorted(xs{reverse_arg})",
            one_list,
            key_fields=("reverse",),
        ),
    ),
    3: (
        Shape(
            "filter_scale",
            lambda rng: {"k": rng.randint(2, 9), "m": rng.randint(2, 5)},
            "scale_multiples",
            "(xs: list[int]) -> list[int]",
            "returns the elements of xs that are divisible by {m}, each multiplied by {k}, "
            "in their original order",
            "    return [x * {k} for x in xs if x % {m} == 0]",
            one_list,
        ),
        Shape(
            "sum_greater",
            lambda rng: {"k": rng.randint(-10, 30)},
            "sum_greater",
            "(xs: list[int]) -> int",
            "returns the sum of the elements of xs that are greater than {k}",
            "    return sum(x for x in xs if x > {k})",
            one_list,
        ),
        Shape(
            "count_between",
            bounds,
            "count_between",
            "(xs: list[int]) -> int",
            "returns how many elements of xs lie between {low} and {high} inclusive",
            "    return sum(1 for x in xs if {low} <= x <= {high})",
            one_list,
        ),
        Shape(
            "diffs",
            _scaled_differences,
            "neighbour_differences",
            "(xs: list[int]) -> list[int]",
            "returns the list of differences xs[i + 1] - xs[i] between neighbours{scaled}",
            "    return [(b - a) * {k} for a, b in zip(xs, xs[1:])]",
            one_list,
            key_fields=("k",),
        ),
        Shape(
            "clip",
            _clip,
            "{function}",
            "(xs: list[int]) -> list[int]",
            "returns xs with every element {compare} than {k} replaced by {k}",
            "    return [{clamp}(x, {k}) for x in xs]",
            one_list,
            key_fields=("bound", "k"),
        ),
    ),
}
