"""Shared parts of the AppWorld environment tests (``tests/test_envs_appworld*.py``): the marks,
the generated data's scenarios, a module-wide environment, and the cells the tests send.

The dataset is generated once per session (``eprl appworld make-data``, the ``appworld_root``
fixture of conftest.py) into a temporary root; one environment per test module keeps a warm
server pool, so most tests pay ~0.5 s per episode.
"""

import json
from pathlib import Path

import gymnasium as gym
import psutil
import pytest

import envs  # noqa: F401  (registers the ids)
from envs.appworld import AppWorldRuntimeError
from envs.appworld.runtime import resolve_python

REPO = Path(__file__).resolve().parents[1]

try:
    resolve_python()
    HAVE_APPWORLD = True
except AppWorldRuntimeError:
    HAVE_APPWORLD = False

APPWORLD_MARKS = [
    pytest.mark.appworld,
    pytest.mark.skipif(
        not HAVE_APPWORLD,
        reason="needs the AppWorld venv (.venv-appworld): run `make setup` "
        "or set EPRL_APPWORLD_VENV",
    ),
]

# Cells an agent could send. AppWorld's own guard reads the code's text (it bans `open`,
# `os.listdir`, `import socket`, ...) and swaps functions such as `os.fork`, `os.kill` or
# `Path.read_bytes` for no-ops while a cell runs; `__import__` and the `posix` module get past
# both, so each probe uses them and only the sandbox stands in the way.
READ = "P = __import__('posix')\ndef read(path):\n    fd = P.open(path, P.O_RDONLY)\n    return P.read(fd, 1 << 20)\n"


def load_scenarios(appworld_root: Path) -> dict[str, dict]:
    """scenario id -> {name, difficulty, apps, split} as written by the generator."""
    return json.loads((appworld_root / "data" / "eprl_generated.json").read_text())["scenarios"]


def task_of(scenarios: dict, name: str, n: int = 1) -> str:
    return next(f"{sid}_{n}" for sid, meta in scenarios.items() if meta["name"] == name)


def module_env(appworld_root: Path):
    """One environment for a test module (a generator for its fixture): its (shared) server
    pool stays warm between the module's tests."""
    environment = gym.make("eprl/AppWorld-v0", root=str(appworld_root), max_servers=2)
    yield environment
    environment.close()


def solution_action(root: Path, task_id: str) -> str:
    code = (root / "data" / "tasks" / task_id / "ground_truth" / "solution.py").read_text()
    return f"I will run the reference solution.\n```python\n{code}\nsolution(apis, requester)\n```"


def run_cell(env, code: str):
    return env.step(f"```python\n{code}\n```")


def next_episode_is_normal(env, root: Path, scenarios) -> None:
    """A fresh episode after an attack: the reference solution scores 1.0."""
    task_id = task_of(scenarios, "venmopay", 3)
    env.reset(options={"task_id": task_id})
    obs, reward, terminated, truncated, info = env.step(solution_action(root, task_id))
    assert (reward, terminated, info["success"]) == (1.0, True, True), obs[-500:]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def sleeping(marker: str) -> bool:
    """Whether a `sleep <marker>` process runs anywhere on the host."""
    return any(
        (process.info["cmdline"] or [])[-1:] == [marker]
        for process in psutil.process_iter(["cmdline"])
    )
