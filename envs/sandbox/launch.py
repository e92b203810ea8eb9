"""How a session process is started: its interpreter, its command line and its rlimits.

The command is the REPL driver (``driver.py``, passed as ``-c`` source) either wrapped in
bubblewrap (``bwrap_command``) or run bare (mode ``rlimits-only``); ``child_setup`` is the
``preexec_fn`` that sets the rlimits in the forked child and, for bubblewrap, mounts the bounded
tmpfs mounts it binds; ``allocate_host_uid`` gives each sandbox the host uid it drops to when the
host runs as root.

Bounded tmpfs: bubblewrap 0.8 can cap a ``--tmpfs`` in bytes (``--size``) but not in inodes, and
empty files cost no bytes: 200,000 of them cost ~200 MiB of kernel memory. So the forked child,
already unprivileged, enters a user and mount namespace of its own (its uid mapped to itself),
mounts two tmpfs there with ``size=`` *and* ``nr_inodes=`` on the empty directories
``mount_points()`` made, and then execs bwrap, which binds them as the sandbox's ``/tmp`` and
``/dev/shm``. The mounts exist only in that namespace: nothing is mounted on the host, and the
host keeps one pair of empty directories per uid (mounting over the host's ``/tmp`` itself
would hide what a sandbox binds from under it).
"""

import contextlib
import ctypes
import itertools
import os
import resource
import secrets
import signal
import stat
import sys
import tempfile
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
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4
_CLONE_NEWUSER, _CLONE_NEWNS = 0x10000000, 0x00020000
_MS_NOSUID, _MS_NODEV = 2, 4
_libc = ctypes.CDLL(None, use_errno=True)  # resolved now: a forked child must not dlopen
_prctl, _unshare, _mount = _libc.prctl, _libc.unshare, _libc.mount
_SHM_MB, _SHM_INODES = 16, 256  # /dev/shm (bwrap mode), for multiprocessing's semaphores


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


def mount_points() -> tuple[str, str]:
    """The empty host directories each sandbox's bounded ``/tmp`` and ``/dev/shm`` are mounted
    on (in the sandbox's own mount namespace): one pair per host uid, kept, never written."""
    directory = os.path.join(tempfile.gettempdir(), f"eprl-sandbox-mounts-{os.geteuid()}")
    paths = [directory, os.path.join(directory, "tmp"), os.path.join(directory, "shm")]
    for path in paths:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)  # the sandbox's uid must reach the mount points
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise SandboxError(
                f"{path} is not a directory of uid {os.geteuid()} writable only by it; remove it "
                "(it only holds the sandboxes' mount points)"
            )
    return paths[1], paths[2]


def child_setup(
    config: SandboxConfig, max_processes: int, bounded_tmpfs: bool
) -> Callable[[], None]:
    """preexec_fn: rlimits in the forked child, the bounded tmpfs mounts that bubblewrap binds
    (``bounded_tmpfs``, see the module docstring), then a parent-death signal.

    The parent-death signal (SIGKILL) covers the window before bubblewrap's own
    ``--die-with-parent`` takes effect: a process that exits while a spare sandbox is being
    started would otherwise leave that bwrap behind, adopted by init, its namespace's init
    ignoring SIGTERM. It is survived by ``execve`` of a bwrap that is not set-uid; a parent that
    died before it was set is caught by comparing ``getppid()``. The signal follows the forking
    *thread*, hence ``session.spawn``'s long-lived spawner thread.

    Raw syscalls and fd writes only, so it is safe in the child of a threaded parent. It runs
    after ``subprocess`` has dropped the uid, which would otherwise clear the parent-death signal.
    """
    cpu = config.cpu_seconds
    memory = config.memory_mb << 20
    file_size = config.file_size_mb << 20
    tmp, shm = (os.fsencode(path) for path in mount_points())
    mounts = (
        (tmp, config.tmpfs_mb << 20, config.tmpfs_inodes),
        (shm, _SHM_MB << 20, _SHM_INODES),
    )

    parent = os.getpid()

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if bounded_tmpfs:
            _mount_bounded_tmpfs(mounts)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent is already gone: nobody would stop this sandbox
            os._exit(1)

    return apply


def _mount_bounded_tmpfs(mounts: tuple[tuple[bytes, int, int], ...]) -> None:
    uid, gid = os.getuid(), os.getgid()
    # The uid change made this process non-dumpable, which leaves /proc/self/*_map to root.
    _prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    if _unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER | CLONE_NEWNS) failed")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):  # fmt: skip
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    for target, size, inodes in mounts:
        options = f"size={size},nr_inodes={inodes},mode=1777".encode()
        if _mount(b"tmpfs", target, b"tmpfs", _MS_NOSUID | _MS_NODEV, options) != 0:
            raise OSError(ctypes.get_errno(), f"mounting a bounded tmpfs on {target!r} failed")


def bwrap_command(bwrap: str, python: str, config: SandboxConfig) -> list[str]:
    """The driver inside bubblewrap: a fresh read-only root holding only ``/usr`` (and the
    interpreter's prefix), private ``/tmp`` and ``/dev/shm``, no host namespace shared."""
    command = bwrap_root(bwrap, {"HOME": "/tmp"})
    prefix = str(Path(python).parent.parent)
    if not (prefix + "/").startswith("/usr/"):
        command += ["--ro-bind", prefix, prefix]
    command += bwrap_private_mounts("/tmp")
    return command + driver_command(python, config.max_output_chars, reap=True)


def bwrap_root(bwrap: str, env: dict[str, str]) -> list[str]:
    """The start of every sandbox's bwrap command: all namespaces unshared, a cleared
    environment holding only ``env`` (plus PATH and LANG), and a read-only ``/usr``.
    The caller adds its own binds, then ``bwrap_private_mounts``, then the command."""
    command = [
        bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session", "--clearenv",
        "--disable-userns", "--hostname", "sandbox",
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "LANG", "C.UTF-8",
    ]  # fmt: skip
    for name, value in env.items():
        command += ["--setenv", name, value]
    command += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):  # merged-/usr systems: /lib -> usr/lib
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    return command


def bwrap_private_mounts(chdir: str) -> list[str]:
    """``/proc``, ``/dev``, the bounded ``/tmp`` and ``/dev/shm``, a read-only root, uid 65534.

    ``/tmp`` and ``/dev/shm`` are the bounded tmpfs mounts ``child_setup`` made on
    ``mount_points()`` in the child's own mount namespace (bwrap resolves a bind's source
    there); on the host those directories stay empty."""
    tmp, shm = mount_points()
    return [
        "--proc", "/proc", "--dev", "/dev",
        "--bind", shm, "/dev/shm", "--bind", tmp, "/tmp",
        # the root and /dev are tmpfs mounts without a size cap: read-only, or they could fill RAM
        "--remount-ro", "/dev", "--remount-ro", "/",
        "--chdir", chdir,
        "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_GID),
    ]  # fmt: skip


def driver_command(python: str, max_output_chars: int, reap: bool) -> list[str]:
    """The driver's own command line (inside bwrap, or bare in mode ``rlimits-only``)."""
    reap_arg = "reap" if reap else "no-reap"
    return [python, "-I", "-S", "-X", "utf8", "-c", DRIVER_SOURCE, str(max_output_chars), reap_arg]
