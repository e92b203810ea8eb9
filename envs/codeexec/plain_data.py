"""Plain data across the sandbox boundary: the codec, and the two helpers that run beside it.

HumanEval grading keeps the submission and the grader in different interpreters (see
``humaneval.py``); what crosses between them is JSON text that decodes to builtin values only.
``encode`` accepts exactly ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``list``,
``tuple``, ``dict``, ``set`` and ``frozenset`` (``type(value) is ...``: a subclass, whose
``__eq__`` could say anything, is refused); ``decode`` accepts only what ``encode`` writes and
raises ``NotPlainData`` for anything else. JSON arrays are lists; other types are one-key
objects (``{"f": "1.5"}`` a float written with ``repr``, so ``nan`` and ``inf`` survive; ``{"t":
[...]}`` a tuple; ``{"d": [[key, value], ...]}`` a dict).

This file is also exec'd, as source, in a namespace of its own inside sandboxes, where
``run_calls`` computes a submission's outputs and ``Replay`` feeds recorded outputs to a check:
standard library only, no syntax newer than Python 3.8.
"""

import json
import random

MAX_DEPTH = 100


class NotPlainData(TypeError):
    """A value, or a piece of JSON text, that is not one of the plain types."""


def _is_scalar(value, depth):
    """Whether ``value`` is JSON as it is (None, and exactly bool, int or str)."""
    if depth > MAX_DEPTH:
        raise NotPlainData(f"nested deeper than {MAX_DEPTH} levels")
    return value is None or type(value) in (bool, int, str)


def encode(value, depth=0):
    """``value`` as a JSON-ready structure; NotPlainData names the first foreign type."""
    if _is_scalar(value, depth):
        return value
    kind = type(value)
    if kind is float:
        return {"f": repr(value)}
    if kind is bytes:
        return {"b": value.hex()}
    if kind is list:
        return [encode(item, depth + 1) for item in value]
    if kind is tuple:
        return {"t": [encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        tag = "s" if kind is set else "fs"
        return {tag: [encode(item, depth + 1) for item in value]}
    raise NotPlainData(f"a {kind.__module__}.{kind.__qualname__} is not plain data")


def decode(node, depth=0):
    """The value that ``encode`` turned into ``node``; NotPlainData for any other structure."""
    if _is_scalar(node, depth):
        return node
    kind = type(node)
    if kind is list:
        return [decode(item, depth + 1) for item in node]
    if kind is not dict or len(node) != 1:
        raise NotPlainData(f"unexpected {kind.__name__} in plain-data JSON: {node!r:.80}")
    ((tag, body),) = node.items()
    try:
        if tag == "f" and type(body) is str:
            return float(body)
        if tag == "b" and type(body) is str:
            return bytes.fromhex(body)
        if type(body) is not list:
            raise NotPlainData(f"tag {tag!r} needs a list, got {type(body).__name__}")
        if tag == "t":
            return tuple(decode(item, depth + 1) for item in body)
        if tag == "s" or tag == "fs":
            items = (decode(item, depth + 1) for item in body)
            return set(items) if tag == "s" else frozenset(items)
        if tag == "d" and all(type(pair) is list and len(pair) == 2 for pair in body):
            return {decode(k, depth + 1): decode(v, depth + 1) for k, v in body}
    except (ValueError, TypeError) as error:  # a bad float or hex string, an unhashable key
        if isinstance(error, NotPlainData):
            raise
        raise NotPlainData(f"malformed {tag!r} node: {error}") from None
    raise NotPlainData(f"unknown plain-data node {node!r:.80}")


def dumps(value):
    """``value`` as plain-data JSON text."""
    return json.dumps(encode(value), separators=(",", ":"))


def loads(text):
    """The value of plain-data JSON ``text``; NotPlainData when it is anything else."""
    if type(text) is not str:
        raise NotPlainData(f"plain-data text must be a str, got {type(text).__name__}")
    try:
        node = json.loads(text, parse_float=_refuse_float, parse_constant=_refuse_float)
    except (ValueError, RecursionError) as error:
        raise NotPlainData(f"not JSON: {error}") from None
    return decode(node)


def _refuse_float(text):
    raise NotPlainData(f"bare JSON number {text!r}: floats are written as {{'f': repr}}")


def run_calls(function, calls_text):
    """Call ``function`` on each recorded ``[args, kwargs]``; the outcomes as plain-data text.

    Each outcome is ``["ok", value]``, ``["raised", "ExceptionName"]`` or ``["refused", why]``
    (the value is not plain data). Runs in the submission's sandbox: whatever it returns is
    only a claim about outputs, checked elsewhere.
    """
    outcomes = []
    for args, kwargs in loads(calls_text):
        try:
            value = function(*args, **kwargs)
        except BaseException as error:  # SystemExit too: the call failed, the cell goes on
            outcomes.append(["raised", type(error).__name__])
            continue
        try:
            outcomes.append(["ok", encode(value)])
        except (NotPlainData, RecursionError) as error:
            outcomes.append(["refused", str(error)])
    return json.dumps(outcomes, separators=(",", ":"))


class Replay:
    """The ``candidate`` a check calls in the grader's sandbox: answers from recorded outcomes.

    ``load`` gives it one test's calls (the arguments of the reference run) and the
    submission's outcomes for them, and seeds ``random`` so the check draws the same inputs as
    in the reference run. A call whose arguments differ from the recorded ones has no recorded
    outcome and raises.
    """

    def __init__(self):
        self.pending = []

    def load(self, calls_text, outcomes_text, seed):
        calls = json.loads(calls_text)
        self.pending = list(zip(calls, json.loads(outcomes_text)))  # noqa: B905 (3.8: no strict)
        random.seed(seed)

    def __call__(self, *args, **kwargs):
        if not self.pending:
            raise AssertionError("candidate called more often than in the reference run")
        expected_call, (status, payload) = self.pending.pop(0)
        if [encode(list(args)), encode(kwargs)] != expected_call:
            raise AssertionError("candidate called with other arguments than in the reference run")
        if status == "ok":
            return decode(payload)
        if status == "raised":
            raise RuntimeError(f"the submission raised {payload}")
        raise TypeError(f"the submission's result was refused: {payload}")


class Recorder:
    """The ``candidate`` of the reference run: calls the canonical solution, records arguments.

    It is also bound to the entry point's own name (some checks call the function by name);
    calls the canonical solution makes to itself, through that name, are not recorded.
    """

    def __init__(self, function):
        self.function = function
        self.calls = []
        self.depth = 0

    def begin(self, seed):
        self.calls = []
        random.seed(seed)

    def __call__(self, *args, **kwargs):
        if self.depth == 0:
            self.calls.append([encode(list(args)), encode(kwargs)])
        self.depth += 1
        try:
            return self.function(*args, **kwargs)
        finally:
            self.depth -= 1

    def take(self):
        return json.dumps(self.calls, separators=(",", ":"))
