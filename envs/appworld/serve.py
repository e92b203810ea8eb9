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
- it imports every app before it answers, so "GET / answers" means ready. It needs no watchdog
  of its parent: bubblewrap's ``--die-with-parent`` takes the whole sandbox down with it.
"""

import argparse
import site
import socket


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

    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_keep_alive=600)
    uvicorn.Server(config).run(sockets=[socket.socket(fileno=args.fd)])


if __name__ == "__main__":
    main()
