"""A persistent, stateful Python session for untrusted code: bubblewrap + rlimits + uid drop.

``PythonSandbox`` runs one REPL process per episode (``run_cell`` execs a cell in a namespace that
persists across cells and returns its output); ``run_once`` runs code in a fresh sandbox.

Isolation in the default mode ``"bwrap"`` (each layer covers a different escape):
- bubblewrap: ``--unshare-all`` (new user, PID, network, IPC, UTS and cgroup namespaces: no
  network but a private loopback, no view of host processes), ``--die-with-parent``,
  ``--new-session``, ``--clearenv``, ``--disable-userns``; the filesystem is a fresh root with
  read-only binds of ``/usr`` (and of the interpreter's prefix when it lives elsewhere), a
  private tmpfs ``/tmp`` and ``/dev/shm`` capped in bytes and in inodes (see ``launch.py``)
  and minimal ``/proc`` and ``/dev``. Host files, including
  the repository, home directories and ``/etc``, are not there at all.
- unprivileged uids: when the host runs as root the process drops *before* bwrap starts to a
  host uid of its own (one per sandbox, from an unused range), so the code is unprivileged and
  RLIMIT_NPROC is enforced (it is not for root) per sandbox; inside it appears as 65534 (nobody).
- rlimits set in the child before exec: RLIMIT_CPU (CPU seconds of each process over the whole
  session), RLIMIT_AS (address space), RLIMIT_FSIZE (largest file), RLIMIT_NPROC (processes),
  RLIMIT_CORE = 0.
- the host: a wall-clock timeout per cell, output caps on both sides (the driver keeps a bounded
  head of the output; the host refuses messages over a bound derived from the cap), and on
  timeout, crash or close a SIGKILL to the sandbox's process group and to every descendant. After
  each cell the driver kills every other process of its PID namespace, so nothing a cell starts
  outlives the cell.

Mode ``"rlimits-only"`` (explicit opt-in; a warning is logged at every start) runs the driver
without namespaces: the rlimits, the uid drop (root hosts only), the timeouts and the output caps
still hold, but the code shares the host's network, sees every world-readable host file and
every process, and a process that leaves its session escapes the cleanup.

A session that dies (timeout, a limit, a crash) is restarted at the next cell; the state of the
lost session is gone, and the ``CellResult`` of the cell that lost it says so.

Modules: ``config`` (the settings and results), ``launch`` (interpreter, command line, rlimits),
``processes`` (watching and killing the session's processes), ``session`` (``PythonSandbox``),
``driver`` (the REPL that runs inside, read as source).
"""

from envs.sandbox.config import BubblewrapMissingError, CellResult, SandboxConfig, SandboxError
from envs.sandbox.launch import DRIVER_SOURCE, find_python
from envs.sandbox.session import PythonSandbox, run_once

__all__ = [
    "DRIVER_SOURCE",
    "BubblewrapMissingError",
    "CellResult",
    "PythonSandbox",
    "SandboxConfig",
    "SandboxError",
    "find_python",
    "run_once",
]
