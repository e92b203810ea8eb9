"""One row of the procedural task table (a ``Shape``) and the vocabulary its rows draw from.

A shape is one kind of function a (family, level) poses. ``draw(rng)`` returns its constants as a
dict, in the order they are drawn; the text fields are ``str.format`` templates over them (``{k}``,
``{word!r}``); ``inputs(rng, constants)`` draws the arguments of one call (the example and each
hidden test). The content key that decides the split is ``(family, kind, *constants)``, or only
the constants named in ``key_fields`` when a shape also draws wording that is not content.
"""

import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

Constants = dict[str, Any]


@dataclass(frozen=True)
class Shape:
    """One kind of function task; see the module docstring for what each field means."""

    kind: str
    draw: Callable[[random.Random], Constants]
    name: str
    signature: str
    description: str  # completes "Write a function `name(...)` that ..."
    body: str  # the reference body, indented by 4 spaces
    inputs: Callable[[random.Random, Constants], tuple]
    key_fields: tuple[str, ...] | None = None

    def key(self, family: str, constants: Constants) -> tuple:
        """The content key: equal keys pose the same function, so they share one id and split."""
        names = self.key_fields if self.key_fields is not None else tuple(constants)
        return (family, self.kind, *(constants[name] for name in names))

    def text(self, constants: Constants) -> tuple[str, str, str, str]:
        """(name, signature, description, body) with the constants filled in."""
        return tuple(
            field.format(**constants)
            for field in (self.name, self.signature, self.description, self.body)
        )


# inputs ------------------------------------------------------------------------------------
def draw_int(rng: random.Random, low: int = -50, high: int = 50) -> int:
    return rng.randint(low, high)


def draw_ints(rng: random.Random, low: int = -20, high: int = 30, min_len: int = 3) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(min_len, 7))]


def draw_word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def draw_sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))


def draw_mapping(rng: random.Random, must_have: str | None = None) -> dict[str, int]:
    keys = rng.sample(KEYS, rng.randint(3, 5))
    if must_have is not None and must_have not in keys:
        keys[rng.randrange(len(keys))] = must_have
    return {key: rng.randint(-10, 40) for key in keys}


def draw_letters(rng: random.Random, low: int, high: int) -> str:
    return "".join(sorted(rng.sample(string.ascii_lowercase, rng.randint(low, high))))


def one_int(rng: random.Random, constants: Constants) -> tuple:
    return (draw_int(rng),)


def two_ints(rng: random.Random, constants: Constants) -> tuple:
    return (draw_int(rng), draw_int(rng))


def one_word(rng: random.Random, constants: Constants) -> tuple:
    return (draw_word(rng),)


def one_sentence(rng: random.Random, constants: Constants) -> tuple:
    return (draw_sentence(rng),)


def one_list(rng: random.Random, constants: Constants) -> tuple:
    return (draw_ints(rng),)


def one_mapping(rng: random.Random, constants: Constants) -> tuple:
    return (draw_mapping(rng),)


# constants drawn together ------------------------------------------------------------------
def sorted_pair(rng: random.Random, names: tuple[str, str], population: range) -> Constants:
    """Two distinct values of ``population``, the smaller first."""
    return dict(zip(names, sorted(rng.sample(population, 2)), strict=True))


def bounds(rng: random.Random) -> Constants:
    """An inclusive range ``low..high`` at least 3 wide."""
    low = rng.randint(-10, 20)
    return {"low": low, "high": low + rng.randint(3, 20)}


def direction(rng: random.Random, ascending: str, descending: str) -> Constants:
    """A coin for the sort order, with its words and the ``sorted`` argument that says it."""
    reverse = rng.random() < 0.5
    return {
        "reverse": reverse,
        "order": descending if reverse else ascending,
        "reverse_arg": ", reverse=True" if reverse else "",
    }
