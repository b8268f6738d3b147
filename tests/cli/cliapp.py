"""Tasks for the ``flowrra`` CLI and metrics tests (served by ``flowrra-node``).

Tasks synchronise with the test through files, never through sleeps.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from flowrra import Flowrra

app = Flowrra.from_urls()


@app.task(name="cli.add", max_retries=0)
async def add(x: int, y: int, *, label: str = "") -> dict[str, Any]:
    return {"sum": x + y, "label": label}


@app.task(name="cli.fail", max_retries=2, retry_delay=0.01)
async def fail(message: str, *, code: int = 0) -> None:
    """Fails every attempt: ends FAILED (dead-lettered) after two retries."""
    raise ValueError(f"{message} ({code})")


@app.task(name="cli.flaky", max_retries=0)
async def flaky(marker: str) -> str:
    """Fails the first call (which creates ``marker``), succeeds on any later call."""
    if not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write("first call\n")
        raise RuntimeError("first call fails")
    return "recovered"


@app.task(name="cli.slow_retry", max_retries=1, retry_delay=60.0)
async def slow_retry() -> None:
    """Fails; its one retry waits a minute (a retry timer stays pending)."""
    raise RuntimeError("retry me later")


@app.task(name="cli.hold", max_retries=0)
async def hold(started: str, release: str) -> str:
    """Create ``started``, then wait (up to 30 s) for ``release`` to exist."""
    with open(started, "w") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 30.0
    while not os.path.exists(release):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{release} never appeared")
        await asyncio.sleep(0.01)
    return "released"
