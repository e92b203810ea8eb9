"""Running the app under uvicorn the way an operator needs: drain on SIGTERM, tokens on SIGHUP.

uvicorn alone, on SIGTERM, closes its listening socket at once and cancels what is still running
after its graceful timeout, so a load balancer never sees the replica go unready and episodes
in flight are cut. :class:`DrainingServer` instead, on the first SIGTERM:

1. stops accepting sessions (create answers 503 ``shutting_down`` with Retry-After, so
   ``RemoteEnv`` goes to another replica) and ``/healthz`` answers 503 ``draining``;
2. lets live sessions finish their episodes: steps are served, a reset ends its session (the
   episode is over; the client starts its next one elsewhere), for up to ``drain_grace_s``;
3. then shuts down: a call still running gets ``shutdown_grace_s`` more, every session's
   processes are closed, and the process exits 0.

A second SIGTERM, or SIGINT (Ctrl-C), skips the wait (uvicorn's own shutdown, still closing
every session). SIGHUP re-reads the tokens file without touching any session.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

import uvicorn

from serving.pool import SessionPool
from serving.settings import ServeSettings
from serving.tokens import TokenStore

log = logging.getLogger("eprl.serving")


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain above and SIGHUP token reloads."""

    def __init__(
        self,
        config: uvicorn.Config,
        pool: SessionPool,
        settings: ServeSettings,
        tokens: TokenStore | None,
    ) -> None:
        super().__init__(config)
        self.pool = pool
        self.settings = settings
        self.tokens = tokens
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain: asyncio.Task | None = None

    async def serve(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        # always handled: SIGHUP's default action would end the process and every session
        self._loop.add_signal_handler(signal.SIGHUP, self._reload_tokens)
        try:
            await super().serve(sockets)
        finally:
            self._loop.remove_signal_handler(signal.SIGHUP)

    def _reload_tokens(self) -> None:
        if self.tokens is None or self.tokens.path is None:
            log.info("SIGHUP: no tokens_file to reload; nothing changed")
            return
        self.tokens.reload()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if (
            sig == signal.SIGTERM
            and not self._drain_requested
            and not self.should_exit
            and self.started
            and self._loop is not None
        ):
            # a signal handler: hand the work to the event loop
            self._drain_requested = True
            self._loop.call_soon_threadsafe(self._begin_drain)
            return
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        assert self._loop is not None
        self.pool.begin_drain()
        grace = self.settings.drain_grace_s
        log.info("SIGTERM: draining for up to %g s (SIGTERM again to stop now)", grace)
        deadline = self._loop.time() + grace
        while self.pool.active and self._loop.time() < deadline and not self.should_exit:
            await asyncio.sleep(0.1)
        if self.pool.active:
            log.info("drain grace over with %d sessions live: closing them", self.pool.active)
        else:
            log.info("drained: no session left")
        self.should_exit = True


def uvicorn_config(app: Any, settings: ServeSettings) -> uvicorn.Config:
    """uvicorn's settings for ``app`` (TLS when the settings name a certificate)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        server_header=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) or None,
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
    )
