"""The bearer tokens the service accepts: one from the settings and any number from a file.

A tokens file gives each trainer its own token, so one can be revoked without touching the
others::

    # NAME TOKEN   (or just TOKEN; '#' starts a comment)
    trainer-a  3q2-Yk...
    trainer-b  Zt9_0c...

:meth:`TokenStore.reload` re-reads the file (``eprl serve`` calls it on SIGHUP); a file that does
not parse leaves the tokens in force unchanged, so a typo never locks every trainer out. Only
SHA-256 digests are kept, every comparison is ``hmac.compare_digest`` over all of them (no early
exit: the time does not tell which token matched, how much of one, or how many there are), and
no message ever quotes a token: errors name the file and the line number.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import threading
from pathlib import Path

from serving.settings import token_problem

log = logging.getLogger("eprl.serving")


class TokenFileError(ValueError):
    """The tokens file is missing or malformed; the message names the file and the line."""


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def read_tokens_file(path: Path) -> list[tuple[str, bytes]]:
    """(name, digest) of every token in ``path``; names default to ``line-N``."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the tokens file {str(path)!r}: {exc}") from None
    entries: list[tuple[str, bytes]] = []
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise TokenFileError(
                f"{path}:{number}: expected 'NAME TOKEN' or 'TOKEN', got {len(fields)} fields"
            )
        name, token = (fields[0], fields[1]) if len(fields) == 2 else (f"line-{number}", fields[0])
        problem = token_problem(token)
        if problem:
            raise TokenFileError(f"{path}:{number}: the token of {name!r} {problem}")
        if name in names:
            raise TokenFileError(f"{path}:{number}: the name {name!r} is used twice")
        names.add(name)
        entries.append((name, _digest(token.encode("ascii"))))
    if not entries:
        raise TokenFileError(f"the tokens file {str(path)!r} holds no token")
    return entries


class TokenStore:
    """The accepted tokens (as digests). Safe to read from the event loop while a reload runs."""

    def __init__(self, token: str | None = None, path: Path | None = None) -> None:
        self.path = path
        self._static = [("token", _digest(token.encode("ascii")))] if token else []
        self._lock = threading.Lock()
        self._entries = list(self._static)
        self.reloads = 0
        if path is not None:
            self._warn_if_readable(path)
            self._entries = self._static + read_tokens_file(path)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._entries]

    def check(self, credentials: bytes) -> str | None:
        """The name of the token ``credentials`` is, else None (constant time over all)."""
        presented = _digest(credentials)
        found = None
        for name, digest in self._entries:  # every entry compared, whichever matches
            if hmac.compare_digest(presented, digest) and found is None:
                found = name
        return found

    def reload(self) -> bool:
        """Re-read the tokens file; on an error keep the tokens in force and log why."""
        if self.path is None:
            return False
        try:
            entries = read_tokens_file(self.path)
        except TokenFileError as exc:
            log.error("tokens not reloaded, the previous ones stay in force: %s", exc)
            return False
        with self._lock:
            self._entries = self._static + entries
            self.reloads += 1
        log.info("tokens reloaded from %s: %s", self.path, ", ".join(name for name, _ in entries))
        return True

    @staticmethod
    def _warn_if_readable(path: Path) -> None:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("the tokens file %s is readable by other users: chmod 600 it", path)
