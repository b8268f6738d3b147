"""Tasks for the tracing tests (tests/flowrra/test_tracing.py).

A node process started with ``TRACED_APP_PROVIDER=1`` configures an OpenTelemetry tracer
provider when it imports this module, as docs/tracing.md tells an app module to; its spans
are not exported anywhere, the tasks report what they see instead.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from opentelemetry import trace

from flowrra import Flowrra

if os.environ.get("TRACED_APP_PROVIDER") == "1":
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())

app = Flowrra.from_urls(processes=1)

# Attempts so far per key, for flaky(), and the keys of the sleepy() calls that started
# (embedded tests only: the node is this process).
attempts: dict[str, int] = {}
started: set[str] = set()


def seen() -> dict[str, Any]:
    """The current span as the task sees it: its trace and span id, and its parent's span id
    (None when the span is not a recording SDK span, as in a worker process without one)."""
    span = trace.get_current_span()
    context = span.get_span_context()
    parent = getattr(span, "parent", None)
    return {
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_id": None if parent is None else format(parent.span_id, "016x"),
        "recording": span.is_recording(),
        "pid": os.getpid(),
    }


@app.task(max_retries=0)
async def current() -> dict[str, Any]:
    """What an ``async def`` task sees."""
    return seen()


@app.task(max_retries=0)
def in_thread() -> dict[str, Any]:
    """What a plain function (run in the node's thread pool) sees."""
    return seen()


@app.task(max_retries=0, cpu_bound=True)
def in_process() -> dict[str, Any]:
    """What a ``cpu_bound`` function (run in a worker process) sees."""
    return seen()


@app.task(max_retries=2, retry_delay=0.0)
async def flaky(key: str, failures: int) -> int:
    """Fail the first ``failures`` attempts for ``key``, then return the attempt number."""
    attempts[key] = attempts.get(key, 0) + 1
    if attempts[key] <= failures:
        raise RuntimeError(f"attempt {attempts[key]} fails on purpose")
    return attempts[key]


@app.task(max_retries=0)
async def boom(message: str) -> None:
    raise ValueError(message)


@app.task(max_retries=0)
async def echo(*args: Any, **kwargs: Any) -> list[Any]:
    return [list(args), kwargs]


@app.task(max_retries=0)
async def sleepy(key: str) -> None:
    """Note ``key`` in ``started``, then sleep until cancelled."""
    started.add(key)
    await asyncio.sleep(3600)
