"""Tasks for the workflow crash tests and the fleet-wide limit tests.

Tasks talk to the test through files in a marker directory. Every marker is named
``<what>.<pid>.<unique>`` and holds a JSON object with at least ``t`` (``time.time()`` when it
was written) and ``pid``; it is written atomically, so a marker that exists is complete.
:func:`markers` reads them back. Gated tasks wait for a release file ``<release_dir>/<key>``
that the test creates, so the test decides when each one may finish.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from flowrra import Flowrra

app = Flowrra.from_urls()

GATE_TIMEOUT_S = 60.0


def mark(marker_dir: str, what: str, **data: Any) -> float:
    """Write the marker ``<what>.<pid>.<unique>`` holding ``data``; returns its time."""
    now = time.time()
    path = os.path.join(marker_dir, f"{what}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    with open(path + ".tmp", "w") as f:
        json.dump({"t": now, "pid": os.getpid(), **data}, f)
    os.replace(path + ".tmp", path)  # appears complete or not at all
    return now


def markers(marker_dir: str | os.PathLike[str], what: str) -> list[dict[str, Any]]:
    """The contents of the ``what`` markers, in the order they were written."""
    found = [
        json.loads(p.read_text())
        for p in Path(marker_dir).glob(f"{what}.*.*")
        if not p.name.endswith(".tmp")
    ]
    return sorted(found, key=lambda m: float(m["t"]))


async def _gate(release_dir: str, key: str) -> None:
    path = os.path.join(release_dir, key)
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- workflows


@app.task(max_retries=0)
async def member(marker_dir: str, key: str, release_dir: str, value: Any) -> Any:
    """Mark ``<key>-start``, wait for the release file ``<key>``, mark ``<key>-done`` and
    return ``value``."""
    mark(marker_dir, f"{key}-start")
    await _gate(release_dir, key)
    mark(marker_dir, f"{key}-done")
    return value


@app.task(max_retries=0)
async def link(previous: list[str], marker_dir: str, key: str, release_dir: str) -> list[str]:
    """A chain link: like :func:`member`, returning ``previous + [key]``."""
    mark(marker_dir, f"{key}-start", previous=previous)
    await _gate(release_dir, key)
    mark(marker_dir, f"{key}-done")
    return [*previous, key]


@app.task(max_retries=0)
async def collect(results: list[Any], marker_dir: str, key: str = "callback") -> list[Any]:
    """A chord callback: mark ``<key>`` with the list it received, and return that list."""
    mark(marker_dir, key, results=results)
    return results


@app.task(max_retries=0)
async def gated_collect(
    results: list[Any], marker_dir: str, key: str, release_dir: str
) -> list[Any]:
    """A chord callback that marks ``<key>-start`` with its input, waits for the release file
    ``<key>``, marks ``<key>-done`` and returns its input."""
    mark(marker_dir, f"{key}-start", results=results)
    await _gate(release_dir, key)
    mark(marker_dir, f"{key}-done")
    return results


# --------------------------------------------------------------------------- limits


@app.task(max_retries=0, rate_limit="5/s")
async def rated(marker_dir: str, key: str) -> float:
    """At most 5 starts per second across the fleet: mark ``rated`` and return its time."""
    return mark(marker_dir, "rated", key=key)


@app.task(max_retries=0, max_concurrency=2)
async def capped(marker_dir: str, key: str, delay_s: float) -> dict[str, float]:
    """At most 2 runs at once across the fleet: mark ``capped-start``, sleep ``delay_s``,
    mark ``capped-end``; returns both times."""
    started = mark(marker_dir, "capped-start", key=key)
    await asyncio.sleep(delay_s)
    ended = mark(marker_dir, "capped-end", key=key, started=started)
    return {"start": started, "end": ended}
