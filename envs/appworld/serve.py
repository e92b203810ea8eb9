"""Serve AppWorld's environment HTTP app on a unix socket, inside the sealed sandbox (AppWorld's
packages only; see sealed.py).

``sealed.py`` runs this file in a bubblewrap sandbox with a system interpreter::

    python -I -S -B -u serve.py --fd FD --root ROOT --site-packages DIR

It serves the same FastAPI app as ``appworld serve environment --port P --root R``
(``appworld.serve.environment:app``: /initialize, /execute, /evaluate, /task_completed, /close,
...), with differences that matter here:

- it serves the listening unix socket ``--fd`` that the host bound outside the sandbox and never
  binds a port: the sandbox has no network, and AppWorld's own CLI binds 0.0.0.0, which would
  expose code execution to the network;
- ``--site-packages`` adds the AppWorld venv's packages to the interpreter (the sandbox runs a
  system one its unprivileged uid can read; the venv's own may live under a mode-0700 home);
- it imports every app and fills AppWorld's task-independent caches (``warm_up``) before it
  answers, so "GET / answers" means ready and the episode's ``/initialize`` pays only for its
  task. It needs no watchdog of its parent: bubblewrap's ``--die-with-parent`` takes the whole
  sandbox down with it.
"""

import argparse
import datetime
import gc
import site
import socket


def warm_up() -> None:
    """Do now, while the server waits as a spare, the first-use work of AppWorld's
    ``/initialize`` that no task decides, so that an episode's reset does not pay for it.

    - the API docs: ``Task`` loads them for every app whatever the task (``allowed_apps`` is
      all apps), through a ``functools.cache`` keyed by exactly these arguments;
    - each app's API table (``get_name_to_apis``, also cached), and the docs its requests
      are checked against (``_get_api_name_to_doc``: the first call of an app's API in a
      world built them, ~25 ms each);
    - freezegun's cache of which module attributes hold time functions: its first
      ``start()`` walks every loaded module (~0.1 s), later ones reuse the cache.

    Nothing here reads a task: the server holds none yet (the host installs the episode's
    task after handing the server out). These are the caches a second ``AppWorld(...)`` in one
    process finds filled, as the in-process peer's every reset does.
    """
    from appworld.apps import get_all_apps
    from appworld.apps.api_lib import set_local_date_and_time, unset_local_date_and_time
    from appworld.collections.api_docs import ApiDocCollection
    from appworld.common.utils import get_name_to_apis
    from appworld.requester import _get_api_name_to_doc
    from appworld.serve.environment import AppWorldArgs

    ApiDocCollection.load(
        load_apps=tuple(get_all_apps(skip_admin=True)),
        include_response_schemas=AppWorldArgs.__fields__["show_api_response_schemas"].default,
    )
    for app_name in get_all_apps():
        get_name_to_apis(app_name, ignore_private_apis=True)
        _get_api_name_to_doc(app_name, include_private_apis=True)
    unset_local_date_and_time(set_local_date_and_time(datetime.datetime(2000, 1, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the listening socket to serve")
    parser.add_argument("--root", required=True, help="AppWorld root (data/ and experiments/)")
    parser.add_argument("--site-packages", required=True, help="the AppWorld venv's packages")
    args = parser.parse_args()
    site.addsitedir(args.site_packages)

    from appworld import update_root

    update_root(args.root)
    import uvicorn
    from appworld.apps import get_all_apps
    from appworld.common.utils import import_apis_module
    from appworld.serve.environment import app

    # Import every app now (the bulk of a cold start) so that the first /initialize is as fast
    # as the later ones.
    for app_name in get_all_apps():
        import_apis_module(app_name)
    warm_up()
    # What is loaded now (~1M objects: every app's models and routes) lives as long as the
    # server: out of the collector's way, so that a full collection (~0.3 s over them) does not
    # land in the middle of an episode's cell.
    gc.collect()
    gc.freeze()

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=600)
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=args.fd)])


if __name__ == "__main__":
    main()
