"""Calls described without sending them, for chains, groups and chords.

``call(task, *args, **kwargs)`` describes one call; ``app.chain``, ``app.group`` and
``app.chord`` send several as one workflow that the broker keeps (see
:mod:`flowrra.broker.workflows`). A list (or tuple) of calls inside a chain is a group.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Call:
    """One call of a task, with its submit options, not sent yet."""

    task: Callable[..., Any] | str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    priority: int | None = None
    countdown: float | None = None
    expires: float | dt.datetime | None = None
    task_id: str | None = None

    def with_options(
        self,
        *,
        priority: int | None = None,
        countdown: float | None = None,
        expires: float | dt.datetime | None = None,
        task_id: str | None = None,
    ) -> Call:
        """A copy with these submit options (the ones not given are kept)."""
        changes: dict[str, Any] = {
            "priority": priority,
            "countdown": countdown,
            "expires": expires,
            "task_id": task_id,
        }
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def call(task: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> Call:
    """Describe one call of ``task`` (a decorated function or its name) without sending it."""
    return Call(task, args, dict(kwargs))
