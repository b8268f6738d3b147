"""A stand-in for the part of ``httpx`` the guide uses: ``AsyncClient().get(url).json()``.

Plain HTTP/1.1 over asyncio streams, one request per connection, ``http://`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit


class HTTPError(Exception):
    """A transport or protocol error."""


class HTTPStatusError(HTTPError):
    """A 4xx or 5xx answer (raised by :meth:`Response.raise_for_status`)."""


class Response:
    def __init__(self, status_code: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.content)

    def raise_for_status(self) -> Response:
        if self.status_code >= 400:
            raise HTTPStatusError(f"HTTP {self.status_code}")
        return self


class AsyncClient:
    def __init__(self, *, timeout: float = 5.0) -> None:
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    async def get(self, url: str) -> Response:
        return await asyncio.wait_for(self._get(url), self.timeout)

    async def _get(self, url: str) -> Response:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise HTTPError(f"the stand-in speaks plain http:// only, not {url!r}")
        port = parts.port or 80
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        reader, writer = await asyncio.open_connection(parts.hostname, port)
        try:
            request = (
                f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                "Accept: */*\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode("ascii"))
            await writer.drain()
            status_line = await reader.readline()
            fields = status_line.decode("latin-1").split(" ", 2)
            if len(fields) < 2 or not fields[0].startswith("HTTP/"):
                raise HTTPError(f"bad status line {status_line!r}")
            headers: dict[str, str] = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding", "identity") != "identity":
                raise HTTPError("the stand-in does not decode chunked bodies")
            if "content-length" in headers:
                content = await reader.readexactly(int(headers["content-length"]))
            else:
                content = await reader.read()
            return Response(int(fields[1]), headers, content)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
