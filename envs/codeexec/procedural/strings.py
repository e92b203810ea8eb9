"""The string family: L1 concatenation or slicing, L2 one str method, L3 a loop over characters."""

import random
import string

from envs.codeexec.procedural.shape import (
    SEPARATORS,
    Constants,
    Shape,
    draw_letters,
    draw_word,
    one_sentence,
    one_word,
)


def _maybe_prefixed(rng: random.Random, constants: Constants) -> tuple:
    """A word that starts with the prefix half of the time (so both answers get tested)."""
    prefix = constants["prefix"]
    return (prefix + draw_word(rng) if rng.random() < 0.5 else draw_word(rng),)


def _affix(rng: random.Random) -> Constants:
    return {"word": rng.choice(("", "-", "_", "!")) + draw_word(rng)}


LEVELS: dict[int, tuple[Shape, ...]] = {
    1: (
        Shape(
            "suffix",
            _affix,
            "add_suffix",
            "(s: str) -> str",
            "returns s followed by the text {word!r}",
            "    return s + {word!r}",
            one_word,
        ),
        Shape(
            "prefix",
            _affix,
            "add_prefix",
            "(s: str) -> str",
            "returns the text {word!r} followed by s",
            "    return {word!r} + s",
            one_word,
        ),
        Shape(
            "repeat",
            lambda rng: {"k": rng.randint(2, 6)},
            "repeat_text",
            "(s: str) -> str",
            "returns s repeated {k} times",
            "    return s * {k}",
            one_word,
        ),
        Shape(
            "first_k",
            lambda rng: {"k": rng.randint(1, 8)},
            "first_chars",
            "(s: str) -> str",
            "returns the first {k} characters of s (all of s if it is shorter)",
            "    return s[:{k}]",
            one_sentence,
        ),
        Shape(
            "last_k",
            lambda rng: {"k": rng.randint(1, 8)},
            "last_chars",
            "(s: str) -> str",
            "returns the last {k} characters of s (all of s if it is shorter)",
            "    return s[-{k}:]",
            one_sentence,
        ),
        Shape(
            "join",
            lambda rng: {"sep": rng.choice(SEPARATORS)},
            "join_two",
            "(a: str, b: str) -> str",
            "returns a and b joined with {sep!r} between them",
            "    return a + {sep!r} + b",
            lambda rng, constants: (draw_word(rng), draw_word(rng)),
        ),
    ),
    2: (
        Shape(
            "replace",
            lambda rng: dict(
                zip(("old", "new"), rng.sample(string.ascii_lowercase, 2), strict=True)
            ),
            "replace_letter",
            "(s: str) -> str",
            "returns s with every {old!r} replaced by {new!r}",
            "    return s.replace({old!r}, {new!r})",
            one_sentence,
        ),
        Shape(
            "count",
            lambda rng: {"letter": rng.choice(string.ascii_lowercase)},
            "count_letter",
            "(s: str) -> int",
            "returns how many times the letter {letter!r} occurs in s",
            "    return s.count({letter!r})",
            one_sentence,
        ),
        Shape(
            "startswith",
            lambda rng: {"prefix": draw_word(rng)[: rng.randint(1, 3)]},
            "starts_with",
            "(s: str) -> bool",
            "returns True if s starts with {prefix!r}, else False",
            "    return s.startswith({prefix!r})",
            _maybe_prefixed,
        ),
        Shape(
            "find",
            lambda rng: {"letter": rng.choice("aeioulnrst")},
            "find_letter",
            "(s: str) -> int",
            "returns the index of the first {letter!r} in s, or -1 if there is none",
            "    return s.find({letter!r})",
            one_sentence,
        ),
        Shape(
            "center",
            lambda rng: {"width": rng.randint(8, 20), "fill": rng.choice("*-=.#~")},
            "center_text",
            "(s: str) -> str",
            "returns s centered in a string of width {width} padded with {fill!r} (str.center)",
            "    return s.center({width}, {fill!r})",
            one_word,
        ),
    ),
    3: (
        Shape(
            "count_in",
            lambda rng: {"letters": draw_letters(rng, 3, 5)},
            "count_chars_in",
            "(s: str) -> int",
            "returns how many characters of s are one of the letters {letters!r}",
            "    return sum(1 for c in s if c in {letters!r})",
            one_sentence,
        ),
        Shape(
            "remove_in",
            lambda rng: {"letters": draw_letters(rng, 2, 4)},
            "remove_chars",
            "(s: str) -> str",
            "returns s without any of the letters {letters!r}",
            "    return ''.join(c for c in s if c not in {letters!r})",
            one_sentence,
        ),
        Shape(
            "long_words",
            lambda rng: {"k": rng.randint(2, 6)},
            "count_long_words",
            "(s: str) -> int",
            "returns how many space-separated words of s are longer than {k} characters",
            "    return sum(1 for w in s.split() if len(w) > {k})",
            one_sentence,
        ),
        Shape(
            "caesar",
            lambda rng: {"k": rng.randint(1, 25)},
            "shift_letters",
            "(s: str) -> str",
            "returns s with every lowercase letter shifted {k} places forward in the alphabet, "
            "wrapping from 'z' to 'a' (other characters unchanged)",
            "    return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if c.islower() else c for c in s)",
            one_sentence,
        ),
        Shape(
            "positions",
            lambda rng: {"letter": rng.choice("aeioulnrst")},
            "letter_positions",
            "(s: str) -> list[int]",
            "returns the list of indices at which the letter {letter!r} occurs in s",
            "    return [i for i, c in enumerate(s) if c == {letter!r}]",
            one_sentence,
        ),
    ),
}
