"""What a sandbox is asked for (``SandboxConfig``), what a cell did (``CellResult``), its errors."""

import dataclasses
from typing import Any

MODES = ("bwrap", "rlimits-only")

INSTALL_HINT = (
    "install it with `sudo apt-get install bubblewrap` (Debian/Ubuntu; `dnf install bubblewrap` "
    "on Fedora), or opt in to the weaker isolation with sandbox mode 'rlimits-only'"
)


class SandboxError(RuntimeError):
    """The sandbox could not be started or used (an infrastructure problem, not the agent's)."""


class BubblewrapMissingError(SandboxError):
    """Mode 'bwrap' was asked for and the bwrap executable is not installed."""


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits of one sandboxed Python session. Every field is a plain JSON value."""

    mode: str = "bwrap"  # "bwrap" or "rlimits-only"
    cell_timeout_s: float = 10.0  # wall clock per cell; past it the session is killed
    cpu_seconds: int = 30  # RLIMIT_CPU: CPU seconds of each process over the whole session
    memory_mb: int = 512  # RLIMIT_AS: address space of each process
    file_size_mb: int = 16  # RLIMIT_FSIZE: largest file a process may write
    max_processes: int = 16  # RLIMIT_NPROC (threads count too)
    tmpfs_mb: int = 64  # size of the private /tmp (bwrap mode)
    tmpfs_inodes: int = 4096  # files + directories the private /tmp can hold (bwrap mode)
    max_output_chars: int = 2000  # stdout+stderr kept per cell; also caps tracebacks and values
    startup_timeout_s: float = 20.0
    python: str | None = None  # interpreter inside the sandbox; None picks one (see find_python)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sandbox mode must be one of {MODES}, got {self.mode!r}")
        for name in ("cell_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox {name} must be > 0, got {getattr(self, name)!r}")
        for name in (
            "cpu_seconds",
            "memory_mb",
            "file_size_mb",
            "max_processes",
            "tmpfs_mb",
            "tmpfs_inodes",
        ):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"sandbox {name} must be an int >= 1, got {getattr(self, name)!r}")
        if not (isinstance(self.max_output_chars, int) and self.max_output_chars >= 100):
            raise ValueError(
                f"sandbox max_output_chars must be an int >= 100, got {self.max_output_chars!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "SandboxConfig":
        """Build from a plain dict (e.g. an env kwarg); unknown keys raise ValueError."""
        values = dict(values or {})
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown sandbox settings {unknown}; expected some of {sorted(known)}"
            )
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class CellResult:
    """What one cell did. ``session_lost``: the session died in this cell and will restart."""

    output: str = ""  # stdout and stderr interleaved, at most max_output_chars characters
    dropped_bytes: int = 0  # output bytes beyond the cap, not shown
    error: str | None = None  # traceback when the cell raised
    value: str | None = None  # repr of the cell's final expression when it is not None
    timed_out: bool = False
    crashed: bool = False  # the session process died (a limit, a signal, os._exit)
    detail: str = ""  # why the session was lost

    @property
    def session_lost(self) -> bool:
        return self.timed_out or self.crashed

    @property
    def ok(self) -> bool:
        return self.error is None and not self.session_lost

    def render(self) -> str:
        """The cell's result as a REPL would show it (what an agent reads)."""
        parts = []
        if self.output:
            parts.append(self.output.rstrip("\n"))
        if self.dropped_bytes:
            parts.append(f"[... {self.dropped_bytes} more bytes of output truncated]")
        if self.error:
            parts.append(self.error.rstrip("\n"))
        if self.value is not None:
            parts.append(self.value)
        if self.session_lost:
            parts.append(
                f"[Python session lost: {self.detail}. A new session starts with the next cell; "
                "variables from earlier cells are gone.]"
            )
        return "\n".join(parts) if parts else "(no output)"
