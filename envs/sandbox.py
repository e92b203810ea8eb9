"""A persistent, stateful Python session for untrusted code: bubblewrap + rlimits + uid drop.

``PythonSandbox`` runs one REPL process per episode (``run_cell`` execs a cell in a namespace that
persists across cells and returns its output); ``run_once`` runs code in a fresh sandbox.

Isolation in the default mode ``"bwrap"`` (each layer covers a different escape):
- bubblewrap: ``--unshare-all`` (new user, PID, network, IPC, UTS and cgroup namespaces: no
  network but a private loopback, no view of host processes), ``--die-with-parent``,
  ``--new-session``, ``--clearenv``, ``--disable-userns``; the filesystem is a fresh root with
  read-only binds of ``/usr`` (and of the interpreter's prefix when it lives elsewhere), a
  private size-capped tmpfs ``/tmp`` and minimal ``/proc`` and ``/dev``. Host files, including
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
"""

import contextlib
import ctypes
import dataclasses
import itertools
import json
import logging
import os
import resource
import secrets
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

logger = logging.getLogger(__name__)

MODES = ("bwrap", "rlimits-only")
SANDBOX_UID = SANDBOX_GID = 65534  # "nobody": the uid inside the sandbox's user namespace
# On the host (when running as root) each sandbox drops to a uid of its own from this range, which
# no login account uses: RLIMIT_NPROC counts every process of a uid host-wide, so with one shared
# uid the process limit would bound all sandboxes together (a 5th concurrent sandbox failed to
# start with max_processes=16); with one uid each it bounds each sandbox separately.
HOST_UID_BASE, HOST_UID_COUNT = 0x40000, 0x10000
_host_uids: tuple[int, itertools.count] | None = None  # (owning pid, counter)


def _allocate_host_uid() -> int:
    """A host uid for one sandbox: sequential within this process (no two live sandboxes of one
    process share it), from a random start drawn per process — also after a fork, since forked
    workers (the serving layer's) would otherwise all inherit the same counter."""
    global _host_uids
    if _host_uids is None or _host_uids[0] != os.getpid():
        _host_uids = (os.getpid(), itertools.count(secrets.randbelow(HOST_UID_COUNT)))
    return HOST_UID_BASE + next(_host_uids[1]) % HOST_UID_COUNT


INSTALL_HINT = (
    "install it with `sudo apt-get install bubblewrap` (Debian/Ubuntu; `dnf install bubblewrap` "
    "on Fedora), or opt in to the weaker isolation with sandbox mode 'rlimits-only'"
)
DRIVER_SOURCE = (Path(__file__).with_name("sandbox_driver.py")).read_text()
_HEADER = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now: a forked child must not dlopen
_SHM_MB = 16  # /dev/shm (bwrap mode), for multiprocessing's semaphores
# PR_SET_PDEATHSIG follows the *thread* that forked the child: spawn from one thread that lives
# as long as the process, so a sandbox started from a short-lived worker thread is not killed
# when that thread exits.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eprl-sandbox-spawner")
_SIGNAL_MEANING = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGKILL: "the CPU time hard limit, the OOM killer, or a kill from inside",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
    signal.SIGBUS: "bus error",
}


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
    max_output_chars: int = 2000  # stdout+stderr kept per cell; also caps tracebacks and values
    startup_timeout_s: float = 20.0
    python: str | None = None  # interpreter inside the sandbox; None picks one (see find_python)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"sandbox mode must be one of {MODES}, got {self.mode!r}")
        for name in ("cell_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"sandbox {name} must be > 0, got {getattr(self, name)!r}")
        for name in ("cpu_seconds", "memory_mb", "file_size_mb", "max_processes", "tmpfs_mb"):
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


def _readable_by_sandbox(path: str) -> bool:
    """Whether the sandbox's uid can read and execute ``path`` (every parent must be searchable)."""
    if os.geteuid() != 0:  # no uid drop: the sandbox runs as the host user (mapped to 65534)
        return os.access(path, os.R_OK | os.X_OK)
    resolved = Path(os.path.realpath(path))
    try:
        mode = resolved.stat().st_mode
        if not (mode & stat.S_IROTH and mode & stat.S_IXOTH):
            return False
        return all(parent.stat().st_mode & stat.S_IXOTH for parent in resolved.parents)
    except OSError:
        return False


def find_python() -> str:
    """The interpreter the sandbox runs: the first candidate its unprivileged uid can read.

    Candidates, in order: the host's base interpreter (``sys.base_prefix``, so the same version
    when readable), then ``/usr/bin/pythonX.Y``, ``/usr/local/bin/pythonX.Y`` and
    ``/usr/bin/python3``. A virtualenv or a pyenv tree under a mode-0700 home (e.g. /root) is
    unreadable to uid 65534, hence the fallbacks. The sandbox needs the standard library only.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        os.path.join(sys.base_prefix, "bin", version),
        f"/usr/bin/{version}",
        f"/usr/local/bin/{version}",
        "/usr/bin/python3",
    ]
    for candidate in candidates:
        if os.path.isfile(candidate) and _readable_by_sandbox(candidate):
            return os.path.realpath(candidate)
    raise SandboxError(
        f"no Python interpreter readable by the sandbox's unprivileged uid among {candidates}; "
        "install the system python3 (`apt-get install python3`) or set sandbox python=PATH "
        "to a world-readable interpreter"
    )


def _child_limits(config: SandboxConfig, max_processes: int, die_with_parent: bool):
    """preexec_fn: rlimits (and, without bwrap, a parent-death signal) in the forked child.

    Raw syscalls only, so it is safe in the child of a threaded parent. It runs after
    ``subprocess`` has dropped the uid, which would otherwise clear the parent-death signal.
    """
    cpu = config.cpu_seconds
    memory = config.memory_mb << 20
    file_size = config.file_size_mb << 20

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if die_with_parent:
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return apply


def _bwrap_command(bwrap: str, python: str, config: SandboxConfig, driver_args: list[str]) -> list:
    command = [
        bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--clearenv",
        "--disable-userns", "--hostname", "sandbox",
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged-/usr systems: /lib -> usr/lib
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    prefix = str(Path(python).parent.parent)
    if not (prefix + "/").startswith("/usr/"):
        command += ["--ro-bind", prefix, prefix]
    command += [
        "--proc", "/proc", "--dev", "/dev",
        "--size", str(_SHM_MB << 20), "--tmpfs", "/dev/shm",
        "--size", str(config.tmpfs_mb << 20), "--tmpfs", "/tmp",
        # the root and /dev are tmpfs mounts without a size cap: read-only, or they could fill RAM
        "--remount-ro", "/dev", "--remount-ro", "/",
        "--chdir", "/tmp",
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
        python, "-I", "-S", "-X", "utf8", "-c", DRIVER_SOURCE, *driver_args,
    ]  # fmt: skip
    return command


def _exit_status(process: subprocess.Popen) -> int | None:
    """Exit status (negative: killed by that signal) without reaping, or None while it runs.

    Not reaping keeps the pid, and so the process group id, from being reused before
    ``_kill_tree`` signals the group.
    """
    if process.returncode is not None:
        return process.returncode
    try:
        info = os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return process.poll()
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _descendants(pid: int) -> list[int]:
    """Pids of every descendant of ``pid``, from /proc/PID/task/TID/children (no full scan)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                frontier.append(child)
    return found


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _kill_tree(process: subprocess.Popen, bwrap: bool) -> None:
    """SIGKILL every descendant of ``process`` and its process group, then reap ``process``.

    With bwrap the descendants go first: the sandbox's init dies (taking its PID namespace
    with it), bwrap reaps it and exits, and nothing is left for the host's init to reap.
    """
    descendants = _descendants(process.pid) if process.returncode is None else []
    _kill_pids(descendants)
    deadline = time.monotonic() + 0.5
    while bwrap and descendants and _exit_status(process) is None and time.monotonic() < deadline:
        time.sleep(0.001)
    if process.returncode is None:  # not reaped yet, so the group id is still ours
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        logger.error("sandbox process %d did not exit 10 s after SIGKILL", process.pid)


_TIMEOUT_DETAIL = "the cell ran past its wall-clock limit"


class _SessionLost(Exception):
    def __init__(self, detail: str, timed_out: bool = False):
        super().__init__(detail)
        self.detail = detail
        self.timed_out = timed_out


class PythonSandbox:
    """One sandboxed, persistent Python session (not thread-safe: one caller at a time).

    >>> with PythonSandbox() as sandbox:
    ...     sandbox.run_cell("x = 2")
    ...     sandbox.run_cell("print(x * 21)").output
    '42\\n'

    The process starts at the first cell (or ``start()``); ``startup_code`` runs silently at
    every (re)start. ``close()`` kills everything the session started.
    """

    def __init__(self, config: SandboxConfig | None = None, startup_code: str = "") -> None:
        self.config = config or SandboxConfig()
        self.startup_code = startup_code
        self.host_uid = _allocate_host_uid()
        self.python = self.config.python or find_python()
        self.bwrap = shutil.which("bwrap") if self.config.mode == "bwrap" else None
        if self.config.mode == "bwrap" and self.bwrap is None:
            raise BubblewrapMissingError(f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")
        output_cap = self.config.max_output_chars
        # three capped strings, each char at most 12 bytes as JSON (a \\ud83d\\ude00 pair)
        self.max_message_bytes = 65536 + 3 * 12 * output_cap
        self.starts = 0
        self._process: subprocess.Popen | None = None
        self._buffer = bytearray()
        self._workdir: str | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, PythonSandbox._finalize, [None])

    # lifecycle ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._process is not None and _exit_status(self._process) is None

    @property
    def pid(self) -> int | None:
        """Host pid of the sandbox's top process (bwrap, or the driver in rlimits-only mode)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the session process (a no-op when it runs)."""
        if self._closed:
            raise SandboxError("this sandbox is closed")
        if self._process is not None:
            return
        if self.config.mode == "rlimits-only":
            logger.warning(
                "starting a Python sandbox in 'rlimits-only' mode: no namespaces, so the code can "
                "use the network, read world-readable host files and see host processes%s",
                ""
                if os.geteuid() == 0
                else ", and it runs as your own uid (it can signal your processes)",
            )
        command, env, max_processes = self._command()
        uid_drop = {}
        if os.geteuid() == 0:
            uid_drop = {"user": self.host_uid, "group": self.host_uid, "extra_groups": []}
        popen = _SPAWNER.submit(
            subprocess.Popen,
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=self._workdir or "/",
            start_new_session=True,
            preexec_fn=_child_limits(self.config, max_processes, self.bwrap is None),
            **uid_drop,
        )
        self._process = popen.result()
        self._finalizer.detach()
        self._finalizer = weakref.finalize(
            self, PythonSandbox._finalize, [self._process, self._workdir, self.bwrap is not None]
        )
        self._buffer = bytearray()
        self.starts += 1
        os.set_blocking(self._process.stdout.fileno(), False)
        os.set_blocking(self._process.stdin.fileno(), False)
        deadline = time.monotonic() + self.config.startup_timeout_s
        try:
            ready = self._receive(deadline)
        except _SessionLost as lost:
            stderr = self._stderr_tail()
            self._kill()
            raise SandboxError(
                f"the sandbox did not start ({lost.detail}); its stderr: {stderr or '(empty)'}"
                + (
                    f"\nIs unprivileged bubblewrap allowed here? ({INSTALL_HINT})"
                    if self.bwrap
                    else ""
                )
            ) from None
        if not ready.get("ready"):
            self._kill()
            raise SandboxError(f"the sandbox driver sent {ready!r} instead of its ready message")
        if self.startup_code:
            result = self._exec(self.startup_code, self.config.startup_timeout_s)
            if not result.ok:
                self._kill()
                raise SandboxError(f"the sandbox startup code failed:\n{result.render()}")

    def close(self) -> None:
        """Kill the session and everything it started. Safe to call twice."""
        self._kill()
        self._closed = True

    def __enter__(self) -> "PythonSandbox":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def restart(self) -> None:
        """Kill the session now; the next cell starts a fresh one."""
        self._kill()

    # cells -------------------------------------------------------------------------------
    def run_cell(self, code: str, timeout_s: float | None = None) -> CellResult:
        """Exec ``code`` in the persistent namespace; never raises for anything the code does.

        A cell that times out or kills the session returns ``session_lost``; the next cell runs
        in a fresh session (after ``startup_code``).
        """
        if self._process is None:
            self.start()
        return self._exec(code, timeout_s or self.config.cell_timeout_s)

    def _exec(self, code: str, timeout_s: float) -> CellResult:
        deadline = time.monotonic() + timeout_s
        try:
            self._send(code, deadline)
            reply = self._receive(deadline)
        except _SessionLost as lost:
            self._kill()
            detail = f"{lost.detail} of {timeout_s:g} s" if lost.timed_out else lost.detail
            return CellResult(timed_out=lost.timed_out, crashed=not lost.timed_out, detail=detail)
        if self.config.mode == "rlimits-only":
            self._kill_strays()
        return CellResult(
            output=str(reply.get("output", "")),
            dropped_bytes=int(reply.get("dropped_bytes", 0)),
            error=reply.get("error"),
            value=reply.get("value"),
        )

    # plumbing ----------------------------------------------------------------------------
    def _command(self) -> tuple[list[str], dict[str, str], int]:
        driver_args = [str(self.config.max_output_chars)]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        max_processes = self.config.max_processes
        if self.config.mode == "bwrap":
            command = _bwrap_command(self.bwrap, self.python, self.config, [*driver_args, "reap"])
            return command, env, max_processes
        if self._workdir is None:
            self._workdir = tempfile.mkdtemp(prefix="eprl-sandbox-")
            if os.geteuid() == 0:
                os.chown(self._workdir, self.host_uid, self.host_uid)
        env["HOME"] = self._workdir
        if os.geteuid() != 0:
            # RLIMIT_NPROC counts every process of the uid, and without a uid drop that is ours
            max_processes += sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"]
                                 and p.info["uids"].real == os.getuid())  # fmt: skip
        command = [self.python, "-I", "-S", "-X", "utf8", "-c", DRIVER_SOURCE,
                   *driver_args, "no-reap"]  # fmt: skip
        return command, env, max_processes

    def _send(self, code: str, deadline: float) -> None:
        body = code.encode("utf-8", "surrogatepass")
        view = memoryview(_HEADER.pack(len(body)) + body)
        fd = self._process.stdin.fileno()
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _SessionLost(_TIMEOUT_DETAIL, timed_out=True)
            _, writable, _ = select.select([], [fd], [], min(remaining, 0.25))
            if writable:
                try:
                    view = view[os.write(fd, view) :]
                except BrokenPipeError:
                    raise _SessionLost(self._exit_detail()) from None
                except BlockingIOError:
                    continue
            elif _exit_status(self._process) is not None:
                raise _SessionLost(self._exit_detail())

    def _receive(self, deadline: float) -> dict:
        fd = self._process.stdout.fileno()
        need = _HEADER.size
        while True:
            if len(self._buffer) >= _HEADER.size:
                need = _HEADER.size + _HEADER.unpack_from(self._buffer)[0]
                if need > self.max_message_bytes:
                    raise _SessionLost(
                        f"protocol error: a {need}-byte message, over the "
                        f"{self.max_message_bytes}-byte bound"
                    )
                if len(self._buffer) >= need:
                    body = bytes(self._buffer[_HEADER.size : need])
                    del self._buffer[:need]
                    try:
                        return json.loads(body.decode("utf-8"))
                    except ValueError:
                        raise _SessionLost("protocol error: a malformed message") from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _SessionLost(_TIMEOUT_DETAIL, timed_out=True)
            readable, _, _ = select.select([fd], [], [], min(remaining, 0.25))
            if readable:
                try:
                    chunk = os.read(fd, max(need - len(self._buffer), 65536))
                except BlockingIOError:
                    continue
                if not chunk:
                    raise _SessionLost(self._exit_detail())
                self._buffer += chunk
            elif _exit_status(self._process) is not None:
                raise _SessionLost(self._exit_detail())

    def _exit_detail(self) -> str:
        deadline = time.monotonic() + 2
        while (status := _exit_status(self._process)) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if status is None:
            return "the session closed its output"
        if self.config.mode == "bwrap" and status > 128:
            status = -(status - 128)  # bwrap reports a signal death as 128 + signal
        if status < 0:
            number = -status
            try:
                name = signal.Signals(number).name
            except ValueError:
                name = f"signal {number}"
            meaning = _SIGNAL_MEANING.get(number)
            return f"the process was killed by {name}" + (f" ({meaning})" if meaning else "")
        return f"the process exited with status {status}"

    def _stderr_tail(self, limit: int = 4096) -> str:
        stream = self._process.stderr
        try:
            os.set_blocking(stream.fileno(), False)
            data = stream.read(limit) or b""
        except (OSError, ValueError):
            data = b""
        return data.decode("utf-8", "replace").strip()

    def _kill_strays(self) -> None:
        """rlimits-only mode: kill what the cell started (children that left are out of reach)."""
        _kill_pids(_descendants(self._process.pid))

    def _kill(self) -> None:
        process, workdir = self._process, self._workdir
        self._process, self._workdir = None, None
        PythonSandbox._finalize([process, workdir, self.config.mode == "bwrap"])
        self._finalizer.detach()

    @staticmethod
    def _finalize(state: list) -> None:
        process, workdir, bwrap = (state + [None, None, False])[:3]
        if process is not None:
            _kill_tree(process, bwrap)
            for stream in (process.stdin, process.stdout, process.stderr):
                with contextlib.suppress(OSError):
                    stream.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def run_once(code: str, config: SandboxConfig | None = None, startup_code: str = "") -> CellResult:
    """Run ``code`` as one cell in a fresh sandbox, then kill the sandbox."""
    with PythonSandbox(config, startup_code=startup_code) as sandbox:
        return sandbox.run_cell(code)
