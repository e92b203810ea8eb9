"""The running session: ``PythonSandbox`` (one persistent REPL process) and ``run_once``."""

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import struct
import subprocess
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import psutil

from envs.sandbox.config import (
    INSTALL_HINT,
    BubblewrapMissingError,
    CellResult,
    SandboxConfig,
    SandboxError,
)
from envs.sandbox.launch import (
    allocate_host_uid,
    bwrap_command,
    child_setup,
    driver_command,
    find_python,
)
from envs.sandbox.processes import descendant_pids, exit_status, kill_pids, kill_tree
from envs.sandbox.workdirs import owned_tempdir

logger = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eprl-sandbox-spawner")


def _new_spawner_after_fork() -> None:
    """A forked child has the executor but not its thread: work submitted there would wait
    forever, so the child gets an executor of its own."""
    global _SPAWNER
    _SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eprl-sandbox-spawner")


os.register_at_fork(after_in_child=_new_spawner_after_fork)
_SIGNAL_MEANING = {
    signal.SIGXCPU: "CPU time limit exceeded",
    signal.SIGKILL: "the CPU time hard limit, the OOM killer, or a kill from inside",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGABRT: "aborted",
    signal.SIGBUS: "bus error",
}


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
        self.host_uid = allocate_host_uid()
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
        return self._process is not None and exit_status(self._process) is None

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
        try:
            self._process = spawn(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=self._workdir or "/",
                start_new_session=True,
                preexec_fn=child_setup(
                    self.config, max_processes, bounded_tmpfs=self.bwrap is not None
                ),
                **uid_drop,
            )
        except subprocess.SubprocessError as error:  # raised in child_setup, before the exec
            raise setup_error(error, bwrap=self.bwrap is not None) from None
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
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        max_processes = self.config.max_processes
        if self.config.mode == "bwrap":
            return bwrap_command(self.bwrap, self.python, self.config), env, max_processes
        if self._workdir is None:
            self._workdir = str(owned_tempdir("eprl-sandbox-"))
            if os.geteuid() == 0:
                os.chown(self._workdir, self.host_uid, self.host_uid)
        env["HOME"] = self._workdir
        if os.geteuid() != 0:
            # RLIMIT_NPROC counts every process of the uid, and without a uid drop that is ours
            max_processes += sum(
                1
                for p in psutil.process_iter(["uids"])
                if p.info["uids"] and p.info["uids"].real == os.getuid()
            )
        command = driver_command(self.python, self.config.max_output_chars, reap=False)
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
            elif exit_status(self._process) is not None:
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
            elif exit_status(self._process) is not None:
                raise _SessionLost(self._exit_detail())

    def _exit_detail(self) -> str:
        deadline = time.monotonic() + 2
        while (status := exit_status(self._process)) is None and time.monotonic() < deadline:
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
        kill_pids(descendant_pids(self._process.pid))

    def _kill(self) -> None:
        process, workdir = self._process, self._workdir
        self._process, self._workdir = None, None
        PythonSandbox._finalize([process, workdir, self.config.mode == "bwrap"])
        self._finalizer.detach()

    @staticmethod
    def _finalize(state: list) -> None:
        process, workdir, bwrap = (state + [None, None, False])[:3]
        if process is not None:
            kill_tree(process, bwrap)
            for stream in (process.stdin, process.stdout, process.stderr):
                with contextlib.suppress(OSError):
                    stream.close()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def spawn(command: list[str], **popen_kwargs: object) -> subprocess.Popen:
    """``subprocess.Popen`` from the one long-lived spawner thread.

    Both bwrap's ``--die-with-parent`` and the rlimits-only parent-death signal follow the
    *thread* that forked: a sandbox started from a short-lived worker thread would die with it."""
    return _SPAWNER.submit(subprocess.Popen, command, **popen_kwargs).result()


def setup_error(error: subprocess.SubprocessError, bwrap: bool) -> SandboxError:
    """The error for a child that failed in ``child_setup`` (Popen only says it failed)."""
    hint = (
        ": bubblewrap mode needs unprivileged user namespaces, for its bounded /tmp and for "
        "bwrap itself"
        if bwrap
        else ""
    )
    return SandboxError(f"the sandbox process could not be set up ({error}){hint}")


def run_once(code: str, config: SandboxConfig | None = None, startup_code: str = "") -> CellResult:
    """Run ``code`` as one cell in a fresh sandbox, then kill the sandbox."""
    with PythonSandbox(config, startup_code=startup_code) as sandbox:
        return sandbox.run_cell(code)
