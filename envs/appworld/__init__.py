"""AppWorld for eprl: the ``eprl/AppWorld-v0`` environment, its HTTP runtime and offline data.

- ``AppWorldEnv`` (``env.py``): the Gymnasium environment (LOOP's agent protocol, real engine).
- ``AppWorldRuntime`` (``runtime.py``): the pool of AppWorld servers in the isolated venv;
  ``server.py`` (one server's client, where venv and data are), ``sealed.py`` (the sandbox and
  the evaluator), ``leases.py`` (URLs shared by processes).
- ``demonstration.py``: the optional worked example episode for the prompt.
- ``make_data/``: the offline data generator (a package run inside the AppWorld venv).
- ``cli.py``: ``eprl appworld setup | make-data | doctor``.
"""

from envs.appworld.env import ENV_ID, AppWorldEnv, catalogue
from envs.appworld.runtime import AppWorldRuntime, AppWorldRuntimeError, AppWorldServerError

__all__ = [
    "ENV_ID",
    "AppWorldEnv",
    "AppWorldRuntime",
    "AppWorldRuntimeError",
    "AppWorldServerError",
    "catalogue",
]
