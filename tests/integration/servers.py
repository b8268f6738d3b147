"""Real local servers on 127.0.0.1 for the guide's examples: HTTP (aiohttp) and SMTP (aiosmtpd).

:class:`HttpServer` is an ``aiohttp.web`` server on the test's own event loop. :class:`SmtpServer`
is an ``aiosmtpd`` :class:`~aiosmtpd.controller.Controller`, which runs its event loop in a
thread of its own, so it can live for a whole module and its port can be handed to a node
process before any test starts. Both listen on the loopback address only.
"""

from __future__ import annotations

import email.parser
import email.policy
import errno
import queue
import socket
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.conftest import free_port

LOOPBACK = "127.0.0.1"


class HttpServer:
    """Answers ``GET <path>`` with the JSON document registered for the path, else 404."""

    def __init__(self, routes: dict[str, Any]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> HttpServer:
        application = web.Application()
        application.router.add_route("*", "/{path:.*}", self._serve)
        self._runner = web.AppRunner(application, access_log=None)
        await self._runner.setup()
        # Bind the socket ourselves: port 0 picks a free port, and we learn which one.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    async def _serve(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path_qs, dict(request.headers)))
        if request.method == "GET" and request.path_qs in self.routes:
            return web.json_response(self.routes[request.path_qs])
        return web.json_response({"detail": "not found"}, status=404)


@dataclass(frozen=True)
class ReceivedMail:
    sender: str
    recipients: list[str]
    message: EmailMessage


class _Collect:
    """An aiosmtpd handler: every message accepted is parsed and put on ``received``."""

    def __init__(self, received: queue.Queue[ReceivedMail]) -> None:
        self.received = received

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(content)
        assert isinstance(parsed, EmailMessage)
        assert envelope.mail_from is not None
        self.received.put(ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), parsed))
        return "250 Message accepted for delivery"


class SmtpServer:
    """An aiosmtpd SMTP server on 127.0.0.1 that keeps the mail it accepts in ``received``.

    The handler queues a message before the server answers ``250`` to its DATA, so once a
    client's ``send_message()`` has returned, the message is already in ``received``.
    """

    def __init__(self) -> None:
        self.received: queue.Queue[ReceivedMail] = queue.Queue()
        self.port = 0
        self._controller: Controller | None = None

    def start(self) -> SmtpServer:
        # The Controller needs a fixed port (it connects to it to check the server is up).
        for _ in range(5):
            controller = Controller(
                _Collect(self.received),
                hostname=LOOPBACK,
                port=free_port(),
                server_hostname="flowrra-tests.invalid",
                ready_timeout=10.0,
            )
            try:
                controller.start()
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                continue  # somebody took the port meanwhile: try another
            self._controller = controller
            self.port = controller.port
            return self
        raise AssertionError("could not start an SMTP server on a free port")

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def drain(self) -> None:
        """Forget the mail received so far."""
        while True:
            try:
                self.received.get_nowait()
            except queue.Empty:
                return
