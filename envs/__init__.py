"""eprl environments: plain Gymnasium environments for multi-turn tool use.

``import envs`` registers the ids, after which anyone's code can call
``gymnasium.make("eprl/CodeExec-v0")``, ``gymnasium.make("eprl/AppWorld-v0")`` or
``gymnasium.make("eprl/Remote-v0", url=..., env_id=...)``. Entry points are strings, so nothing
heavy is imported until an environment is made.
"""

from gymnasium.envs.registration import register, registry

ENV_IDS = ("eprl/CodeExec-v0", "eprl/AppWorld-v0", "eprl/Remote-v0")

_ENTRY_POINTS = {
    "eprl/CodeExec-v0": "envs.codeexec:CodeExecEnv",
    "eprl/AppWorld-v0": "envs.appworld:AppWorldEnv",
    "eprl/Remote-v0": "serving.client:RemoteEnv",
}

for _env_id, _entry_point in _ENTRY_POINTS.items():
    if _env_id not in registry:
        # episodes end by the env's own turn limit (truncated); no TimeLimit wrapper on top
        register(id=_env_id, entry_point=_entry_point, disable_env_checker=True)

__all__ = ["ENV_IDS"]
