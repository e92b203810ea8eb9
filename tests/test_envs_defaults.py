"""``env.unwrapped.defaults``: the budgets each environment declares (``envs/defaults.py``).

Cheap: making the environments starts no sandbox and no AppWorld server, so these tests need
neither bubblewrap (CodeExec is made in mode rlimits-only) nor the AppWorld venv (AppWorld gets
an empty data root).
"""

import os

import gymnasium
import pytest

import envs  # noqa: F401  (registers the ids)
from envs.defaults import DEFAULT_KEYS, env_defaults


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, (1, 96, 2048)),
        ({"max_turns": 4}, (4, 96, 8192)),
        ({"task_set": "humaneval"}, (1, 512, 2048)),
        ({"task_set": "humaneval", "max_turns": 3}, (3, 512, 16384)),
    ],
    ids=["procedural", "procedural-multi-turn", "humaneval", "humaneval-multi-turn"],
)
def test_codeexec_declares_its_budgets(kwargs, expected):
    env = gymnasium.make("eprl/CodeExec-v0", sandbox={"mode": "rlimits-only"}, **kwargs)
    defaults = env.unwrapped.defaults
    assert tuple(defaults) == DEFAULT_KEYS and env_defaults(env) == defaults
    assert (defaults["max_turns"], defaults["max_new_tokens"], defaults["max_context_tokens"]) == (
        expected
    )
    assert defaults["max_parallel_episodes"] is None
    env.close()


@pytest.mark.parametrize(
    ("kwargs", "turns", "parallel"),
    [
        ({}, 40, os.cpu_count() or 1),
        ({"max_turns": 50, "max_servers": 3}, 50, 3),
        ({"server_urls": ["http://127.0.0.1:9", "http://127.0.0.1:10"], "max_servers": 5}, 40, 2),
    ],
    ids=["default", "max-servers", "server-urls"],
)
def test_appworld_declares_its_budgets(tmp_path, kwargs, turns, parallel):
    (tmp_path / "data" / "tasks").mkdir(parents=True)
    (tmp_path / "data" / "datasets").mkdir()
    (tmp_path / "data" / "datasets" / "train.txt").write_text("")
    env = gymnasium.make("eprl/AppWorld-v0", root=str(tmp_path), **kwargs)
    assert env.unwrapped.defaults == {
        "max_turns": turns,
        "max_new_tokens": 1500,
        "max_context_tokens": 16384,
        "max_parallel_episodes": parallel,
    }
    assert env_defaults(env) == env.unwrapped.defaults
    env.close()
