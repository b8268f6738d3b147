"""Task definitions: what ``@app.task(...)`` records about a function."""

from __future__ import annotations

import datetime as dt
import inspect
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flowrra import protocol
from flowrra.protocol import SlotKind

_MAIN_MODULES = ("__main__", "__mp_main__")


def importable_module_name(module: str) -> str:
    """The name a module is importable under, even when it runs as a script (``__main__``).

    ``python -m pkg.mod`` gives ``pkg.mod``; ``python path/mod.py`` gives ``mod``, which is what
    ``flowrra-node --app mod:app`` imports from the same directory, so names agree.
    """
    if module not in _MAIN_MODULES:
        return module
    main = sys.modules.get(module)
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name and spec.name not in _MAIN_MODULES:
        name = str(spec.name)
        return name.removesuffix(".__main__")
    path = getattr(main, "__file__", None)
    if path:
        return os.path.splitext(os.path.basename(str(path)))[0]
    return module


def default_task_name(fn: Callable[..., Any]) -> str:
    """``module.qualname`` of ``fn``, stable between client and node."""
    return f"{importable_module_name(fn.__module__)}.{fn.__qualname__}"


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A registered task: its function, name and execution options."""

    name: str
    fn: Callable[..., Any]
    max_retries: int
    retry_delay: float
    priority: int
    cpu_bound: bool
    timeout: float | None
    is_async: bool
    rate_limit: str | None = None  # "10/s": fleet-wide starts per window
    max_concurrency: int | None = None  # fleet-wide runs at once

    @property
    def limits(self) -> protocol.TaskLimits | None:
        """The fleet-wide limits the broker enforces for this task, if any."""
        if self.rate_limit is None and self.max_concurrency is None:
            return None
        count, window = (None, None)
        if self.rate_limit is not None:
            count, window = protocol.parse_rate_limit(self.rate_limit)
        return protocol.TaskLimits(count, window, self.max_concurrency)

    @property
    def kind(self) -> SlotKind:
        """The node capacity this task uses."""
        return SlotKind.CPU if self.cpu_bound else SlotKind.ASYNC

    @property
    def module(self) -> str:
        """Module a worker process imports to find the function."""
        return self.fn.__module__

    @property
    def qualname(self) -> str:
        return self.fn.__qualname__


def make_spec(
    fn: Callable[..., Any],
    *,
    name: str | None,
    max_retries: int,
    retry_delay: float,
    priority: int,
    cpu_bound: bool,
    timeout: float | None,
    rate_limit: str | None = None,
    max_concurrency: int | None = None,
) -> TaskSpec:
    """Validate decorator arguments; a wrong combination is a TypeError or ValueError now."""
    if not callable(fn):
        raise TypeError(f"@app.task() decorates functions, not {type(fn).__qualname__}")
    if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
        raise TypeError(f"{fn.__qualname__} is a generator; a task must return one value")
    is_async = inspect.iscoroutinefunction(fn)
    if cpu_bound and is_async:
        raise TypeError(
            f"{fn.__qualname__} is 'async def' but cpu_bound=True: cpu_bound tasks run in worker "
            "processes and must be plain 'def' functions; drop cpu_bound for I/O-bound coroutines"
        )
    if cpu_bound and ("<locals>" in fn.__qualname__ or not hasattr(fn, "__module__")):
        raise TypeError(
            f"{fn.__qualname__} is defined inside another function; cpu_bound tasks must be "
            "module-level functions so worker processes can import them"
        )
    if (
        isinstance(max_retries, bool)
        or not isinstance(max_retries, int)
        or not 0 <= max_retries <= protocol.MAX_RETRIES
    ):
        raise ValueError(
            f"max_retries must be an int from 0 to {protocol.MAX_RETRIES}, got {max_retries!r}"
        )
    if not _finite_number(retry_delay) or retry_delay < 0:
        raise ValueError(f"retry_delay must be a number >= 0, got {retry_delay!r}")
    if priority is None:
        raise TypeError("priority must be an int, got None")
    check_priority(priority)
    if timeout is not None and (not _finite_number(timeout) or timeout <= 0):
        raise ValueError(f"timeout must be a number > 0 or None, got {timeout!r}")
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"name must be a non-empty string, got {name!r}")
    if rate_limit is not None:
        protocol.parse_rate_limit(rate_limit)  # ValueError for "10/x", "0/s", ...
    if max_concurrency is not None and (
        isinstance(max_concurrency, bool)
        or not isinstance(max_concurrency, int)
        or max_concurrency < 1
    ):
        raise ValueError(f"max_concurrency must be an int >= 1 or None, got {max_concurrency!r}")
    name = name or default_task_name(fn)
    if len(name) > protocol.MAX_TASK_NAME_CHARS:
        raise ValueError(
            f"task name {name[:40]!r}... is longer than {protocol.MAX_TASK_NAME_CHARS} characters"
        )
    return TaskSpec(
        name=name,
        fn=fn,
        max_retries=max_retries,
        retry_delay=float(retry_delay),
        priority=priority,
        cpu_bound=cpu_bound,
        timeout=None if timeout is None else float(timeout),
        is_async=is_async,
        rate_limit=rate_limit,
        max_concurrency=max_concurrency,
    )


def check_priority(priority: object) -> None:
    """Priorities are 32-bit signed ints (None means: the task's default)."""
    if priority is None:
        return
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an int, got {priority!r}")
    if not protocol.MIN_PRIORITY <= priority <= protocol.MAX_PRIORITY:
        raise ValueError(f"priority must fit in 32 bits (-2**31 to 2**31-1), got {priority}")


def _finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def time_options(
    countdown: float | None,
    eta: dt.datetime | None,
    expires: float | dt.datetime | None,
    now: float | None = None,
) -> tuple[float | None, float | None]:
    """Submit's time options as Unix seconds: (not before, deadline). Bad ones raise
    ValueError (TypeError for a value of the wrong type)."""
    if countdown is not None and eta is not None:
        raise ValueError("give countdown or eta, not both")
    now = time.time() if now is None else now
    start: float | None = None
    if countdown is not None:
        if not _finite_number(countdown) or countdown < 0:
            raise ValueError(
                f"countdown must be a finite number of seconds >= 0, got {countdown!r}"
            )
        start = now + countdown
    elif eta is not None:
        start = aware_timestamp(eta, "eta")
    deadline: float | None = None
    if isinstance(expires, dt.datetime):
        deadline = aware_timestamp(expires, "expires")
    elif expires is not None:
        if not _finite_number(expires) or expires < 0:
            raise ValueError(f"expires must be seconds >= 0 or an aware datetime, got {expires!r}")
        deadline = now + expires
    return start, deadline


def aware_timestamp(value: object, what: str) -> float:
    """The Unix time of a timezone-aware datetime (a naive one is ambiguous: refused)."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{what} must be a timezone-aware datetime, got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            f"{what} must be a timezone-aware datetime (naive {value.isoformat()} is ambiguous): "
            "use e.g. datetime.now(timezone.utc)"
        )
    return value.timestamp()
