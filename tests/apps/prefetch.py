"""cpu_bound tasks for the prefetch tests: one that holds its worker until released."""

from __future__ import annotations

import os
import time

from flowrra import Flowrra

app = Flowrra.from_urls()

SHORT_TIMEOUT_S = 0.5


@app.task(cpu_bound=True, max_retries=0)
def hold(marker_dir: str, name: str) -> str:
    """Mark ``started-<name>``, then keep the worker process until ``release-<name>`` exists."""
    with open(os.path.join(marker_dir, f"started-{name}"), "w"):
        pass
    release = os.path.join(marker_dir, f"release-{name}")
    deadline = time.monotonic() + 30
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.005)
    return name


@app.task(cpu_bound=True, max_retries=0, timeout=SHORT_TIMEOUT_S)
def quick(name: str) -> str:
    """Returns at once, well within its short timeout (once it has a worker)."""
    return name
