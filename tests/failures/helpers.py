"""Small helpers shared by the failure tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from flowrra import Flowrra


async def admin(app: Flowrra, verb: str, **args: Any) -> Any:
    """An operator command through a started app's own connection."""
    assert app._client is not None, "start the app first"
    return await app._client.admin(verb, **args)


async def counter(app: Flowrra, name: str) -> int:
    status = await admin(app, "status")
    return int(status["counters"].get(name, 0))


async def eventually(
    probe: Callable[[], Awaitable[bool]], timeout: float = 15.0, what: str = "condition"
) -> None:
    """Poll an async predicate every 20 ms until it holds (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.02)
