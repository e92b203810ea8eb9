"""``eprl appworld setup | make-data | doctor``: plain functions the CLI wires (each returns an exit code).

- ``setup()``: checks the isolated AppWorld venv and unpacks AppWorld's apps into it when needed
  (``appworld install``, offline); it never creates the venv (``make setup`` does).
- ``make_data(out, seed, ...)``: runs the ``make_data`` package inside the AppWorld venv.
- ``doctor(root)``: what is installed, where the data is, and whether a server starts and runs
  a task.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from envs.appworld.runtime import (
    APPWORLD_VERSION,
    AppWorldRuntime,
    AppWorldRuntimeError,
    default_root,
    resolve_python,
    resolve_root,
)

# The generator runs as the top-level package ``make_data`` from this folder (``-m`` puts the
# working directory on the path): ``-m envs.appworld.make_data`` would import ``envs``, which
# needs gymnasium, absent from the AppWorld venv.
MAKE_DATA_CWD = Path(__file__).parent

# Run by the AppWorld venv's python: version, package folder, and whether the apps are unpacked.
_PROBE = (
    "import importlib.metadata as m, importlib.util as u, os;"
    "s = u.find_spec('appworld'); d = os.path.dirname(s.origin) if s else '';"
    "print(m.version('appworld') if s else '');"
    "print(d);"
    "print(os.path.isfile(os.path.join(d, 'apps', 'spotify', 'apis.py')))"
)


def _probe(python: Path) -> tuple[str, str, bool]:
    """(installed appworld version or '', package folder, apps unpacked?) in that venv."""
    result = subprocess.run(
        [str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        return "", "", False
    version, folder, unpacked = (result.stdout.splitlines() + ["", "", "False"])[:3]
    return version, folder, unpacked == "True"


def setup(python: str | None = None) -> int:
    """Check the AppWorld venv; run ``appworld install`` there if its apps are not unpacked yet."""
    try:
        executable = resolve_python(python)
    except AppWorldRuntimeError as error:
        print(f"AppWorld venv: missing. {error}")
        return 1
    version, folder, unpacked = _probe(executable)
    if not version:
        print(
            f"AppWorld venv at {executable}: `appworld` is not installed there; run "
            f"`{executable} -m pip install appworld=={APPWORLD_VERSION}` (or `make setup`)."
        )
        return 1
    if not unpacked:
        appworld_cli = executable.parent / "appworld"
        print(f"unpacking AppWorld's apps into {folder} (`appworld install`, offline) ...")
        result = subprocess.run([str(appworld_cli), "install"], timeout=900)
        if result.returncode != 0:
            print(f"`{appworld_cli} install` failed with exit code {result.returncode}")
            return result.returncode
        version, folder, unpacked = _probe(executable)
    print(f"AppWorld {version} ready in {executable.parent.parent} (apps unpacked: {unpacked}).")
    if version != APPWORLD_VERSION:
        print(f"warning: eprl is tested with appworld=={APPWORLD_VERSION}, found {version}")
    print(
        "Next: `eprl appworld make-data` (offline data) or set APPWORLD_ROOT to AppWorld's released data."
    )
    return 0 if unpacked else 1


def make_data(
    out: str | None = None,
    seed: int = 0,
    tasks_per_scenario: int = 3,
    validate: bool = False,
    python: str | None = None,
) -> int:
    """Generate the offline dataset under ``out/data`` (default ``$EPRL_CACHE_DIR/appworld``).

    ``validate`` also runs every reference solution (and a no-op) through AppWorld, ~2 s a task.
    """
    try:
        executable = resolve_python(python)
    except AppWorldRuntimeError as error:
        print(error)
        return 1
    target = Path(out).expanduser().absolute() if out else default_root()
    command = [
        str(executable),
        "-m",
        "make_data",
        "--out",
        str(target),
        "--seed",
        str(seed),
        "--tasks-per-scenario",
        str(tasks_per_scenario),
    ] + (["--validate"] if validate else [])
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    returncode = subprocess.run(command, env=env, cwd=MAKE_DATA_CWD).returncode
    if returncode == 0 and target != default_root() and not os.environ.get("APPWORLD_ROOT"):
        print(
            f"use it with APPWORLD_ROOT={target} or gymnasium.make('eprl/AppWorld-v0', root='{target}')"
        )
    return returncode


def doctor(root: str | None = None, python: str | None = None) -> int:
    """Print what is installed, where the data is, and whether a server starts and runs a task."""
    problems = 0
    try:
        executable = resolve_python(python)
        version, folder, unpacked = _probe(executable)
        print(f"AppWorld venv : {executable}")
        print(f"appworld      : {version or 'NOT INSTALLED'} (eprl expects {APPWORLD_VERSION})")
        print(
            f"apps unpacked : {unpacked} ({folder or '-'}){'' if unpacked else '  -> run `eprl appworld setup`'}"
        )
        problems += 0 if version and unpacked else 1
    except AppWorldRuntimeError as error:
        print(f"AppWorld venv : MISSING. {error}")
        return 1
    try:
        data_root = resolve_root(root)
    except AppWorldRuntimeError as error:
        print(f"data          : MISSING. {error}")
        return 1
    from envs.appworld.env import splits_of, task_ids_of
    from envs.appworld.sealed import install_task

    generated = (data_root / "data" / "eprl_generated.json").is_file()
    splits = {split: len(task_ids_of(data_root, split)) for split in splits_of(data_root)}
    print(
        f"data          : {data_root}/data ({'generated by eprl' if generated else 'AppWorld release'}); "
        f"splits {splits}"
    )
    if not splits:
        print("               no split files under data/datasets")
        return 1
    first_split = next(split for split, n in splits.items() if n)
    task_id = task_ids_of(data_root, first_split)[0]
    runtime = AppWorldRuntime(data_root, executable, max_servers=1)
    try:
        start = time.perf_counter()
        server = runtime.acquire()
        print(f"server        : started {server} in {time.perf_counter() - start:.1f}s")
        start = time.perf_counter()
        install_task(data_root, server.directory, task_id)
        server.call(
            "initialize",
            timeout_s=300.0,
            task_id=task_id,
            experiment_name="eprl_doctor",
            load_ground_truth=False,
        )
        initialized = time.perf_counter() - start
        output = server.call(
            "execute",
            timeout_s=120.0,
            task_id=task_id,
            code="print(apis.supervisor.show_profile()['email'])",
        )
        report = runtime.evaluate(server, task_id, "eprl_doctor", timeout_s=300.0)
        runtime.release(server)
        print(
            f"task          : {task_id} initialised in {initialized:.1f}s; a cell printed {output.strip()!r}; "
            f"evaluation ran {report['num_tests']} tests"
        )
    except AppWorldRuntimeError as error:
        print(f"server        : FAILED. {error}")
        problems += 1
    finally:
        runtime.close()
    print("doctor: all good" if not problems else f"doctor: {problems} problem(s)")
    return 0 if not problems else 1
