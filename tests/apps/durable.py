"""Tasks for the broker crash tests: each run leaves a marker file, so tests can count runs."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

from flowrra import Flowrra

app = Flowrra.from_urls()


def _mark(marker_dir: str, key: str) -> None:
    path = os.path.join(marker_dir, f"{key}.{uuid.uuid4().hex[:8]}.run")
    with open(path, "w") as f:
        f.write(f"{time.time()!r}\n")


@app.task()
async def record(marker_dir: str, key: str, delay_s: float = 0.0) -> str:
    """Leave a marker, wait ``delay_s``, return ``key``."""
    _mark(marker_dir, key)
    await asyncio.sleep(delay_s)
    return key


@app.task()
async def hold_until(marker_dir: str, key: str, release_path: str) -> str:
    """Leave a marker, then wait until ``release_path`` exists."""
    _mark(marker_dir, key)
    while not os.path.exists(release_path):
        await asyncio.sleep(0.01)
    return key


@app.task(max_retries=2, retry_delay=2.0)
async def fail_once(marker_dir: str, key: str) -> str:
    """Fails on its first run, succeeds on the next."""
    first = not any(name.startswith(key + ".") for name in os.listdir(marker_dir))
    _mark(marker_dir, key)
    if first:
        raise ConnectionError("first attempt fails")
    return key


@app.task(max_retries=0)
async def shrug_off_cancel(marker_dir: str, key: str, release_path: str) -> str:
    """Leave a marker, then wait until ``release_path`` exists, swallowing cancellation (a
    ``<key>-cancelled`` marker each time); leave a ``<key>-done`` marker and return ``key``."""
    _mark(marker_dir, key)
    while not os.path.exists(release_path):
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            _mark(marker_dir, f"{key}-cancelled")
    _mark(marker_dir, f"{key}-done")
    return key


@app.task()
async def timed_run(marker_dir: str, key: str, delay_s: float) -> float:
    """Leave a ``<key>.<unique>.start`` marker, wait ``delay_s``, then leave a
    ``<key>.<unique>.done`` one; both hold the run's start time, which it returns. A run
    cancelled before its end leaves no ``done`` marker."""
    started = time.time()
    stem = os.path.join(marker_dir, f"{key}.{uuid.uuid4().hex[:8]}")
    with open(stem + ".start", "w") as f:
        f.write(f"{started!r}\n")
    await asyncio.sleep(delay_s)
    with open(stem + ".done", "w") as f:
        f.write(f"{started!r}\n")
    return started
