"""The eprl environment service (``eprl serve``) and its Gymnasium client (``eprl/Remote-v0``).

Server side: ``serve(host, port, token, max_sessions)`` runs it, ``create_app(settings)`` builds the
ASGI app. Client side: ``RemoteEnv`` and its errors. The server modules (FastAPI, uvicorn) are
imported only when a server name is used, so ``gymnasium.make("eprl/Remote-v0")`` stays light.
"""

from typing import Any

from serving.client import RemoteEnv, RemoteEnvError, ServiceBusyError, SessionLostError

_SERVER_NAMES = ("ServeSettings", "create_app", "serve")


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        from serving import app

        return getattr(app, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")


__all__ = [
    "RemoteEnv",
    "RemoteEnvError",
    "ServiceBusyError",
    "SessionLostError",
    *_SERVER_NAMES,
]
