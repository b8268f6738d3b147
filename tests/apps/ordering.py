"""Tasks for the priority-order test: one slot, a blocker, then tasks that record their turn."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from flowrra import Flowrra

# One async slot on the embedded default too, so tasks run one after another.
app = Flowrra.from_urls(concurrency=1)


async def _wait_for_file(path: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.01)


@app.task()
async def blocker(started_path: str, release_path: str) -> str:
    """Occupy the only slot until the test creates ``release_path``."""
    with open(started_path, "w") as f:
        f.write(str(os.getpid()))
    await _wait_for_file(release_path)
    return "released"


@app.task()
async def record(label: str) -> dict[str, Any]:
    return {"label": label, "pid": os.getpid(), "at": time.time()}


@app.task(priority=7)
async def record_default_priority(label: str) -> dict[str, Any]:
    """Registered with priority 7: submitted without ``priority=``, it runs at 7."""
    return {"label": label, "pid": os.getpid(), "at": time.time()}
