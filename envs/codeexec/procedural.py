"""The built-in procedural task family: small seeded Python function tasks.

Four families (arithmetic, string, list, dict) at three levels, as in the calibration of
platform-notes.md: L1 one arithmetic or indexing step, L2 one builtin or method call, L3 a small
loop or comprehension. A template draws its constants from a seeded ``random.Random``; the task
is the function name, signature, one-line description, reference body, an example and four
hidden tests (inputs drawn from the same generator, expected outputs computed by running the
reference body on the host: it is our code, not the agent's).

Task ids are ``proc/<family>/L<level>/<seed>``. Splits are disjoint by construction: a task's
split is a hash of its *content* key (template + constants), not of its seed, and content keys
are de-duplicated, so no two ids of different splits (or of one split) pose the same function.
For each (family, level) the seeds are enumerated in order until every split has its quota.
"""

import hashlib
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

FAMILIES = ("arithmetic", "string", "list", "dict")
LEVELS = (1, 2, 3)
SPLIT_QUOTAS = {"train": 200, "dev": 10, "test": 20}  # per (family, level): 12 x these in total
N_TESTS = 4
# A content key lands in test with 9%, dev 5%, train 86% (about the quota ratios).
_SPLIT_BUCKETS = (("test", 9), ("dev", 14), ("train", 100))
_MAX_SEEDS = 20000

WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "pixel", "lemon", "quartz",
    "delta", "ember", "frost", "grape", "honey", "ivory", "jelly", "koala", "lunar", "mango",
    "noble", "olive", "pearl", "raven", "solar", "tulip", "umber", "vivid", "waltz", "zebra",
    "amber", "blaze", "cedar", "dune", "eagle", "fable", "glade", "harbor", "iris", "jade",
    "kite", "lark", "meadow", "nectar", "orbit", "prism", "quill", "ridge", "sage", "thorn",
)  # fmt: skip
KEYS = (
    "red", "blue", "green", "gold", "pink", "gray", "cyan", "teal", "lime", "navy",
    "apple", "pear", "plum", "kiwi", "fig", "date", "lime2", "melon", "berry", "peach",
    "north", "south", "east", "west", "alpha", "beta", "gamma", "omega", "zeta", "sigma",
    "cat", "dog", "owl", "fox", "bee", "ant", "elk", "yak", "emu", "eel",
)  # fmt: skip
SEPARATORS = ("-", "_", ", ", " ", "/", ":", "|", "+", "::", " and ", " & ", "->", ";", ".")


@dataclass(frozen=True)
class ProceduralSpec:
    """One generated function task (before it becomes an env ``Task``)."""

    task_id: str
    family: str
    level: int
    key: tuple  # content key: template name + constants
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


# inputs ------------------------------------------------------------------------------------
def _int(rng: random.Random, low: int = -50, high: int = 50) -> int:
    return rng.randint(low, high)


def _ints(rng: random.Random, low: int = -20, high: int = 30, min_len: int = 3) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(min_len, 7))]


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))


def _mapping(rng: random.Random, must_have: str | None = None) -> dict[str, int]:
    keys = rng.sample(KEYS, rng.randint(3, 5))
    if must_have is not None and must_have not in keys:
        keys[rng.randrange(len(keys))] = must_have
    return {key: rng.randint(-10, 40) for key in keys}


def _letters(rng: random.Random, low: int, high: int) -> str:
    return "".join(sorted(rng.sample(string.ascii_lowercase, rng.randint(low, high))))


# A template: rng -> (key, name, signature, description, body, make_args).
Template = Callable[[random.Random], tuple]


def _arith_l1(rng: random.Random) -> tuple:
    kind = rng.choice(("linear", "times_minus", "floordiv", "mod", "square_plus", "subtract"))
    one_int = lambda r: (_int(r),)  # noqa: E731
    if kind == "linear":
        a, b = rng.randint(2, 9), rng.randint(1, 20)
        return ((kind, a, b), "scale_and_shift", "(x: int) -> int",
                f"returns x multiplied by {a}, plus {b}", f"    return x * {a} + {b}", one_int)  # fmt: skip
    if kind == "times_minus":
        a = rng.randint(2, 30)
        return ((kind, a), "times_minus", "(x: int, y: int) -> int",
                f"returns {a} times x minus y", f"    return {a} * x - y",
                lambda r: (_int(r), _int(r)))  # fmt: skip
    if kind == "floordiv":
        a = rng.randint(2, 20)
        return ((kind, a), "floor_divide", "(x: int) -> int",
                f"returns x divided by {a}, rounded down (integer division)",
                f"    return x // {a}", one_int)  # fmt: skip
    if kind == "mod":
        a = rng.randint(2, 20)
        return ((kind, a), "remainder", "(x: int) -> int",
                f"returns the remainder of x divided by {a} (Python's % operator)",
                f"    return x % {a}", one_int)  # fmt: skip
    if kind == "square_plus":
        c = rng.randint(1, 50)
        return ((kind, c), "square_plus", "(x: int) -> int", f"returns x squared plus {c}",
                f"    return x * x + {c}", one_int)  # fmt: skip
    a = rng.randint(10, 200)
    return ((kind, a), "subtract_from", "(x: int) -> int", f"returns {a} minus x",
            f"    return {a} - x", one_int)  # fmt: skip


def _arith_l2(rng: random.Random) -> tuple:
    kind = rng.choice(("abs_diff", "max_times", "min_plus", "pow_mod", "round_div"))
    two_ints = lambda r: (_int(r), _int(r))  # noqa: E731
    if kind == "abs_diff":
        a = rng.randint(-30, 30)
        return ((kind, a), "distance_to", "(x: int) -> int",
                f"returns the absolute difference between x and {a}",
                f"    return abs(x - {a})", lambda r: (_int(r),))  # fmt: skip
    if kind == "max_times":
        a = rng.randint(2, 15)
        return ((kind, a), "max_times", "(x: int, y: int) -> int",
                f"returns the larger of x and y, multiplied by {a}",
                f"    return max(x, y) * {a}", two_ints)  # fmt: skip
    if kind == "min_plus":
        a = rng.randint(1, 30)
        return ((kind, a), "min_plus", "(x: int, y: int) -> int",
                f"returns the smaller of x and y, plus {a}", f"    return min(x, y) + {a}",
                two_ints)  # fmt: skip
    if kind == "pow_mod":
        a, m = rng.randint(2, 6), rng.randint(5, 50)
        return ((kind, a, m), "power_mod", "(x: int) -> int",
                f"returns x to the power {a}, modulo {m}", f"    return pow(x, {a}, {m})",
                lambda r: (_int(r, 0, 30),))  # fmt: skip
    a, d = rng.randint(2, 9), rng.randint(1, 3)
    return ((kind, a, d), "divide_rounded", "(x: int) -> float",
            f"returns x divided by {a}, rounded to {d} decimal places with round()",
            f"    return round(x / {a}, {d})", lambda r: (_int(r, -100, 100),))  # fmt: skip


def _arith_l3(rng: random.Random) -> tuple:
    kind = rng.choice(("sum_multiples", "count_divisible", "product_mod", "sum_squares_mod"))
    one_n = lambda r: (r.randint(1, 40),)  # noqa: E731
    if kind == "sum_multiples":
        k = rng.randint(2, 12)
        return ((kind, k), "sum_multiples", "(n: int) -> int",
                f"returns the sum of all multiples of {k} from 1 to n inclusive",
                f"    return sum(i for i in range(1, n + 1) if i % {k} == 0)", one_n)  # fmt: skip
    if kind == "count_divisible":
        a, b = sorted(rng.sample(range(2, 13), 2))
        return ((kind, a, b), "count_divisible", "(n: int) -> int",
                f"returns how many integers from 1 to n inclusive are divisible by {a} or by {b}",
                f"    return sum(1 for i in range(1, n + 1) if i % {a} == 0 or i % {b} == 0)",
                one_n)  # fmt: skip
    if kind == "product_mod":
        m = rng.randint(7, 1000)
        return ((kind, m), "product_mod", "(n: int) -> int",
                f"returns the product of the integers from 1 to n inclusive, modulo {m}",
                "    result = 1\n    for i in range(1, n + 1):\n        result *= i\n"
                f"    return result % {m}", lambda r: (r.randint(1, 15),))  # fmt: skip
    k = rng.randint(2, 6)
    r = rng.randint(0, k - 1)
    return ((kind, k, r), "sum_squares_mod", "(n: int) -> int",
            f"returns the sum of i * i for every i in range(n) whose remainder modulo {k} is {r}",
            f"    return sum(i * i for i in range(n) if i % {k} == {r})", one_n)  # fmt: skip


def _string_l1(rng: random.Random) -> tuple:
    kind = rng.choice(("suffix", "prefix", "repeat", "first_k", "last_k", "join"))
    one_word = lambda r: (_word(r),)  # noqa: E731
    if kind in ("suffix", "prefix"):
        word = rng.choice(("", "-", "_", "!")) + _word(rng)
        if kind == "suffix":
            return ((kind, word), "add_suffix", "(s: str) -> str",
                    f"returns s followed by the text {word!r}", f"    return s + {word!r}",
                    one_word)  # fmt: skip
        return ((kind, word), "add_prefix", "(s: str) -> str",
                f"returns the text {word!r} followed by s", f"    return {word!r} + s",
                one_word)  # fmt: skip
    if kind == "repeat":
        k = rng.randint(2, 6)
        return ((kind, k), "repeat_text", "(s: str) -> str", f"returns s repeated {k} times",
                f"    return s * {k}", one_word)  # fmt: skip
    if kind in ("first_k", "last_k"):
        k = rng.randint(1, 8)
        if kind == "first_k":
            return ((kind, k), "first_chars", "(s: str) -> str",
                    f"returns the first {k} characters of s (all of s if it is shorter)",
                    f"    return s[:{k}]", lambda r: (_sentence(r),))  # fmt: skip
        return ((kind, k), "last_chars", "(s: str) -> str",
                f"returns the last {k} characters of s (all of s if it is shorter)",
                f"    return s[-{k}:]", lambda r: (_sentence(r),))  # fmt: skip
    sep = rng.choice(SEPARATORS)
    return ((kind, sep), "join_two", "(a: str, b: str) -> str",
            f"returns a and b joined with {sep!r} between them", f"    return a + {sep!r} + b",
            lambda r: (_word(r), _word(r)))  # fmt: skip


def _string_l2(rng: random.Random) -> tuple:
    kind = rng.choice(("replace", "count", "startswith", "find", "center"))
    sentence = lambda r: (_sentence(r),)  # noqa: E731
    if kind == "replace":
        old, new = rng.sample(string.ascii_lowercase, 2)
        return ((kind, old, new), "replace_letter", "(s: str) -> str",
                f"returns s with every {old!r} replaced by {new!r}",
                f"    return s.replace({old!r}, {new!r})", sentence)  # fmt: skip
    if kind == "count":
        letter = rng.choice(string.ascii_lowercase)
        return ((kind, letter), "count_letter", "(s: str) -> int",
                f"returns how many times the letter {letter!r} occurs in s",
                f"    return s.count({letter!r})", sentence)  # fmt: skip
    if kind == "startswith":
        prefix = _word(rng)[: rng.randint(1, 3)]
        return ((kind, prefix), "starts_with", "(s: str) -> bool",
                f"returns True if s starts with {prefix!r}, else False",
                f"    return s.startswith({prefix!r})",
                lambda r: (rng_choice_prefixed(r, prefix),))  # fmt: skip
    if kind == "find":
        letter = rng.choice("aeioulnrst")
        return ((kind, letter), "find_letter", "(s: str) -> int",
                f"returns the index of the first {letter!r} in s, or -1 if there is none",
                f"    return s.find({letter!r})", sentence)  # fmt: skip
    width, fill = rng.randint(8, 20), rng.choice("*-=.#~")
    return ((kind, width, fill), "center_text", "(s: str) -> str",
            f"returns s centered in a string of width {width} padded with {fill!r} "
            f"(str.center)", f"    return s.center({width}, {fill!r})",
            lambda r: (_word(r),))  # fmt: skip


def rng_choice_prefixed(rng: random.Random, prefix: str) -> str:
    """A word that starts with ``prefix`` half of the time (so both answers get tested)."""
    return prefix + _word(rng) if rng.random() < 0.5 else _word(rng)


def _string_l3(rng: random.Random) -> tuple:
    kind = rng.choice(("count_in", "remove_in", "long_words", "caesar", "positions"))
    sentence = lambda r: (_sentence(r),)  # noqa: E731
    if kind == "count_in":
        letters = _letters(rng, 3, 5)
        return ((kind, letters), "count_chars_in", "(s: str) -> int",
                f"returns how many characters of s are one of the letters {letters!r}",
                f"    return sum(1 for c in s if c in {letters!r})", sentence)  # fmt: skip
    if kind == "remove_in":
        letters = _letters(rng, 2, 4)
        return ((kind, letters), "remove_chars", "(s: str) -> str",
                f"returns s without any of the letters {letters!r}",
                f"    return ''.join(c for c in s if c not in {letters!r})", sentence)  # fmt: skip
    if kind == "long_words":
        k = rng.randint(2, 6)
        return ((kind, k), "count_long_words", "(s: str) -> int",
                f"returns how many space-separated words of s are longer than {k} characters",
                f"    return sum(1 for w in s.split() if len(w) > {k})", sentence)  # fmt: skip
    if kind == "caesar":
        k = rng.randint(1, 25)
        return ((kind, k), "shift_letters", "(s: str) -> str",
                f"returns s with every lowercase letter shifted {k} places forward in the "
                "alphabet, wrapping from 'z' to 'a' (other characters unchanged)",
                "    return ''.join(chr((ord(c) - 97 + "
                f"{k}) % 26 + 97) if c.islower() else c for c in s)", sentence)  # fmt: skip
    letter = rng.choice("aeioulnrst")
    return ((kind, letter), "letter_positions", "(s: str) -> list[int]",
            f"returns the list of indices at which the letter {letter!r} occurs in s",
            f"    return [i for i, c in enumerate(s) if c == {letter!r}]", sentence)  # fmt: skip


def _list_l1(rng: random.Random) -> tuple:
    kind = rng.choice(("first_plus", "last_times", "append", "prepend", "length_times", "pair"))
    one_list = lambda r: (_ints(r),)  # noqa: E731
    if kind == "first_plus":
        k = rng.randint(1, 50)
        return ((kind, k), "first_plus", "(xs: list[int]) -> int",
                f"returns the first element of xs plus {k}", f"    return xs[0] + {k}",
                one_list)  # fmt: skip
    if kind == "last_times":
        k = rng.randint(2, 20)
        return ((kind, k), "last_times", "(xs: list[int]) -> int",
                f"returns the last element of xs multiplied by {k}", f"    return xs[-1] * {k}",
                one_list)  # fmt: skip
    if kind in ("append", "prepend"):
        k = rng.randint(-50, 100)
        if kind == "append":
            return ((kind, k), "append_value", "(xs: list[int]) -> list[int]",
                    f"returns a new list: the elements of xs followed by {k}",
                    f"    return xs + [{k}]", one_list)  # fmt: skip
        return ((kind, k), "prepend_value", "(xs: list[int]) -> list[int]",
                f"returns a new list: {k} followed by the elements of xs",
                f"    return [{k}] + xs", one_list)  # fmt: skip
    if kind == "length_times":
        k = rng.randint(2, 20)
        return ((kind, k), "length_times", "(xs: list[int]) -> int",
                f"returns the number of elements of xs multiplied by {k}",
                f"    return len(xs) * {k}", one_list)  # fmt: skip
    i, j = sorted(rng.sample(range(3), 2))
    return ((kind, i, j), "pair_sum", "(xs: list[int]) -> int",
            f"returns the element at index {i} of xs plus the element at index {j}",
            f"    return xs[{i}] + xs[{j}]", one_list)  # fmt: skip


def _list_l2(rng: random.Random) -> tuple:
    kind = rng.choice(("max_plus", "min_minus", "sum_plus", "sum_times", "count", "sorted"))
    one_list = lambda r: (_ints(r),)  # noqa: E731
    if kind == "max_plus":
        k = rng.randint(1, 100)
        return ((kind, k), "max_plus", "(xs: list[int]) -> int",
                f"returns the largest element of xs plus {k}", f"    return max(xs) + {k}",
                one_list)  # fmt: skip
    if kind == "min_minus":
        k = rng.randint(1, 100)
        return ((kind, k), "min_minus", "(xs: list[int]) -> int",
                f"returns the smallest element of xs minus {k}", f"    return min(xs) - {k}",
                one_list)  # fmt: skip
    if kind == "sum_plus":
        k = rng.randint(1, 100)
        return ((kind, k), "sum_plus", "(xs: list[int]) -> int",
                f"returns the sum of the elements of xs plus {k}", f"    return sum(xs) + {k}",
                one_list)  # fmt: skip
    if kind == "sum_times":
        k = rng.randint(2, 12)
        return ((kind, k), "sum_times", "(xs: list[int]) -> int",
                f"returns the sum of the elements of xs multiplied by {k}",
                f"    return sum(xs) * {k}", one_list)  # fmt: skip
    if kind == "count":
        k = rng.randint(-5, 20)
        return ((kind, k), "count_value", "(xs: list[int]) -> int",
                f"returns how many elements of xs are equal to {k}",
                f"    return xs.count({k})", lambda r: (_ints(r, k - 2, k + 2),))  # fmt: skip
    reverse = rng.random() < 0.5
    order = "decreasing" if reverse else "increasing"
    return ((kind, reverse), f"sort_{order}", "(xs: list[int]) -> list[int]",
            f"returns a new list with the elements of xs in {order} order",
            f"    return sorted(xs{', reverse=True' if reverse else ''})", one_list)  # fmt: skip


def _list_l3(rng: random.Random) -> tuple:
    kind = rng.choice(("filter_scale", "sum_greater", "count_between", "diffs", "clip"))
    one_list = lambda r: (_ints(r),)  # noqa: E731
    if kind == "filter_scale":
        k, m = rng.randint(2, 9), rng.randint(2, 5)
        return ((kind, k, m), "scale_multiples", "(xs: list[int]) -> list[int]",
                f"returns the elements of xs that are divisible by {m}, each multiplied by {k}, "
                "in their original order",
                f"    return [x * {k} for x in xs if x % {m} == 0]", one_list)  # fmt: skip
    if kind == "sum_greater":
        k = rng.randint(-10, 30)
        return ((kind, k), "sum_greater", "(xs: list[int]) -> int",
                f"returns the sum of the elements of xs that are greater than {k}",
                f"    return sum(x for x in xs if x > {k})", one_list)  # fmt: skip
    if kind == "count_between":
        low = rng.randint(-10, 20)
        high = low + rng.randint(3, 20)
        return ((kind, low, high), "count_between", "(xs: list[int]) -> int",
                f"returns how many elements of xs lie between {low} and {high} inclusive",
                f"    return sum(1 for x in xs if {low} <= x <= {high})", one_list)  # fmt: skip
    if kind == "diffs":
        k = rng.randint(1, 9)
        scaled = "" if k == 1 else f", multiplied by {k}"
        return ((kind, k), "neighbour_differences", "(xs: list[int]) -> list[int]",
                "returns the list of differences xs[i + 1] - xs[i] between neighbours"
                + scaled, f"    return [(b - a) * {k} for a, b in zip(xs, xs[1:])]",
                one_list)  # fmt: skip
    k = rng.randint(0, 30)
    if rng.random() < 0.5:
        return ((kind, "max", k), "cap_values", "(xs: list[int]) -> list[int]",
                f"returns xs with every element greater than {k} replaced by {k}",
                f"    return [min(x, {k}) for x in xs]", one_list)  # fmt: skip
    return ((kind, "min", k), "floor_values", "(xs: list[int]) -> list[int]",
            f"returns xs with every element smaller than {k} replaced by {k}",
            f"    return [max(x, {k}) for x in xs]", one_list)  # fmt: skip


def _dict_l1(rng: random.Random) -> tuple:
    kind = rng.choice(("value_plus", "get_default", "set_key"))
    key = rng.choice(KEYS)
    if kind == "value_plus":
        k = rng.randint(1, 20)
        return ((kind, key, k), "value_plus", "(d: dict[str, int]) -> int",
                f"returns the value stored under the key {key!r} in d, plus {k}",
                f"    return d[{key!r}] + {k}", lambda r: (_mapping(r, key),))  # fmt: skip
    if kind == "get_default":
        default = rng.randint(-5, 20)
        return ((kind, key, default), "value_or_default", "(d: dict[str, int]) -> int",
                f"returns the value stored under the key {key!r} in d, or {default} if the key "
                "is missing", f"    return d.get({key!r}, {default})",
                lambda r: (_mapping(r, key if r.random() < 0.5 else None),))  # fmt: skip
    value = rng.randint(-5, 50)
    return ((kind, key, value), "with_key", "(d: dict[str, int]) -> dict[str, int]",
            f"returns a new dict: a copy of d in which the key {key!r} maps to {value}",
            f"    return {{**d, {key!r}: {value}}}", lambda r: (_mapping(r),))  # fmt: skip


def _dict_l2(rng: random.Random) -> tuple:
    kind = rng.choice(("size_plus", "sum_plus", "max_minus", "has_key", "sorted_keys"))
    one_map = lambda r: (_mapping(r),)  # noqa: E731
    if kind == "size_plus":
        k = rng.randint(1, 60)
        return ((kind, k), "size_plus", "(d: dict[str, int]) -> int",
                f"returns the number of keys in d plus {k}", f"    return len(d) + {k}",
                one_map)  # fmt: skip
    if kind == "sum_plus":
        k = rng.randint(1, 150)
        return ((kind, k), "values_sum_plus", "(d: dict[str, int]) -> int",
                f"returns the sum of the values of d plus {k}",
                f"    return sum(d.values()) + {k}", one_map)  # fmt: skip
    if kind == "max_minus":
        k = rng.randint(1, 80)
        return ((kind, k), "max_value_minus", "(d: dict[str, int]) -> int",
                f"returns the largest value in d minus {k}", f"    return max(d.values()) - {k}",
                one_map)  # fmt: skip
    if kind == "has_key":
        key = rng.choice(KEYS)
        return ((kind, key), "has_key", "(d: dict[str, int]) -> bool",
                f"returns True if {key!r} is a key of d, else False", f"    return {key!r} in d",
                lambda r: (_mapping(r, key if r.random() < 0.5 else None),))  # fmt: skip
    reverse = rng.random() < 0.5
    order = "reverse alphabetical" if reverse else "alphabetical"
    return ((kind, reverse), "sorted_keys", "(d: dict[str, int]) -> list[str]",
            f"returns the keys of d as a list in {order} order",
            f"    return sorted(d{', reverse=True' if reverse else ''})", one_map)  # fmt: skip


def _dict_l3(rng: random.Random) -> tuple:
    kind = rng.choice(("keys_above", "scale", "add", "keys_between", "count_words"))
    one_map = lambda r: (_mapping(r),)  # noqa: E731
    if kind == "keys_above":
        t = rng.randint(-5, 30)
        return ((kind, t), "keys_above", "(d: dict[str, int]) -> list[str]",
                f"returns the keys of d whose value is greater than {t}, sorted alphabetically",
                f"    return sorted(k for k, v in d.items() if v > {t})", one_map)  # fmt: skip
    if kind == "scale":
        m = rng.randint(2, 12)
        return ((kind, m), "scale_values", "(d: dict[str, int]) -> dict[str, int]",
                f"returns a new dict with the same keys and every value multiplied by {m}",
                f"    return {{k: v * {m} for k, v in d.items()}}", one_map)  # fmt: skip
    if kind == "add":
        m = rng.randint(1, 50)
        return ((kind, m), "add_to_values", "(d: dict[str, int]) -> dict[str, int]",
                f"returns a new dict with the same keys and {m} added to every value",
                f"    return {{k: v + {m} for k, v in d.items()}}", one_map)  # fmt: skip
    if kind == "keys_between":
        low = rng.randint(-10, 20)
        high = low + rng.randint(3, 20)
        return ((kind, low, high), "keys_between", "(d: dict[str, int]) -> list[str]",
                f"returns the keys of d whose value lies between {low} and {high} inclusive, "
                "sorted alphabetically",
                f"    return sorted(k for k, v in d.items() if {low} <= v <= {high})",
                one_map)  # fmt: skip
    n = rng.randint(0, 5)
    longer = "" if n == 0 else f" longer than {n} characters"
    return ((kind, n), "count_words", "(words: list[str]) -> dict[str, int]",
            f"returns a dict mapping each word of the list words{longer} to the number of "
            "times it occurs", "    counts = {}\n    for w in words:\n"
            f"        if len(w) > {n}:\n            counts[w] = counts.get(w, 0) + 1\n"
            "    return counts",
            lambda r: ([r.choice(WORDS[:8]) for _ in range(r.randint(3, 8))],))  # fmt: skip


TEMPLATES: dict[tuple[str, int], Template] = {
    ("arithmetic", 1): _arith_l1, ("arithmetic", 2): _arith_l2, ("arithmetic", 3): _arith_l3,
    ("string", 1): _string_l1, ("string", 2): _string_l2, ("string", 3): _string_l3,
    ("list", 1): _list_l1, ("list", 2): _list_l2, ("list", 3): _list_l3,
    ("dict", 1): _dict_l1, ("dict", 2): _dict_l2, ("dict", 3): _dict_l3,
}  # fmt: skip


def split_of(key: tuple) -> str:
    """The split of a content key: a stable hash, so it never depends on the seed."""
    bucket = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16) % 100
    return next(split for split, bound in _SPLIT_BUCKETS if bucket < bound)


def generate(family: str, level: int, seed: int) -> ProceduralSpec:
    """The task of (family, level, seed): pure and deterministic (its own seeded generator)."""
    if (family, level) not in TEMPLATES:
        raise ValueError(f"no procedural template for family={family!r} level={level!r}; "
                         f"families are {FAMILIES}, levels {LEVELS}")  # fmt: skip
    rng = random.Random(f"eprl-procedural/{family}/{level}/{seed}")
    key, name, signature, description, body, make_args = TEMPLATES[family, level](rng)
    seen: set[str] = set()
    inputs: list[tuple] = []
    for _ in range(200):  # distinct inputs: one example plus the hidden tests
        args = make_args(rng)
        if repr(args) not in seen:
            seen.add(repr(args))
            inputs.append(args)
            if len(inputs) == N_TESTS + 1:
                break
    return ProceduralSpec(
        task_id=f"proc/{family}/L{level}/{seed}", family=family, level=level, key=(family, *key),
        name=name, signature=signature, description=description, body=body,
        example_args=inputs[0], test_args=tuple(inputs[1:]),
    )  # fmt: skip


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
                rng = random.Random(f"eprl-procedural/{family}/{level}/{seed}")
                key = (family, *TEMPLATES[family, level](rng)[0])
                split = split_of(key)
                if key in taken or counts[split] >= SPLIT_QUOTAS[split]:
                    continue
                taken.add(key)
                counts[split] += 1
                ids[split].append(f"proc/{family}/L{level}/{seed}")
                if counts == SPLIT_QUOTAS:
                    break
            else:
                raise RuntimeError(f"procedural family {family} L{level} has too few distinct "
                                   f"tasks for the quotas {SPLIT_QUOTAS}: got {counts}")  # fmt: skip
    return {split: tuple(task_ids) for split, task_ids in ids.items()}


@cache
def split_by_id() -> dict[str, str]:
    return {task_id: split for split, ids in catalogue_ids().items() for task_id in ids}
