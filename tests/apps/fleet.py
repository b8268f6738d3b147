"""Tasks for the multi-node, failure and error tests.

Tasks synchronise with the test through files: a task writes a marker file when it starts
(named after its process id) and waits for a release file the test creates.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from flowrra import Flowrra

app = Flowrra.from_urls(processes=2)


async def _wait_for_file(path: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.01)


def _mark(marker_dir: str, what: str) -> None:
    name = f"{what}-{os.getpid()}"
    path = os.path.join(marker_dir, name)
    # The temporary name starts with a dot, so the tests' "cpu-*" globs never see it.
    temporary = os.path.join(marker_dir, f".{name}.tmp")
    with open(temporary, "w") as f:
        f.write(f"{time.time()!r}\n")
    os.replace(temporary, path)  # appears complete or not at all


@app.task()
async def whoami(delay_s: float = 0.0) -> dict[str, Any]:
    """The node process that ran this, after ``delay_s`` (so work spreads over nodes)."""
    await asyncio.sleep(delay_s)
    return {"pid": os.getpid(), "at": time.time()}


@app.task(cpu_bound=True)
def cpu_whoami() -> dict[str, int]:
    """The worker process that ran this and its parent (the node)."""
    return {"pid": os.getpid(), "ppid": os.getppid()}


@app.task()
async def hold(marker_dir: str, release_path: str) -> dict[str, Any]:
    """Write ``started-<pid>``, then wait for ``release_path``; returns the node's pid."""
    _mark(marker_dir, "started")
    await _wait_for_file(release_path)
    return {"pid": os.getpid()}


@app.task(cpu_bound=True, max_retries=0)
def cpu_hold(marker_dir: str, seconds: float) -> int:
    """Write ``cpu-<pid>``, then keep a worker process busy for ``seconds``."""
    _mark(marker_dir, "cpu")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return os.getpid()


@app.task(cpu_bound=True, timeout=0.5, max_retries=1, retry_delay=0.05)
def spin(marker_dir: str) -> None:
    """A runaway function: write ``spin-<pid>``, then loop forever."""
    _mark(marker_dir, "spin")
    while True:
        pass


@app.task(cpu_bound=True)
def square(x: int) -> dict[str, int]:
    return {"value": x * x, "pid": os.getpid()}


@app.task(max_retries=0)
async def returns_object() -> Any:
    """Returns a value msgpack cannot carry."""
    return object()


@app.task(max_retries=0)
async def raises_value_error(message: str) -> None:
    raise ValueError(message)


@app.task()
async def echo(*args: Any, **kwargs: Any) -> list[Any]:
    return [list(args), kwargs]


@app.task()
async def kill_my_node() -> None:
    """SIGKILL the process running this (a node that was started to be killed)."""
    if os.environ.get("TESTS_NODE_MAY_BE_KILLED") != "1":
        raise RuntimeError("refusing to kill a process that is not a disposable test node")
    os.kill(os.getpid(), signal.SIGKILL)
