"""Tasks for the failure tests (tests/failures): nodes killed, stopped, cut off or drained.

Tasks talk to the test through files in a marker directory. Every marker is named
``<what>.<pid>.<unique>`` (written atomically), so the test can count runs and tell which
process ran them: :func:`pids` reads them back.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

from flowrra import Flowrra

app = Flowrra.from_urls(processes=1)


def mark(marker_dir: str, what: str) -> str:
    """Write ``<what>.<pid>.<unique>`` in ``marker_dir``; returns its path."""
    path = os.path.join(marker_dir, f"{what}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    with open(path + ".tmp", "w") as f:
        f.write(f"{time.time()!r}\n")
    os.replace(path + ".tmp", path)  # appears complete or not at all
    return path


def pids(marker_dir: str | os.PathLike[str], what: str) -> list[int]:
    """The process ids of the ``what`` markers, one per marker (in name order)."""
    return [int(p.name.split(".")[1]) for p in sorted(Path(marker_dir).glob(f"{what}.*.*"))]


async def _wait_for_file(path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.01)


@app.task(max_retries=0)
async def hold(marker_dir: str, release_path: str, tag: str = "hold") -> dict[str, Any]:
    """Mark ``<tag>``, wait for ``release_path``, mark ``<tag>-done``; returns the node pid.
    Cancelled on its node (a superseded attempt), it marks ``<tag>-cancelled`` instead."""
    mark(marker_dir, tag)
    try:
        await _wait_for_file(release_path, 60.0)
    except asyncio.CancelledError:
        mark(marker_dir, f"{tag}-cancelled")
        raise
    mark(marker_dir, f"{tag}-done")
    return {"pid": os.getpid()}


@app.task(max_retries=0)
async def hang(marker_dir: str, tag: str = "hang") -> None:
    """Mark ``<tag>``, then never finish (until cancelled or killed)."""
    mark(marker_dir, tag)
    await asyncio.sleep(3600)


@app.task(max_retries=0)
async def record(marker_dir: str, tag: str) -> dict[str, Any]:
    """Mark ``<tag>`` and return at once."""
    mark(marker_dir, tag)
    return {"pid": os.getpid()}


@app.task(max_retries=0)
async def block_loop(marker_dir: str, seconds: float) -> dict[str, Any]:
    """Block the node's event loop with ``time.sleep`` (as a careless task would)."""
    mark(marker_dir, "block")
    time.sleep(seconds)  # deliberately blocking: the test checks the node survives it
    mark(marker_dir, "block-done")
    return {"pid": os.getpid()}


@app.task(max_retries=3, retry_delay=0.05)
async def flaky(marker_dir: str, key: str, failures: int, release_path: str = "") -> str:
    """Fail the first ``failures`` calls with this ``key`` (counted by markers), then succeed
    (once ``release_path`` exists, when one is given)."""
    mark(marker_dir, key)
    runs = len(list(Path(marker_dir).glob(f"{key}.*.*")))
    if runs <= failures:
        raise RuntimeError(f"{key}: planned failure {runs} of {failures}")
    if release_path:
        await _wait_for_file(release_path, 60.0)
    return f"{key} ok after {runs} runs"


@app.task()
async def ping(value: int) -> int:
    return value


@app.task(max_retries=0)
async def sink(data: bytes) -> int:
    return len(data)


@app.task(cpu_bound=True, max_retries=2, retry_delay=0.05)
def cpu_suicide(marker_dir: str) -> None:
    """Kill the worker process running this (no result, no exception: the process is gone)."""
    mark(marker_dir, "suicide")
    os._exit(1)


@app.task(cpu_bound=True, max_retries=0)
def cpu_pid() -> dict[str, int]:
    """The worker process that ran this and its parent (the node)."""
    return {"pid": os.getpid(), "ppid": os.getppid()}


class UnprintableError(Exception):
    """An exception whose ``__str__`` itself raises (as some library exceptions do)."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


@app.task(max_retries=0)
async def raise_unprintable() -> None:
    raise UnprintableError()


@app.task(max_retries=0)
async def raise_surrogate() -> None:
    raise ValueError("bad text: \ud800")  # a lone surrogate: not encodable as UTF-8


@app.task(max_retries=0, timeout=0.5)
async def timed_ping(value: int) -> int:
    return value


@app.task(cpu_bound=True, max_retries=0)
def cpu_hang(marker_dir: str) -> None:
    """Mark, then block a worker process (until it is killed)."""
    mark(marker_dir, "cpu-hang")
    time.sleep(3600)


@app.task(max_retries=0)
async def hang_until_cancelled(marker_dir: str) -> None:
    """Mark, sleep; mark ``cancelled`` when the sleep is cancelled."""
    mark(marker_dir, "waiting")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        mark(marker_dir, "cancelled")
        raise


@app.task(max_retries=0)
async def add(x: int, y: int = 0) -> int:
    return x + y


@app.task(max_retries=0)
async def total(values: list[int], extra: int = 0) -> int:
    return sum(values) + extra


@app.task(max_retries=0)
async def boom(value: object = None) -> None:
    raise RuntimeError(f"boom after {value!r}")


@app.task(max_retries=0)
async def progress_steps(steps: int) -> int:
    from flowrra import report_progress

    for step in range(1, steps + 1):
        report_progress(step, steps, f"step {step}")
        await asyncio.sleep(0.05)
    return steps


@app.task(cpu_bound=True, max_retries=0)
def cpu_progress_steps(steps: int) -> int:
    from flowrra import report_progress

    for step in range(1, steps + 1):
        report_progress(step, steps, f"step {step}")
        time.sleep(0.05)
    return steps
