"""The code sandbox (envs/sandbox/): REPL semantics, and every escape attempt contained.

Needs bubblewrap (`apt-get install bubblewrap`, done by `make setup`); without it the bwrap tests
(those using the ``bwrap`` fixture of conftest.py) skip and the rlimits-only and missing-bwrap
tests still run.
"""

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from envs.sandbox import (
    BubblewrapMissingError,
    PythonSandbox,
    SandboxConfig,
    find_python,
    run_once,
)

needs_bwrap = pytest.mark.usefixtures("bwrap")
FAST = SandboxConfig(cell_timeout_s=5, cpu_seconds=10)


@pytest.fixture
def sandbox(bwrap):
    with PythonSandbox(FAST) as box:
        yield box


def _processes_matching(text: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if text in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def _gone(pids: list[int], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return True
        time.sleep(0.05)
    return False


# REPL semantics ---------------------------------------------------------------------------
@needs_bwrap
def test_state_persists_across_cells(sandbox):
    assert sandbox.run_cell("x = 2\nprint('set')").output == "set\n"
    result = sandbox.run_cell("x * 21")
    assert result.ok and result.value == "42"
    assert sandbox.run_cell("import os; os.system('echo from a subprocess')").output == (
        "from a subprocess\n"
    )


@needs_bwrap
def test_a_crashing_cell_keeps_the_session(sandbox):
    sandbox.run_cell("kept = [1, 2]")
    crash = sandbox.run_cell("print('before')\n1 / 0")
    assert not crash.ok and not crash.session_lost
    assert crash.output == "before\n"
    assert "ZeroDivisionError" in crash.error and 'File "<cell 2>", line 2' in crash.error
    syntax = sandbox.run_cell("def broken(:\n    pass")
    assert "SyntaxError" in syntax.error and "ast.py" not in syntax.error
    assert "SystemExit" in sandbox.run_cell("raise SystemExit(3)").error
    assert sandbox.run_cell("kept").value == "[1, 2]"


@needs_bwrap
def test_sandbox_runs_as_nobody_with_a_clean_environment(sandbox):
    result = sandbox.run_cell("import os, sys; print(os.getuid(), os.getgid(), os.getcwd())\n"
                              "dict(os.environ), sys.path")  # fmt: skip
    assert result.output == "65534 65534 /tmp\n"
    assert "HOME" in result.value and "/work" not in result.value and "venv" not in result.value


def test_find_python_is_readable_by_the_sandbox_uid():
    python = find_python()
    assert os.path.isfile(python)
    if os.geteuid() == 0:  # the sandbox drops to uid 65534: every parent must be o+x
        assert all(p.stat().st_mode & 0o001 for p in Path(python).resolve().parents)


# escapes ----------------------------------------------------------------------------------
@needs_bwrap
def test_no_network(sandbox):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        external = sandbox.run_cell(
            "import socket; socket.create_connection(('1.1.1.1', 80), timeout=3)"
        )
        assert "Network is unreachable" in external.error
        host_loopback = sandbox.run_cell(
            f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=3)"
        )
        assert "ConnectionRefusedError" in host_loopback.error  # the sandbox has its own lo
        dns = sandbox.run_cell("import socket; socket.gethostbyname('pypi.org')")
        assert "gaierror" in dns.error
    finally:
        server.close()


@needs_bwrap
@pytest.mark.parametrize(
    "path", ["/etc/shadow", "/etc/passwd", __file__, "/work", "/root", os.path.expanduser("~")]
)
def test_host_files_are_invisible(sandbox, path):
    result = sandbox.run_cell(f"import os; os.stat({path!r})")
    assert "FileNotFoundError" in result.error


@needs_bwrap
def test_writes_stay_inside(sandbox):
    name = f"eprl-escape-{uuid.uuid4().hex}"
    for target in ("/usr/x", f"/{name}", f"/dev/{name}"):
        assert "Read-only file system" in sandbox.run_cell(f"open({target!r}, 'w')").error
    assert sandbox.run_cell(f"open('/tmp/{name}', 'w').write('x')").ok
    assert not os.path.exists(f"/tmp/{name}")  # the sandbox's /tmp is a private tmpfs
    fill = sandbox.run_cell(  # each file under RLIMIT_FSIZE, together over the tmpfs size
        "for i in range(10):\n    open(f'/tmp/fill{i}', 'wb').write(b'0' * (15 << 20))"
    )
    assert "No space left on device" in fill.error
    big = sandbox.run_cell("open('/dev/shm/big', 'wb').write(b'0' * (64 << 20))")
    assert "No space left on device" in big.error or "File too large" in big.error


@needs_bwrap
def test_an_inode_bomb_stops_at_the_inode_limit():
    """Empty files cost no bytes, so a size cap alone let one cell make 200,000 of them (~200 MiB
    of kernel memory); /tmp and /dev/shm are now capped in inodes too (the root holds one)."""
    bomb = (
        "import errno, os\nmade = 0\ntry:\n    while made < 100_000:\n"
        "        open(DIR + f'/f{made}', 'w').close()\n        made += 1\n"
        "except OSError as error:\n    print(made, errno.errorcode[error.errno])"
    )
    with PythonSandbox(SandboxConfig(cell_timeout_s=20, tmpfs_inodes=500)) as box:
        assert box.run_cell(bomb.replace("DIR", "'/tmp'")).output == "499 ENOSPC\n"
        assert box.run_cell(bomb.replace("DIR", "'/dev/shm'")).output == "255 ENOSPC\n"
        mounts = box.run_cell("print(open('/proc/self/mounts').read())").output
        assert "nr_inodes=500" in mounts and "nr_inodes=256" in mounts
        assert box.run_cell("import os; os.remove('/tmp/f0'); open('/tmp/x', 'w')").ok


@needs_bwrap
def test_file_size_limit():
    with PythonSandbox(SandboxConfig(file_size_mb=1, tmpfs_mb=64)) as box:
        assert (
            "File too large" in box.run_cell("open('/tmp/f', 'wb').write(b'0' * (2 << 20))").error
        )


@needs_bwrap
def test_fork_bomb_is_contained(sandbox):
    result = sandbox.run_cell("import os\nwhile True:\n    os.fork()")
    assert "Resource temporarily unavailable" in result.error and not result.session_lost
    after = sandbox.run_cell("import os; len([p for p in os.listdir('/proc') if p.isdigit()])")
    assert after.ok and int(after.value) <= 3  # bwrap's init, the driver (+ the listing)
    assert len(psutil.Process(sandbox.pid).children(recursive=True)) == 2


@needs_bwrap
def test_memory_bomb_is_contained(sandbox):
    assert "MemoryError" in sandbox.run_cell("x = bytearray(8 << 30)").error
    grow = sandbox.run_cell("chunks = []\nwhile True:\n    chunks.append(b' ' * (16 << 20))")
    assert "MemoryError" in grow.error and not grow.session_lost
    assert sandbox.run_cell("del chunks; print('alive')").output == "alive\n"


@needs_bwrap
def test_infinite_loop_times_out_and_the_session_restarts():
    with PythonSandbox(SandboxConfig(cell_timeout_s=1)) as box:
        box.run_cell("state = 1")
        first_pid = box.pid
        child_pids = [p.pid for p in psutil.Process(first_pid).children(recursive=True)]
        loop = box.run_cell(
            "import subprocess; subprocess.Popen(['sleep', '300'])\nwhile True: pass"
        )
        assert loop.timed_out and loop.session_lost
        assert "wall-clock limit of 1 s" in loop.render() and "variables" in loop.render()
        assert _gone([first_pid, *child_pids])
        after = box.run_cell("print(state)")
        assert "NameError" in after.error and box.starts == 2


@needs_bwrap
def test_cpu_time_limit_kills_the_session():
    with PythonSandbox(SandboxConfig(cpu_seconds=1, cell_timeout_s=20)) as box:
        result = box.run_cell("while True: pass")
        assert result.crashed and ("SIGXCPU" in result.detail or "SIGKILL" in result.detail)
        assert box.run_cell("print('fresh')").output == "fresh\n"


@needs_bwrap
def test_huge_output_is_capped(sandbox):
    cap = sandbox.config.max_output_chars
    python_level = sandbox.run_cell("for _ in range(50):\n    print('y' * 1_000_000)")
    assert python_level.ok and len(python_level.output) == cap
    assert python_level.dropped_bytes == 50 * 1_000_001 - cap
    fd_level = sandbox.run_cell("import os; os.system('yes | head -c 30000000')")
    assert len(fd_level.output) == cap and fd_level.dropped_bytes > 29_000_000
    long_value = sandbox.run_cell("'z' * 10_000_000")
    assert len(long_value.value) < cap + 100 and "truncated" in long_value.value


@needs_bwrap
def test_a_forged_oversized_reply_is_refused(sandbox):
    # The cell writes a header announcing 1 GiB straight onto the protocol pipe.
    result = sandbox.run_cell(
        "import gc, os, struct\n"
        "driver = next(o for o in gc.get_objects() if type(o).__name__ == 'Driver')\n"
        "os.write(driver.protocol_out, struct.pack('>I', 1 << 30))\n"
        "import time; time.sleep(30)"
    )
    assert result.crashed and "protocol error" in result.detail
    assert sandbox.run_cell("print('fresh')").output == "fresh\n"


@needs_bwrap
def test_killing_the_parent_is_contained(sandbox):
    parent = sandbox.run_cell("import os, signal; os.kill(os.getppid(), signal.SIGKILL); 'alive'")
    assert parent.value == "'alive'"  # the sandbox's init ignores it
    everyone = sandbox.run_cell("import os; os.system('kill -9 -1')")
    # kill -1 reaches only the sandbox's own PID namespace: at worst the session restarts
    assert everyone.ok or (everyone.crashed and "SIGKILL" in everyone.detail)
    assert sandbox.run_cell("print('fresh')").output == "fresh\n"
    assert psutil.Process().is_running()


@needs_bwrap
def test_segfault_and_exit_restart_the_session(sandbox):
    segv = sandbox.run_cell("import ctypes; ctypes.string_at(0)")
    assert segv.crashed and "SIGSEGV" in segv.detail
    exit_ = sandbox.run_cell("import os; os._exit(7)")
    assert exit_.crashed and "status 7" in exit_.detail
    assert sandbox.run_cell("print('fresh')").output == "fresh\n"


@needs_bwrap
def test_no_background_process_outlives_its_cell_or_close():
    marker = 900_000 + uuid.uuid4().int % 99_999
    box = PythonSandbox(FAST)
    started = box.run_cell(f"import subprocess; subprocess.Popen(['sleep', '{marker}'])")
    assert started.ok and not _processes_matching(f"sleep {marker}")  # reaped at cell end
    # A timer thread starts processes after its cell ended: a plain child and a daemon that
    # left the session (setsid + double fork). Both are alive until close().
    later = box.run_cell(
        "import os, subprocess, threading\n"
        "def spawn():\n"
        f"    subprocess.Popen(['sleep', '{marker + 1}'])\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        if os.fork() == 0:\n"
        f"            os.execvp('sleep', ['sleep', '{marker + 2}'])\n"
        "        os._exit(0)\n"
        "threading.Timer(0.3, spawn).start()"
    )
    assert later.ok

    def both_running() -> bool:
        return all(_processes_matching(f"sleep {marker + i}") for i in (1, 2))

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not both_running():
        time.sleep(0.05)
    assert both_running()
    pids = [box.pid, *(p.pid for p in psutil.Process(box.pid).children(recursive=True))]
    box.close()
    assert _gone(pids)
    assert not any(_processes_matching(f"sleep {marker + i}") for i in (1, 2))


@needs_bwrap
def test_timeout_kills_what_the_cell_started():
    marker = 900_000 + uuid.uuid4().int % 99_999
    box = PythonSandbox(SandboxConfig(cell_timeout_s=1))
    code = f"import subprocess; subprocess.Popen(['sleep', '{marker}'])\nwhile True: pass"
    assert box.run_cell(code).timed_out
    assert not _processes_matching(f"sleep {marker}")
    box.close()
    box.close()  # twice is fine


@needs_bwrap
def test_a_sandbox_started_by_a_short_lived_thread_survives_it():
    # bwrap's --die-with-parent follows the thread that forked it; sandboxes spawn from one
    # long-lived thread so that a worker thread exiting does not kill them.
    holder = {}
    thread = threading.Thread(target=lambda: holder.setdefault("box", PythonSandbox(FAST)).start())
    thread.start()
    thread.join()
    time.sleep(0.2)
    with holder["box"] as box:
        assert box.alive and box.run_cell("print('ok')").output == "ok\n" and box.starts == 1


@needs_bwrap
def test_run_once_uses_a_fresh_sandbox():
    assert run_once("print(1 + 1)", FAST).output == "2\n"
    assert run_once("x = 1", FAST).ok
    assert "NameError" in run_once("x", FAST).error


# modes ------------------------------------------------------------------------------------
def test_missing_bwrap_refuses_with_install_hint(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(BubblewrapMissingError, match="apt-get install bubblewrap"):
        PythonSandbox(SandboxConfig(mode="bwrap"))


def test_rlimits_only_mode_warns_at_every_start(caplog):
    config = SandboxConfig(mode="rlimits-only", cell_timeout_s=2)
    with caplog.at_level(logging.WARNING, logger="envs.sandbox"), PythonSandbox(config) as box:
        assert box.run_cell("x = 6").ok
        assert box.run_cell("x * 7").value == "42"
        assert box.run_cell("while True: pass").timed_out
        assert box.run_cell("print('restarted')").output == "restarted\n"
        pid = box.pid
    warnings = [r for r in caplog.records if "rlimits-only" in r.getMessage()]
    assert len(warnings) == 2
    assert _gone([pid])


def test_rlimits_only_still_limits_memory_and_processes():
    config = SandboxConfig(mode="rlimits-only", cell_timeout_s=5)
    with PythonSandbox(config) as box:
        assert "MemoryError" in box.run_cell("x = bytearray(8 << 30)").error
        for _ in range(20):  # children killed after their cell must not pile up as zombies
            assert box.run_cell("import subprocess; subprocess.Popen(['sleep', '60'])").ok
        if os.geteuid() == 0:  # RLIMIT_NPROC binds once the uid is dropped
            bomb = box.run_cell("import os\nwhile True:\n    os.fork()")
            assert "Resource temporarily unavailable" in bomb.error
        assert box.run_cell("print('alive')").output == "alive\n"


def test_config_validation():
    with pytest.raises(ValueError, match="mode must be one of"):
        SandboxConfig(mode="docker")
    with pytest.raises(ValueError, match="unknown sandbox settings"):
        SandboxConfig.from_dict({"memory": 1})
    assert SandboxConfig.from_dict({"memory_mb": 256}).memory_mb == 256
    with pytest.raises(ValueError, match="tmpfs_inodes must be an int >= 1, got 0"):
        SandboxConfig(tmpfs_inodes=0)


@needs_bwrap
def test_many_concurrent_sandboxes_each_get_their_own_process_budget():
    """RLIMIT_NPROC counts processes per uid host-wide: with one shared uid, the 5th live sandbox
    failed to start at the default max_processes=16. Each sandbox now has its own host uid."""
    from envs.sandbox import PythonSandbox, SandboxConfig

    boxes = [PythonSandbox(SandboxConfig()) for _ in range(10)]
    try:
        outputs = [box.run_cell("print(6 * 7)").output for box in boxes]
        assert outputs == ["42\n"] * 10
        if os.geteuid() == 0:
            assert len({box.host_uid for box in boxes}) == 10
    finally:
        for box in boxes:
            box.close()


# work directories of killed processes ------------------------------------------------------
SWEEP_PROBE = """
import sys, time
from envs.sandbox import PythonSandbox, SandboxConfig
box = PythonSandbox(SandboxConfig(mode="rlimits-only", cell_timeout_s=30))
box.run_cell("x = 1")
print(box._workdir, flush=True)
time.sleep(600)
"""


def test_a_sigkilled_sessions_work_directory_is_swept_by_the_next_one(tmp_path):
    """An rlimits-only session keeps a HOME on the host; SIGKILL skips close() and finalizers,
    so the directory stays until the next session in this pid namespace removes it."""
    import subprocess
    import sys

    from envs.sandbox.workdirs import owned_tempdir, owner_alive, sweep_stale

    repo = Path(__file__).resolve().parents[1]
    victim = subprocess.Popen(
        [sys.executable, "-c", SWEEP_PROBE], stdout=subprocess.PIPE, text=True, cwd=repo
    )
    left = Path(victim.stdout.readline().strip())
    victim.kill()
    victim.wait()
    victim.stdout.close()
    assert left.is_dir() and owner_alive(left.name, "eprl-sandbox-") is False
    mine = owned_tempdir("eprl-sandbox-")  # what the next session does first
    try:
        assert not left.exists()
        assert owner_alive(mine.name, "eprl-sandbox-") is True
        assert mine not in sweep_stale("eprl-sandbox-") and mine.is_dir()  # a live owner's stays
    finally:
        mine.rmdir()
    foreign = [
        tmp_path / "eprl-sandbox-1-2-3-x",  # another pid namespace
        tmp_path / "eprl-sandbox-handmade",  # not named after an owner
    ]
    for path in foreign:
        path.mkdir()
    assert sweep_stale("eprl-sandbox-", tmp_path) == [] and all(p.is_dir() for p in foreign)


# a parent that dies while its sandbox is being started -----------------------------------------
ORPHAN_PROBE = """
import subprocess, sys, time
from envs.sandbox import SandboxConfig
from envs.sandbox.launch import child_setup
apply = child_setup(SandboxConfig(), 64, False)
pid_file = sys.argv[1]

def setup():  # stands still between fork and the sandbox's setup, until the parent is gone
    with open(pid_file + ".tmp", "w") as handle:
        handle.write(str(__import__("os").getpid()))
    __import__("os").rename(pid_file + ".tmp", pid_file)
    time.sleep(1.5)
    apply()

subprocess.Popen(["sleep", "300"], preexec_fn=setup)
"""


def test_a_sandbox_whose_parent_died_before_its_setup_does_not_start(tmp_path):
    """The window before the parent-death signal is set (a process exiting while a spare
    sandbox starts): the child, adopted by init by then, must exit instead of exec'ing."""
    import subprocess
    import sys

    pid_file = tmp_path / "child.pid"
    repo = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_PROBE, str(pid_file)], cwd=repo)
    deadline = time.monotonic() + 60
    while not pid_file.exists():
        assert parent.poll() is None and time.monotonic() < deadline, "the probe did not fork"
        time.sleep(0.01)
    child = psutil.Process(int(pid_file.read_text()))
    parent.kill()
    parent.wait()
    try:
        child.wait(timeout=30)  # exits once its setup sees the parent gone
    except psutil.TimeoutExpired:
        cmdline = child.cmdline()
        child.kill()
        pytest.fail(f"the orphaned child ran on as {cmdline}")


FORK_PROBE = """
import os, sys
from envs.sandbox import run_once
assert run_once("print(1)").output.strip() == "1"  # the spawner thread now exists here
pid = os.fork()
if pid == 0:
    os._exit(0 if run_once("print(2)").output.strip() == "2" else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_child_can_start_sandboxes():
    """A process forked after its parent started a sandbox inherits the spawner without its
    thread; starting a sandbox there must not wait forever."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", FORK_PROBE], cwd=repo, timeout=60)
    assert done.returncode == 0
