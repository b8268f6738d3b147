"""Local stand-in servers on 127.0.0.1 for the guide's examples: HTTP and SMTP, asyncio streams.

:class:`HttpStandIn` runs on the test's own event loop. :class:`SmtpStandIn` runs on an event
loop in a thread of its own, so it can live for a whole module and its port can be handed to a
node process before any test starts.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import queue
import threading
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any


class HttpStandIn:
    """Answers ``GET <path>`` with the JSON document registered for the path, else 404."""

    def __init__(self, routes: dict[str, Any]) -> None:
        self.routes = routes
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> HttpStandIn:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
            headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            method, path, _version = request_line.split(" ", 2)
            self.requests.append((method, path, headers))
            if method == "GET" and path in self.routes:
                status, body = "200 OK", json.dumps(self.routes[path]).encode()
            else:
                status, body = "404 Not Found", b'{"detail": "not found"}'
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("latin-1")
                + body
            )
            await writer.drain()
        finally:
            writer.close()


@dataclass(frozen=True)
class ReceivedMail:
    sender: str
    recipients: list[str]
    message: EmailMessage


class SmtpStandIn:
    """A minimal SMTP server (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT)."""

    def __init__(self) -> None:
        self.received: queue.Queue[ReceivedMail] = queue.Queue()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="smtp-standin")
        self._server: asyncio.Server | None = None

    def start(self) -> SmtpStandIn:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def reply(text: str) -> None:
            writer.write(text.encode() + b"\r\n")

        sender: str | None = None
        recipients: list[str] = []
        reply("220 127.0.0.1 flowrra-tests SMTP stand-in")
        try:
            while line := await reader.readline():
                command = line.decode("utf-8", "replace").rstrip("\r\n")
                verb = command.split(" ", 1)[0].upper()
                if verb in ("EHLO", "HELO"):
                    reply("250-127.0.0.1 hello")
                    reply("250 8BITMIME")
                elif command.upper().startswith("MAIL FROM:"):
                    sender, recipients = _address(command[10:]), []
                    reply("250 OK")
                elif command.upper().startswith("RCPT TO:"):
                    if sender is None:
                        reply("503 MAIL first")
                    else:
                        recipients.append(_address(command[8:]))
                        reply("250 OK")
                elif verb == "DATA":
                    if sender is None or not recipients:
                        reply("503 MAIL and RCPT first")
                        continue
                    reply("354 End data with <CR><LF>.<CR><LF>")
                    await writer.drain()
                    lines: list[bytes] = []
                    while (data := await reader.readline()) not in (b".\r\n", b""):
                        lines.append(data[1:] if data.startswith(b"..") else data)
                    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(
                        b"".join(lines)
                    )
                    assert isinstance(parsed, EmailMessage)
                    self.received.put(ReceivedMail(sender, recipients, parsed))
                    sender, recipients = None, []
                    reply("250 OK: queued")
                elif verb in ("RSET", "NOOP"):
                    if verb == "RSET":
                        sender, recipients = None, []
                    reply("250 OK")
                elif verb == "QUIT":
                    reply("221 Bye")
                    await writer.drain()
                    break
                else:
                    reply("502 Command not implemented")
                await writer.drain()
        finally:
            writer.close()


def _address(text: str) -> str:
    return text.strip().split(" ", 1)[0].strip("<>")
