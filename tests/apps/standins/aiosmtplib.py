"""A stand-in for the part of ``aiosmtplib`` the guide uses: ``SMTP``, ``connect``,
``send_message`` and the async context manager.

Real SMTP (EHLO, MAIL, RCPT, DATA, QUIT) over asyncio streams. With no ``hostname``/``port``
it connects to ``$STANDIN_SMTP_HOST:$STANDIN_SMTP_PORT`` (default ``127.0.0.1:25``), which is
how the tests point the guide's ``aiosmtplib.SMTP()`` at their local SMTP server.

One difference from the real library, to run the guide's example as written: entering
``async with SMTP()`` does not connect, the explicit ``await smtp.connect()`` does.
"""

from __future__ import annotations

import asyncio
import os
from email.message import EmailMessage, Message
from email.utils import getaddresses
from types import TracebackType


class SMTPException(Exception):
    """The server refused a command, or the conversation broke off."""


class SMTP:
    def __init__(
        self, hostname: str | None = None, port: int | None = None, *, timeout: float = 5.0
    ) -> None:
        self.hostname = hostname or os.environ.get("STANDIN_SMTP_HOST", "127.0.0.1")
        self.port = port or int(os.environ.get("STANDIN_SMTP_PORT", "25"))
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def is_connected(self) -> bool:
        return self._writer is not None

    async def __aenter__(self) -> SMTP:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.is_connected:
            if exc_type is None:
                await self.quit()
            else:
                self.close()

    async def connect(self) -> tuple[int, str]:
        if self.is_connected:
            raise SMTPException("already connected")
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.hostname, self.port), self.timeout
        )
        greeting = await self._reply(220)
        await self.execute("EHLO flowrra-tests", 250)
        return greeting

    async def send_message(
        self,
        message: Message,
        sender: str | None = None,
        recipients: list[str] | None = None,
    ) -> tuple[int, str]:
        if not isinstance(message, Message):
            raise TypeError(f"send_message takes an email.message.Message, not {message!r}")
        sender = sender or getaddresses([message.get("From", "")])[0][1]
        if recipients is None:
            fields = message.get_all("To", []) + message.get_all("Cc", [])
            recipients = [address for _, address in getaddresses(fields)]
        if not sender or not recipients:
            raise SMTPException("a message needs a sender and at least one recipient")
        await self.execute(f"MAIL FROM:<{sender}>", 250)
        for recipient in recipients:
            await self.execute(f"RCPT TO:<{recipient}>", 250)
        await self.execute("DATA", 354)
        lines = message.as_bytes().replace(b"\r\n", b"\n").split(b"\n")
        body = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)
        assert self._writer is not None
        self._writer.write(body + b"\r\n.\r\n")
        return await self._reply(250)

    async def quit(self) -> None:
        try:
            await self.execute("QUIT", 221)
        finally:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def execute(self, command: str, expected: int) -> tuple[int, str]:
        if self._writer is None:
            raise SMTPException("not connected")
        self._writer.write(command.encode("utf-8") + b"\r\n")
        return await self._reply(expected)

    async def _reply(self, expected: int) -> tuple[int, str]:
        assert self._reader is not None and self._writer is not None
        await self._writer.drain()
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self._reader.readline(), self.timeout)
            if not raw:
                raise SMTPException("the server closed the connection")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line[4:])
            if line[3:4] != "-":
                break
        code = int(line[:3])
        if code != expected:
            raise SMTPException(f"expected {expected}, got {code} {' '.join(lines)}")
        return code, "\n".join(lines)


__all__ = ["SMTP", "EmailMessage", "SMTPException"]
