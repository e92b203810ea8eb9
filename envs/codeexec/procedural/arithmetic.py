"""The arithmetic family: L1 one operation, L2 one builtin, L3 a sum or product over a range."""

import random

from envs.codeexec.procedural.shape import (
    Constants,
    Shape,
    draw_int,
    one_int,
    sorted_pair,
    two_ints,
)


def _up_to_40(rng: random.Random, constants: Constants) -> tuple:
    return (rng.randint(1, 40),)


def _modulus_and_remainder(rng: random.Random) -> Constants:
    k = rng.randint(2, 6)
    return {"k": k, "r": rng.randint(0, k - 1)}


LEVELS: dict[int, tuple[Shape, ...]] = {
    1: (
        Shape(
            "linear",
            lambda rng: {"a": rng.randint(2, 9), "b": rng.randint(1, 20)},
            "scale_and_shift",
            "(x: int) -> int",
            "returns x multiplied by {a}, plus {b}",
            "    return x * {a} + {b}",
            one_int,
        ),
        Shape(
            "times_minus",
            lambda rng: {"a": rng.randint(2, 30)},
            "times_minus",
            "(x: int, y: int) -> int",
            "returns {a} times x minus y",
            "    return {a} * x - y",
            two_ints,
        ),
        Shape(
            "floordiv",
            lambda rng: {"a": rng.randint(2, 20)},
            "floor_divide",
            "(x: int) -> int",
            "returns x divided by {a}, rounded down (integer division)",
            "    return x // {a}",
            one_int,
        ),
        Shape(
            "mod",
            lambda rng: {"a": rng.randint(2, 20)},
            "remainder",
            "(x: int) -> int",
            "returns the remainder of x divided by {a} (Python's % operator)",
            "    return x % {a}",
            one_int,
        ),
        Shape(
            "square_plus",
            lambda rng: {"c": rng.randint(1, 50)},
            "square_plus",
            "(x: int) -> int",
            "returns x squared plus {c}",
            "    return x * x + {c}",
            one_int,
        ),
        Shape(
            "subtract",
            lambda rng: {"a": rng.randint(10, 200)},
            "subtract_from",
            "(x: int) -> int",
            "returns {a} minus x",
            "    return {a} - x",
            one_int,
        ),
    ),
    2: (
        Shape(
            "abs_diff",
            lambda rng: {"a": rng.randint(-30, 30)},
            "distance_to",
            "(x: int) -> int",
            "returns the absolute difference between x and {a}",
            "    return abs(x - {a})",
            one_int,
        ),
        Shape(
            "max_times",
            lambda rng: {"a": rng.randint(2, 15)},
            "max_times",
            "(x: int, y: int) -> int",
            "returns the larger of x and y, multiplied by {a}",
            "    return max(x, y) * {a}",
            two_ints,
        ),
        Shape(
            "min_plus",
            lambda rng: {"a": rng.randint(1, 30)},
            "min_plus",
            "(x: int, y: int) -> int",
            "returns the smaller of x and y, plus {a}",
            "    return min(x, y) + {a}",
            two_ints,
        ),
        Shape(
            "pow_mod",
            lambda rng: {"a": rng.randint(2, 6), "m": rng.randint(5, 50)},
            "power_mod",
            "(x: int) -> int",
            "returns x to the power {a}, modulo {m}",
            "    return pow(x, {a}, {m})",
            lambda rng, constants: (draw_int(rng, 0, 30),),
        ),
        Shape(
            "round_div",
            lambda rng: {"a": rng.randint(2, 9), "d": rng.randint(1, 3)},
            "divide_rounded",
            "(x: int) -> float",
            "returns x divided by {a}, rounded to {d} decimal places with round()",
            "    return round(x / {a}, {d})",
            lambda rng, constants: (draw_int(rng, -100, 100),),
        ),
    ),
    3: (
        Shape(
            "sum_multiples",
            lambda rng: {"k": rng.randint(2, 12)},
            "sum_multiples",
            "(n: int) -> int",
            "returns the sum of all multiples of {k} from 1 to n inclusive",
            "    return sum(i for i in range(1, n + 1) if i % {k} == 0)",
            _up_to_40,
        ),
        Shape(
            "count_divisible",
            lambda rng: sorted_pair(rng, ("a", "b"), range(2, 13)),
            "count_divisible",
            "(n: int) -> int",
            "returns how many integers from 1 to n inclusive are divisible by {a} or by {b}",
            "    return sum(1 for i in range(1, n + 1) if i % {a} == 0 or i % {b} == 0)",
            _up_to_40,
        ),
        Shape(
            "product_mod",
            lambda rng: {"m": rng.randint(7, 1000)},
            "product_mod",
            "(n: int) -> int",
            "returns the product of the integers from 1 to n inclusive, modulo {m}",
            "    result = 1\n    for i in range(1, n + 1):\n        result *= i\n    return result % {m}",
            lambda rng, constants: (rng.randint(1, 15),),
        ),
        Shape(
            "sum_squares_mod",
            _modulus_and_remainder,
            "sum_squares_mod",
            "(n: int) -> int",
            "returns the sum of i * i for every i in range(n) whose remainder modulo {k} is {r}",
            "    return sum(i * i for i in range(n) if i % {k} == {r})",
            _up_to_40,
        ),
    ),
}
