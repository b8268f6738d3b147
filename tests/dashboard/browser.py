"""Headless Chromium driven over the DevTools protocol, with aiohttp's websocket client.

No browser-automation package is needed: Chromium is started with ``--remote-debugging-port=0``,
the ``DevTools listening on ws://...`` line on its stderr gives the port, ``/json/list`` gives
the page's websocket, and commands (``Page.navigate``, ``Runtime.evaluate``,
``Page.captureScreenshot``) are JSON messages over that websocket.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp

LAUNCH_TIMEOUT_S = 20.0
COMMAND_TIMEOUT_S = 10.0

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
    "--window-size=1280,1200",
]


def chromium_path() -> str | None:
    return shutil.which("chromium")


class BrowserError(AssertionError):
    """Chromium failed, or a page script threw."""


class Chromium:
    """One headless Chromium process and a DevTools session on its first page."""

    def __init__(self, process: asyncio.subprocess.Process, stderr: list[str]) -> None:
        self.process = process
        self.stderr = stderr
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._load_waiters: list[asyncio.Future[None]] = []
        self._reader: asyncio.Task[None] | None = None
        self._stderr_reader: asyncio.Task[None] | None = None
        # Uncaught page exceptions and console/log errors (CSP violations land here).
        self.errors: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def launch(cls, profile_dir: Path) -> Chromium:
        exe = chromium_path()
        if exe is None:
            raise BrowserError("chromium is not installed")
        process = await asyncio.create_subprocess_exec(
            exe,
            *FLAGS,
            f"--user-data-dir={profile_dir}",
            "about:blank",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its helper processes share its group: killed together
        )
        stderr: list[str] = []
        browser = cls(process, stderr)
        try:
            ws_url = await asyncio.wait_for(browser._devtools_url(), LAUNCH_TIMEOUT_S)
            browser._stderr_reader = asyncio.create_task(browser._drain_stderr())
            await browser._attach(ws_url)
        except BaseException:
            await browser.close()
            raise
        return browser

    async def _devtools_url(self) -> str:
        assert self.process.stderr is not None
        while True:
            raw = await self.process.stderr.readline()
            if not raw:
                await self.process.wait()
                raise BrowserError(
                    f"chromium exited with {self.process.returncode} before listening:\n"
                    + "\n".join(self.stderr[-40:])
                )
            line = raw.decode("utf-8", "replace").rstrip()
            self.stderr.append(line)
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            if match:
                return match.group(1)

    async def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        while raw := await self.process.stderr.readline():
            self.stderr.append(raw.decode("utf-8", "replace").rstrip())

    async def _attach(self, browser_ws_url: str) -> None:
        port = int(re.match(r"ws://[^:/]+:(\d+)/", browser_ws_url).group(1))  # type: ignore[union-attr]
        self.session = aiohttp.ClientSession()
        page_ws_url = None
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while page_ws_url is None:
            async with self.session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json(content_type=None)
            pages = [t for t in targets if t.get("type") == "page"]
            if pages:
                page_ws_url = pages[0]["webSocketDebuggerUrl"]
            elif time.monotonic() > deadline:
                raise BrowserError(f"chromium shows no page target: {targets}")
            else:
                await asyncio.sleep(0.05)
        self.ws = await self.session.ws_connect(page_ws_url, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send("Log.enable")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        # Helper processes (renderer, zygote) left in its group go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        if self._stderr_reader is not None:
            self._stderr_reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_reader

    async def __aenter__(self) -> Chromium:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ protocol

    async def _read(self) -> None:
        assert self.ws is not None
        async for message in self.ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "id" in data:
                future = self._pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._on_event(data.get("method", ""), data.get("params", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrowserError("the DevTools connection closed"))

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            for waiter in self._load_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._load_waiters.clear()
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exception = details.get("exception", {})
            self.errors.append(f"exception: {exception.get('description') or details}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            texts = [str(a.get("value", a.get("description", ""))) for a in params["args"]]
            self.errors.append("console.error: " + " ".join(texts))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log ({entry.get('source')}): {entry.get('text')}")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Run one DevTools command; returns its result (raises on a protocol error)."""
        assert self.ws is not None
        command_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        await self.ws.send_str(json.dumps({"id": command_id, "method": method, "params": params}))
        try:
            reply = await asyncio.wait_for(future, COMMAND_TIMEOUT_S)
        finally:
            self._pending.pop(command_id, None)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    # ------------------------------------------------------------------ page

    async def navigate(self, url: str) -> None:
        """Open ``url`` and wait for its load event."""
        loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._load_waiters.append(loaded)
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise BrowserError(f"navigating to {url} failed: {result['errorText']}")
        await asyncio.wait_for(loaded, COMMAND_TIMEOUT_S)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0, what: str = "") -> Any:
        """Evaluate ``expression`` until it is truthy; returns that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(
                    f"{what or expression} not true within {timeout}s (last value {value!r})"
                )
            await asyncio.sleep(0.1)

    async def text(self, selector: str) -> str:
        """The rendered text (``innerText``) of the first element matching ``selector``."""
        value = await self.evaluate(
            f"(document.querySelector({json.dumps(selector)}) || {{}}).innerText || ''"
        )
        return str(value)

    async def screenshot(self, path: Path) -> None:
        """A PNG of the whole page."""
        metrics = await self.send("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        result = await self.send(
            "Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True
        )
        path.write_bytes(base64.b64decode(result["data"]))
