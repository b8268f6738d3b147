"""``report_progress`` for tasks: the latest value reaches the broker, coalesced.

A plain function that never blocks the task. In an ``async def`` task (and a plain function
run in the node's threads) it hands the value to the node, which sends the latest one of
each task at most every :data:`PROGRESS_INTERVAL_S`; in a ``cpu_bound`` task it goes to the
node over the worker process's pipe, at most as often. Outside a task it does nothing.
"""

from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable
from typing import NamedTuple

# At most this often per task on the wire (about 10 updates per second).
PROGRESS_INTERVAL_S = 0.1
MAX_PROGRESS_MESSAGE_CHARS = 1000


class Progress(NamedTuple):
    """A task's latest progress report."""

    current: float
    total: float | None = None
    message: str | None = None


Sink = Callable[[Progress], object]
# Where reports of the task running in this context go (set by the node or worker process).
current_sink: contextvars.ContextVar[Sink | None] = contextvars.ContextVar(
    "flowrra_progress_sink", default=None
)


def report_progress(current: float, total: float | None = None, message: str | None = None) -> None:
    """Report how far the running task is (``current`` of ``total``, with a ``message``).

    Updates are coalesced: the latest wins. Raises TypeError or ValueError for values that
    are not finite numbers (``total`` may be None) or a message that is not a str.
    """
    for name, value in (("current", current), ("total", total)):
        if value is None and name == "total":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"progress {name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"progress {name} must be finite, got {value!r}")
    if message is not None and not isinstance(message, str):
        raise TypeError(f"progress message must be a str or None, got {message!r}")
    sink = current_sink.get()
    if sink is not None:
        text = None if message is None else message[:MAX_PROGRESS_MESSAGE_CHARS]
        sink(Progress(current, total, text))


class Throttle:
    """Passes on at most one report per interval; keeps the latest in between.

    Reports go to ``send``, or to :meth:`_send` of a subclass that overrides it instead."""

    __slots__ = ("_clock", "_interval_s", "_last_sent", "_sink", "pending")

    def __init__(
        self,
        send: Sink | None = None,
        interval_s: float = PROGRESS_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sink = send
        self._interval_s = interval_s
        self._clock = clock
        self._last_sent = -math.inf
        self.pending: Progress | None = None

    def _send(self, progress: Progress) -> None:
        assert self._sink is not None, "give a send, or override _send"
        self._sink(progress)

    def __call__(self, progress: Progress) -> None:
        now = self._clock()
        if now - self._last_sent >= self._interval_s:
            self._last_sent = now
            self.pending = None
            self._send(progress)
        else:
            self.pending = progress

    def flush(self) -> None:
        """Send the report held back, if any (at the end of the call)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._send(pending)
