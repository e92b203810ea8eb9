"""``eprl appworld setup | make-data | doctor``: plain functions the CLI wires (each returns an exit code).

- ``setup()``: checks the isolated AppWorld venv and unpacks AppWorld's apps into it when needed
  (``appworld install``, offline; it never creates the venv, ``make setup`` does), then downloads
  AppWorld's released data (``appworld download data``) into the AppWorld root unless data is
  already there. Without a route to AppWorld's data host it says so, changes nothing, and names
  the two ways on: copy the release from a connected machine, or ask for the generated world.
- ``make_data(out, seed, ...)``: runs the ``make_data`` package inside the AppWorld venv.
- ``doctor(root)``: what is installed, where the data is, and whether a server starts and runs
  a task.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
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
from envs.appworld.server import data_source

# Where appworld==0.1.3.post1 fetches its data bundle (appworld/download.py), for messages only.
RELEASE_HOST = "s3.us-west-2.amazonaws.com"
_UNREACHABLE = [  # the most telling first: the output holds several of them
    re.compile(pattern)
    for pattern in (
        r"Failed to resolve '[^']*'",
        r"Failed to download file\. Status code: \d+",
        r"Network is unreachable",
        r"Connection refused",
        r"Read timed out|Connect timeout|timed out after \d+ s",
        r"NameResolutionError|Max retries exceeded",
    )
]

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


def setup(python: str | None = None, root: str | None = None, download: bool = True) -> int:
    """Check the AppWorld venv; run ``appworld install`` there if its apps are not unpacked yet;
    then (``download``) fetch AppWorld's released data into ``root`` (default
    ``$APPWORLD_ROOT``, else ``$EPRL_CACHE_DIR/appworld``) unless data is already there."""
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
    if not unpacked:
        return 1
    if not download:
        print("data: not downloaded (--no-download).")
        return 0
    return download_release(executable, root)


def _data_root(root: str | None) -> Path:
    return Path(root or os.environ.get("APPWORLD_ROOT") or default_root()).expanduser().absolute()


def download_release(executable: Path, root: str | None = None) -> int:
    """``appworld download data`` into a staging folder beside the root, moved into place only
    once complete: AppWorld's own command deletes an existing ``data/`` before it downloads, and
    reports an HTTP failure with exit code 0, so neither may touch the root directly."""
    target = _data_root(root)
    if (target / "data" / "tasks").is_dir():
        source = data_source(target)
        print(f"data: {target}/data already holds {source} data; nothing downloaded.")
        if source == "appworld-generated":
            print(
                "      (the generated offline world, not AppWorld's benchmark: move it away and "
                "rerun `eprl appworld setup` to fetch the release)"
            )
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-download-", dir=target.parent))
    command = [str(executable.parent / "appworld"), "download", "data", "--root", str(staging)]
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    print(f"downloading AppWorld's released data into {target}/data (`appworld download data`) ...")
    try:
        try:
            result = subprocess.run(
                command, env=env, cwd=staging, capture_output=True, text=True, timeout=1800
            )
            output, returncode = result.stdout + result.stderr, result.returncode
        except subprocess.TimeoutExpired:
            output, returncode = "timed out after 1800 s", -1
        if returncode == 0 and (staging / "data" / "tasks").is_dir():
            target.mkdir(parents=True, exist_ok=True)
            os.replace(staging / "data", target / "data")
            tasks = sum(1 for _ in (target / "data" / "tasks").iterdir())
            print(f"data: AppWorld's released data ({tasks} tasks) ready in {target}/data.")
            return 0
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    flat = " ".join(output.split())  # AppWorld's rich traceback wraps lines anywhere
    found = (pattern.search(flat) for pattern in _UNREACHABLE)
    reason = next((match.group(0) for match in found if match), None)
    if reason and reason.startswith("Failed to download file"):
        cause = f"AppWorld's data host ({RELEASE_HOST}) refused the download"
    elif reason:
        cause = f"AppWorld's data host ({RELEASE_HOST}) cannot be reached from this machine"
    else:
        cause = f"`appworld download data` failed (exit code {returncode})"
    detail = reason or (flat[-300:] or "no output")
    print(
        f"data: NOT DOWNLOADED. {cause}: {detail}\n"
        f"      Nothing was changed under {target}. Either copy the release from a connected "
        f"machine (`appworld download data --root DIR` there, then DIR/data to {target}/data), "
        f"or, for a small offline world (generated tasks, not AppWorld's benchmark), run "
        f"`eprl appworld make-data --out {target}`."
    )
    return 1


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
