"""Imported once by the workers' forkserver: the modules named in EPRL_SERVING_PRELOAD.

Workers fork from the forkserver, so whatever is imported (and cached) here costs nothing per
session. Each module's ``catalogue()`` (the env contract) is called too: it builds the task-set
index that every env constructor would otherwise rebuild in every worker. A module that fails
is skipped with a message (multiprocessing itself forgives only an ImportError and otherwise
kills the forkserver); the worker that needs it then reports the error to its client.
"""

import gc
import importlib
import os
import sys

from serving.workers import PRELOAD_ENV_VAR

for _name in filter(None, os.environ.get(PRELOAD_ENV_VAR, "").split(",")):
    try:
        _module = importlib.import_module(_name)
        if callable(getattr(_module, "catalogue", None)):
            _module.catalogue()
    except Exception as _exc:  # noqa: BLE001 - see the module docstring
        print(f"eprl serve: preloading {_name} failed: {_exc!r}", file=sys.stderr)

# Objects that exist now are shared by every worker; keep the collector from touching (and so
# copying) their pages in each worker.
gc.freeze()
