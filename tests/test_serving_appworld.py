"""An AppWorld episode through the service: the real engine, in the isolated venv, behind a worker.

The operator pins AppWorld's `root` (clients may not choose server paths); the dataset is
generated offline for the module (``eprl appworld make-data``).
"""

import importlib.util

import gymnasium
import pytest
from serving_server import REPO, running_service

import envs  # noqa: F401  (registers the ids)

APPWORLD = "eprl/AppWorld-v0"


def _appworld_missing() -> str | None:
    if importlib.util.find_spec("envs.appworld") is None:
        return "needs envs/appworld (the AppWorld environment)"
    from envs.appworld import AppWorldRuntimeError
    from envs.appworld.runtime import resolve_python

    try:
        resolve_python()
    except AppWorldRuntimeError:
        return f"needs the AppWorld venv ({REPO / '.venv-appworld'}): run `make setup`"
    return None


MISSING = _appworld_missing()
pytestmark = [
    pytest.mark.appworld,
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


def test_remote_appworld_episode(appworld_root, tmp_path):
    pinned = {APPWORLD: {"root": str(appworld_root), "python": None, "server_urls": None}}
    local = gymnasium.make(APPWORLD, root=str(appworld_root))  # no server until reset
    with running_service(tmp_path, pinned_env_kwargs=pinned) as service:
        remote = gymnasium.make(
            "eprl/Remote-v0", url=service.url, env_id=APPWORLD, env_kwargs={"max_servers": 1}
        )
        assert remote.observation_space == local.observation_space
        assert remote.unwrapped.splits == local.unwrapped.splits
        task_id = remote.unwrapped.task_ids("train")[0]
        assert remote.unwrapped.task_ids("train") == local.unwrapped.task_ids("train")

        observation, info = remote.reset(seed=0, options={"task_id": task_id})
        assert info["task_id"] == task_id and info["turn"] == 0
        assert "apis." in observation  # the agent protocol is in the prompt
        solution = (
            appworld_root / "data" / "tasks" / task_id / "ground_truth" / "solution.py"
        ).read_text()
        observation, reward, terminated, truncated, info = remote.step(
            f"```python\n{solution}\nsolution(apis, requester)\n```"
        )
        assert (reward, terminated, truncated, info["success"]) == (1.0, True, False, True)

        # an episode the client cuts is still graded, remotely: the tests on the last state
        remote.reset(seed=1, options={"task_id": task_id})
        remote.step("```python\nprint(apis.api_docs.show_app_descriptions())\n```")
        reward, info = remote.unwrapped.truncate("max_turns")
        assert info["truncation_reason"] == "max_turns" and not info["success"]
        assert info["tests_total"] >= 1 and info["tests_passed"] < info["tests_total"]
        assert reward == pytest.approx(info["tests_passed"] / info["tests_total"])
        with pytest.raises(Exception, match="reset"):
            remote.step("```python\nprint(1)\n```")  # that episode is over
        remote.close()
    local.close()
