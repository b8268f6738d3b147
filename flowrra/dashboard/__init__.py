"""``flowrra dashboard``: a live, read-only web view of one broker, as an ASGI application.

:func:`asgi_app` builds the application; mount it inside FastAPI or Starlette::

    from fastapi import FastAPI
    from flowrra.dashboard import asgi_app

    dashboard = asgi_app("tcp://127.0.0.1:5555")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await dashboard.aclose()  # FastAPI runs no lifespan of a mounted app

    app = FastAPI(lifespan=lifespan)
    app.mount("/flowrra", dashboard)

or serve it on its own with :func:`serve` (what ``flowrra dashboard`` runs, on uvicorn).
The dashboard has no authentication: keep it on 127.0.0.1 or behind an authenticating proxy
(or a host application's own authentication).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn

from flowrra.dashboard.app import (
    POLL_INTERVAL_S,
    REQUEST_TIMEOUT_S,
    DashboardApp,
)
from flowrra.logs import configure_logging

if TYPE_CHECKING:
    from flowrra.security import ClientKeys

__all__ = ["DashboardApp", "asgi_app", "serve"]

log = logging.getLogger("flowrra.dashboard")

# Seconds the standalone server waits for open requests when it stops.
SHUTDOWN_TIMEOUT_S = 2


def asgi_app(
    broker_url: str,
    *,
    keys: ClientKeys | None = None,
    poll_interval_s: float = POLL_INTERVAL_S,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    **options: Any,
) -> DashboardApp:
    """The dashboard of the broker at ``broker_url`` as an ASGI application.

    ``keys`` are the CURVE client keys for a broker that requires them; ``poll_interval_s``
    is how often the page and the server refresh; ``request_timeout_s`` how long a broker
    request may take before the broker is shown unavailable. The application connects on its
    first request; await its :meth:`~DashboardApp.aclose` when the host application stops.
    """
    return DashboardApp(
        broker_url,
        keys=keys,
        poll_interval_s=poll_interval_s,
        request_timeout_s=request_timeout_s,
        **options,
    )


class _Server(uvicorn.Server):
    """uvicorn's server, stopping on SIGINT or SIGTERM and then returning normally (uvicorn
    raises the signal again after its shutdown, which would end the process by it)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # no signals here: the caller stops the server (should_exit)
            return
        originals = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in originals.items():
                signal.signal(signum, handler)


def _listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` and listening (raises OSError if it cannot be)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(
    broker_url: str,
    host: str,
    port: int,
    *,
    poll_interval_s: float = POLL_INTERVAL_S,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    keys: ClientKeys | None = None,
) -> None:
    """Serve the dashboard for the broker at ``broker_url`` on ``host:port`` with uvicorn,
    until SIGINT or SIGTERM.

    A broker that is down (or not up yet) is not an error: the page says so and recovers when
    the broker answers again. Port 0 picks a free port (the log line names it). Raises
    OSError when it cannot listen on ``host:port``.
    """
    if not logging.getLogger().handlers:
        configure_logging()
    app = asgi_app(
        broker_url, keys=keys, poll_interval_s=poll_interval_s, request_timeout_s=request_timeout_s
    )
    sock = _listening_socket(host, port)
    config = uvicorn.Config(
        app,
        log_config=None,  # flowrra's logging configuration, not uvicorn's
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S,
    )
    server = _Server(config)
    bound = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    log.info("dashboard listening on http://%s:%d", shown_host, bound)
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()
        await app.aclose()
    log.info("dashboard stopped")
