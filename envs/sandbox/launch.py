"""How a session process is started: its interpreter, its command line and its rlimits.

The command is the REPL driver (``driver.py``, passed as ``-c`` source) either wrapped in
bubblewrap (``bwrap_command``) or run bare (mode ``rlimits-only``); ``child_limits`` is the
``preexec_fn`` that sets the rlimits in the forked child; ``allocate_host_uid`` gives each
sandbox the host uid it drops to when the host runs as root.
"""

import ctypes
import itertools
import os
import resource
import secrets
import signal
import stat
import sys
from collections.abc import Callable
from pathlib import Path

from envs.sandbox.config import SandboxConfig, SandboxError

SANDBOX_UID = SANDBOX_GID = 65534  # "nobody": the uid inside the sandbox's user namespace
# On the host (when running as root) each sandbox drops to a uid of its own from this range, which
# no login account uses: RLIMIT_NPROC counts every process of a uid host-wide, so with one shared
# uid the process limit would bound all sandboxes together (a 5th concurrent sandbox failed to
# start with max_processes=16); with one uid each it bounds each sandbox separately.
HOST_UID_BASE, HOST_UID_COUNT = 0x40000, 0x10000
_host_uids: tuple[int, itertools.count] | None = None  # (owning pid, counter)


def allocate_host_uid() -> int:
    """A host uid for one sandbox: sequential within this process (no two live sandboxes of one
    process share it), from a random start drawn per process — also after a fork, since forked
    workers (the serving layer's) would otherwise all inherit the same counter."""
    global _host_uids
    if _host_uids is None or _host_uids[0] != os.getpid():
        _host_uids = (os.getpid(), itertools.count(secrets.randbelow(HOST_UID_COUNT)))
    return HOST_UID_BASE + next(_host_uids[1]) % HOST_UID_COUNT


DRIVER_SOURCE = Path(__file__).with_name("driver.py").read_text()
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now: a forked child must not dlopen
_SHM_MB = 16  # /dev/shm (bwrap mode), for multiprocessing's semaphores


def readable_by_sandbox(path: str) -> bool:
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
        if os.path.isfile(candidate) and readable_by_sandbox(candidate):
            return os.path.realpath(candidate)
    raise SandboxError(
        f"no Python interpreter readable by the sandbox's unprivileged uid among {candidates}; "
        "install the system python3 (`apt-get install python3`) or set sandbox python=PATH "
        "to a world-readable interpreter"
    )


def child_limits(
    config: SandboxConfig, max_processes: int, die_with_parent: bool
) -> Callable[[], None]:
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


def bwrap_command(bwrap: str, python: str, config: SandboxConfig) -> list[str]:
    """The driver inside bubblewrap: a fresh read-only root holding only ``/usr`` (and the
    interpreter's prefix), private ``/tmp`` and ``/dev/shm``, no host namespace shared."""
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
    ]  # fmt: skip
    return command + driver_command(python, config.max_output_chars, reap=True)


def driver_command(python: str, max_output_chars: int, reap: bool) -> list[str]:
    """The driver's own command line (inside bwrap, or bare in mode ``rlimits-only``)."""
    reap_arg = "reap" if reap else "no-reap"
    return [python, "-I", "-S", "-X", "utf8", "-c", DRIVER_SOURCE, str(max_output_chars), reap_arg]
