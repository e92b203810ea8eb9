"""Serve AppWorld's environment HTTP app on a socket handed over by the parent (AppWorld venv only).

``runtime.py`` runs this file with the AppWorld venv's python::

    python serve.py --fd FD --root ROOT --parent-pid PID

It serves the same FastAPI app as ``appworld serve environment --port P --root R``
(``appworld.serve.environment:app``: /initialize, /execute, /evaluate, /task_completed, /close,
...), with two differences that matter when a trainer starts many of them:

- the listening socket is bound by the parent on 127.0.0.1 with an OS-chosen port and passed
  in as ``--fd``, so there is no port race between parallel starts and nothing listens beyond
  loopback (AppWorld's own CLI binds 0.0.0.0, which would expose code execution to the network);
- a watchdog thread exits the process when its parent goes away, even if the parent was killed
  with SIGKILL and could not run its own cleanup (and then removes the parent's temporary work
  directory when told to with ``--remove-root-when-orphaned``).
"""

import argparse
import os
import shutil
import socket
import threading
import time


def _exit_when_orphaned(parent_pid: int, work_dir: str | None) -> None:
    while True:
        if os.getppid() != parent_pid:
            if work_dir:  # the parent could not remove its work directory; the servers do
                shutil.rmtree(work_dir, ignore_errors=True)
            os._exit(0)
        time.sleep(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fd", type=int, required=True, help="listening socket inherited from the parent"
    )
    parser.add_argument(
        "--root", required=True, help="AppWorld root (holds data/ and experiments/)"
    )
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument(
        "--remove-root-when-orphaned",
        action="store_true",
        help="the root is the parent's temporary work directory: delete it if the parent dies",
    )
    args = parser.parse_args()
    work_dir = args.root if args.remove_root_when_orphaned else None
    threading.Thread(
        target=_exit_when_orphaned, args=(args.parent_pid, work_dir), daemon=True
    ).start()
    listening = socket.socket(fileno=args.fd)

    from appworld import update_root

    update_root(args.root)
    import uvicorn
    from appworld.apps import get_all_apps
    from appworld.common.utils import import_apis_module
    from appworld.serve.environment import app

    # Import every app now (the bulk of a cold start) so that the first /initialize is as fast
    # as the later ones and "answers GET /" means "ready".
    for app_name in get_all_apps():
        import_apis_module(app_name)

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=600)
    uvicorn.Server(config).run(sockets=[listening])


if __name__ == "__main__":
    main()
