"""Text helpers shared by every eprl environment (kept small and stable: other envs import them).

- ``TEXT_CHARSET`` / ``text_space``: the Gymnasium ``Text`` space of observations and actions
  (every printable ASCII character plus newline, tab and the other ASCII whitespace; empty text
  allowed).
- ``to_charset``: makes any string fit that charset (non-ASCII and control characters become
  Python-style backslash escapes, e.g. ``é`` -> ``\\xe9``), so observations lie in the space.
- ``truncate_text``: cuts text to a character budget with a visible marker.
- ``extract_code_block`` / ``has_code_fence``: the agent protocol, the first fenced code block.
"""

import re
import string

from gymnasium.spaces import Text

# string.printable = digits + letters + punctuation + " \t\n\r\x0b\x0c"
TEXT_CHARSET: frozenset[str] = frozenset(string.printable)

_OUTSIDE_CHARSET = re.compile(r"[^\x20-\x7e\t\n\r\x0b\x0c]")

# An opening fence: ``` optionally followed by a language tag, at the start of a line.
_FENCE_OPEN = re.compile(r"(?:^|\n)[ \t]*```[ \t]*([A-Za-z0-9_+\-.]*)[ \t]*\n")
_FENCE_CLOSE = re.compile(r"\n[ \t]*```")


def text_space(max_length: int) -> Text:
    """The Text space of eprl observations and actions: printable ASCII, 0..max_length chars."""
    return Text(max_length=max_length, min_length=0, charset=TEXT_CHARSET)


def to_charset(text: str) -> str:
    """Return ``text`` with every character outside ``TEXT_CHARSET`` backslash-escaped.

    The escapes are Python's (``\\x00``, ``\\xe9``, ``\\u2264``, ``\\U0001f600``), so code output
    reads as a Python programmer expects.
    """
    if not _OUTSIDE_CHARSET.search(text):
        return text
    return _OUTSIDE_CHARSET.sub(_escape, text)


def _escape(match: re.Match) -> str:
    code_point = ord(match.group(0))
    if code_point < 0x100:
        return f"\\x{code_point:02x}"
    return f"\\u{code_point:04x}" if code_point < 0x10000 else f"\\U{code_point:08x}"


def truncate_text(text: str, max_chars: int, what: str = "characters") -> str:
    """Cut ``text`` to at most ``max_chars`` characters, ending with a marker saying how much went.

    The marker reads ``[... N more characters truncated]`` (``what`` names the unit in the
    message). Text that fits is returned unchanged.
    """
    if len(text) <= max_chars:
        return text
    keep = max_chars
    while True:  # the marker's length depends on the count it prints; keep only shrinks
        marker = f"\n[... {len(text) - keep} more {what} truncated]"
        shorter = max(max_chars - len(marker), 0)
        if shorter == keep:
            break
        keep = shorter
    return (text[:keep] + marker)[:max_chars]


def has_code_fence(action: str) -> bool:
    """Whether ``action`` opens a fenced code block (```` ``` ```` at the start of a line)."""
    return _FENCE_OPEN.search(action) is not None


def extract_code_block(action: str) -> str | None:
    """The code of the first fenced block of ``action``, or None when it has no fence.

    Accepts ```` ```python ````, ```` ```py ```` and a bare ```` ``` ```` opening. A block left
    unclosed at the end of the action counts (the rollout runner may stop generation at the
    closing fence and drop it). Blocks tagged with another language are skipped.
    """
    position = 0
    while True:
        opening = _FENCE_OPEN.search(action, position)
        if opening is None:
            return None
        language = opening.group(1).lower()
        closing = _FENCE_CLOSE.search(action, opening.end() - 1)
        end = closing.start() if closing else len(action)
        if language in ("", "python", "py", "python3"):
            return action[opening.end() : end]
        if closing is None:
            return None
        position = closing.end()
