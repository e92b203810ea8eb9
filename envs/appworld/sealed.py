"""Sealed AppWorld: each episode's server in a bubblewrap sandbox of its own; rewards from a
separate evaluator that never runs model code.

The model's cells run inside AppWorld's server process (``serve.py``), so that process is sealed
with the code sandbox's machinery (``envs/sandbox/launch.py``):
- bubblewrap with every namespace unshared: no network at all (the host binds a unix socket
  outside the sandbox and hands the server only its file descriptor, so no path the sandbox can
  touch decides where the host connects), its own pid namespace, a cleared
  environment (``APPWORLD_ROOT``, ``PATH``, ``LANG``, ``HOME`` only), a read-only root holding
  ``/usr``, the AppWorld venv's packages and ``serve.py``; bounded ``/tmp`` and ``/dev/shm``;
- data: read-only ``base_dbs`` and ``api_docs``, and of the episode's task only ``specs.json``
  and ``dbs/`` (its starting state), copied into a directory the sandbox sees read-only. The
  task's ``ground_truth/`` and every other task are not in its file system at all, and the world
  is initialised with ``load_ground_truth=False``;
- writable: only ``experiments/`` (the episode's saved state and logs), private to this one
  server; the host reads the saved state back without following any link planted there;
- a host uid of its own (when the host runs as root), ``SERVER_LIMITS`` as rlimits, and a
  wall-clock limit per cell enforced from the host: the HTTP request times out and the sandbox is
  killed, so ``signal.alarm(0)`` in a cell does not lift it;
- one episode per sandbox: at the end of the episode the sandbox, every process in it, and its
  directories go; a fresh sandbox, started in the background, takes the next episode, so nothing
  a cell leaves behind (a thread, a daemon, a patched module) meets another episode.

The reward: AppWorld saves the world's databases after every cell. The host copies that saved
state (regular files only, no links) into the evaluator's inbox; the evaluator, one persistent
process per runtime (``evaluate.py``) in a sandbox of its own that holds the full data read-only
and has no network, loads it and runs the task's tests. The evaluator keeps the host's uid (it
must read the data root and the venv's interpreter, which may be private); the saved database
state, as data, is all of the model's that reaches it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

from envs.sandbox import SandboxConfig
from envs.sandbox.launch import (
    allocate_host_uid,
    bwrap_private_mounts,
    bwrap_root,
    child_setup,
    readable_by_sandbox,
)
from envs.sandbox.session import setup_error, spawn

SERVE_SCRIPT = Path(__file__).with_name("serve.py")
EVALUATE_SCRIPT = Path(__file__).with_name("evaluate.py")
SANDBOX_SITE_PACKAGES = "/eprl/site-packages"  # where a server sees the venv's packages
SANDBOX_VENV = "/eprl/venv"  # where the evaluator sees the venv
SOCKET_NAME = "appworld.sock"  # in the server's directory, which the sandbox does not see
# A ready AppWorld server (every app imported, a task initialised) peaks at ~400 MiB of address
# space with 4 threads (measured, appworld 0.1.3.post1); CPU seconds cover a whole episode;
# threads count as processes. The evaluator runs no model code and lives as long as its runtime.
SERVER_LIMITS = SandboxConfig(
    cpu_seconds=1800, memory_mb=1536, file_size_mb=256, max_processes=64, tmpfs_mb=256
)
EVALUATOR_LIMITS = SandboxConfig(
    cpu_seconds=86400, memory_mb=2048, file_size_mb=64, max_processes=64, tmpfs_mb=256
)
MAX_SAVED_FILE_BYTES = 256 << 20
_server_numbers = itertools.count()


class SealedSetupError(RuntimeError):
    """The sealed sandbox cannot be built here; the message says what is missing."""


def system_interpreter(venv: Path) -> str:
    """A system Python of the venv's minor version that the sandbox's uid can read (the venv's
    own interpreter may sit under a mode-0700 home); the venv's packages are added to it."""
    config = (venv / "pyvenv.cfg").read_text()
    version = next(
        line.split("=", 1)[1].strip()
        for line in config.splitlines()
        if line.split("=")[0].strip() in ("version", "version_info")
    )
    minor = ".".join(version.split(".")[:2])
    candidates = [f"/usr/bin/python{minor}", f"/usr/local/bin/python{minor}"]
    for candidate in candidates:
        if os.path.isfile(candidate) and readable_by_sandbox(candidate):
            return os.path.realpath(candidate)
    raise SealedSetupError(
        f"no Python {minor} readable by the sandbox's unprivileged uid among {candidates} (the "
        f"AppWorld venv {venv} was built with Python {version}): install python{minor} from the "
        "system packages"
    )


def site_packages(venv: Path) -> Path:
    """The venv's site-packages, which the sandbox's uid must be able to read."""
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found or not readable_by_sandbox(str(found[0])):
        raise SealedSetupError(
            f"the AppWorld venv's site-packages under {venv}/lib is missing or not readable by "
            "the sandbox's unprivileged uid: build the venv under a world-readable path "
            "(EPRL_APPWORLD_VENV)"
        )
    return found[0]


def prepare_workdir(workdir: Path, root: Path) -> None:
    """What every sealed server of a runtime shares, readable by their uids: ``serve.py`` and
    the task-independent data (hard links where possible, else copies)."""
    os.chmod(workdir, 0o755)  # mkdtemp made it 0700; the servers' uids must traverse it
    (workdir / "bin").mkdir()
    shutil.copy(SERVE_SCRIPT, workdir / "bin" / "serve.py")
    for name in ("base_dbs", "api_docs"):
        shutil.copytree(
            root / "data" / name, workdir / "shared" / name, copy_function=_link_or_copy
        )
    (workdir / "servers").mkdir()
    (workdir / "inbox" / "experiments" / "outputs").mkdir(parents=True)
    for path in [workdir / "shared", *(workdir / "shared").rglob("*")]:
        if path.is_dir():
            os.chmod(path, 0o755)


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def start_server(workdir: Path, bwrap: str, venv: Path) -> tuple[subprocess.Popen, Path, Path]:
    """Start one sealed server; returns its process, its private directory (whose
    ``appworld.sock`` it serves once ready) and its log."""
    number = next(_server_numbers)
    directory = workdir / "servers" / str(number)
    log_path = workdir / "logs" / f"server-{number}.log"
    for sub in ("tasks", "experiments/outputs"):
        (directory / sub).mkdir(parents=True)
    host_uid = allocate_host_uid()
    uid_drop = {}
    if os.geteuid() == 0:
        uid_drop = {"user": host_uid, "group": host_uid, "extra_groups": []}
        for sub in ("experiments", "experiments/outputs"):
            os.chown(directory / sub, host_uid, host_uid)
    for path in (directory, directory / "tasks"):
        os.chmod(path, 0o755)
    python, packages = system_interpreter(venv), str(site_packages(venv))
    command = bwrap_root(bwrap, {"HOME": "/tmp", "APPWORLD_ROOT": "/aw"})
    # at a fixed path: the venv may live under /tmp (a CI clone), which the private /tmp hides
    command += ["--ro-bind", packages, SANDBOX_SITE_PACKAGES]
    command += [
        "--ro-bind", str(workdir / "bin" / "serve.py"), "/eprl/serve.py",
        "--ro-bind", str(workdir / "shared" / "base_dbs"), "/aw/data/base_dbs",
        "--ro-bind", str(workdir / "shared" / "api_docs"), "/aw/data/api_docs",
        "--ro-bind", str(directory / "tasks"), "/aw/data/tasks",
        "--bind", str(directory / "experiments"), "/aw/experiments",
    ]  # fmt: skip
    command += bwrap_private_mounts("/aw")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(directory / SOCKET_NAME))
    listener.listen(128)
    command += [python, "-I", "-S", "-B", "-u", "/eprl/serve.py", "--fd", str(listener.fileno())]
    command += ["--root", "/aw", "--site-packages", SANDBOX_SITE_PACKAGES]
    with open(log_path, "ab") as log, listener:  # the server holds its own copy
        try:
            process = spawn(
                command,
                pass_fds=(listener.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": "/usr/bin:/bin"},
                cwd="/",
                start_new_session=True,
                preexec_fn=child_setup(SERVER_LIMITS, SERVER_LIMITS.max_processes, True),
                **uid_drop,
            )
        except subprocess.SubprocessError as error:
            shutil.rmtree(directory, ignore_errors=True)
            raise SealedSetupError(str(setup_error(error, bwrap=True))) from None
    return process, directory, log_path


def install_task(root: Path, directory: Path, task_id: str) -> None:
    """Give a server the one task it runs: ``specs.json`` and the starting ``dbs/``, nothing
    of ``ground_truth/``."""
    source, target = root / "data" / "tasks" / task_id, directory / "tasks" / task_id
    target.mkdir(mode=0o755)
    shutil.copy(source / "specs.json", target / "specs.json")
    shutil.copytree(source / "dbs", target / "dbs")
    for path in (target / "dbs", *(target / "dbs").rglob("*")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def collect_saved_state(directory: Path, inbox: Path, task_id: str, experiment_name: str) -> None:
    """Copy the state a server saved for ``task_id`` into the evaluator's inbox: the regular
    files of ``dbs/``, each size-capped, every path component opened without following links
    (the sandbox owns that tree and could have planted a link to anywhere on the host)."""
    parts = ("outputs", experiment_name, "tasks", task_id, "dbs")
    target = inbox.joinpath("experiments", *parts)
    target.mkdir(parents=True)
    fd = os.open(directory / "experiments", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            parent, fd = fd, -1
            try:
                fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
            except OSError as error:
                raise FileNotFoundError(
                    f"the server saved no state for {task_id}: {error}"
                ) from None
            finally:
                os.close(parent)
        for name in os.listdir(fd):
            _copy_regular_file(fd, name, target / name)
    finally:
        if fd >= 0:
            os.close(fd)


def _copy_regular_file(dir_fd: int, name: str, destination: Path) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return  # a link, or gone: not part of a saved state
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if stat.S_ISREG(info.st_mode) and info.st_size <= MAX_SAVED_FILE_BYTES:
            destination.write_bytes(handle.read(MAX_SAVED_FILE_BYTES))


class Evaluator:
    """The sandboxed evaluator process of one runtime (``evaluate.py``), started on first use
    and restarted after a failure. ``evaluate`` is serialised: one request at a time."""

    def __init__(self, root: Path, venv_python: Path, inbox: Path, bwrap: str, log: Path):
        self.root = root
        self.venv_python = venv_python
        self.inbox = inbox
        self.bwrap = bwrap
        self.log = log
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._buffer = b""

    def start(self, timeout_s: float) -> None:
        """Start the evaluator now (it loads AppWorld, seconds) rather than at the end of the
        first episode; nothing to do while it runs. RuntimeError when it does not come up."""
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                self._start()
                self._read(time.monotonic() + timeout_s)  # the ready line

    def evaluate(self, task_id: str, experiment_name: str, timeout_s: float) -> dict:
        """AppWorld's test report of the saved state in the inbox; RuntimeError on failure."""
        with self._lock:
            deadline = time.monotonic() + timeout_s
            if self.process is None or self.process.poll() is not None:
                self._start()
                self._read(deadline)  # the ready line
            request = {"task_id": task_id, "experiment_name": experiment_name}
            try:
                self.process.stdin.write((json.dumps(request) + "\n").encode())
                self.process.stdin.flush()
            except OSError as error:
                self.kill()
                raise RuntimeError(f"the AppWorld evaluator died: {error}{self._tail()}") from None
            reply = self._read(deadline)
        if "error" in reply:
            raise RuntimeError(f"AppWorld's evaluation of {task_id} failed:\n{reply['error']}")
        return reply["output"]

    def kill(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                stream.close()
            self.process = None

    def _start(self) -> None:
        venv = self.venv_python.parent.parent
        prefix = Path(os.path.realpath(self.venv_python)).parent.parent
        command = bwrap_root(self.bwrap, {"HOME": "/tmp", "APPWORLD_ROOT": "/aw"})
        # the venv at a fixed path (it may live under /tmp, which the private /tmp hides); its
        # interpreter's prefix, which pyvenv.cfg points to, at its own path
        command += ["--ro-bind", str(venv), SANDBOX_VENV]
        if not str(prefix).startswith("/usr/"):
            command += ["--ro-bind", str(prefix), str(prefix)]
        command += [
            "--ro-bind", str(EVALUATE_SCRIPT), "/eprl/evaluate.py",
            "--ro-bind", str(self.root / "data"), "/aw/data",
            "--ro-bind", str(self.inbox / "experiments"), "/aw/experiments",
        ]  # fmt: skip
        command += bwrap_private_mounts("/aw")
        python = f"{SANDBOX_VENV}/{self.venv_python.relative_to(venv)}"
        command += [python, "-B", "-u", "/eprl/evaluate.py", "--root", "/aw"]
        self._buffer = b""
        with open(self.log, "ab") as log:
            try:
                self.process = spawn(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    env={"PATH": "/usr/bin:/bin"},
                    cwd="/",
                    start_new_session=True,
                    preexec_fn=child_setup(EVALUATOR_LIMITS, EVALUATOR_LIMITS.max_processes, True),
                )
            except subprocess.SubprocessError as error:
                raise SealedSetupError(str(setup_error(error, bwrap=True))) from None

    def _read(self, deadline: float) -> dict:
        fd = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            readable = select.select([fd], [], [], max(remaining, 0))[0] if remaining > 0 else []
            chunk = os.read(fd, 1 << 20) if readable else b""
            if not chunk or len(self._buffer) > 64 << 20:
                why = "timed out" if not readable else "died"
                self.kill()
                raise RuntimeError(f"the AppWorld evaluator {why}{self._tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _tail(self) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()[-15:]
        except OSError:
            return ""
        return ("\n--- evaluator log (last lines) ---\n" + "\n".join(text)) if text else ""
