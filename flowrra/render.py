"""One rendering of broker replies, shared by the ``flowrra`` CLI and the web dashboard.

* :func:`to_json` makes any msgpack value JSON-safe, with one convention for what JSON cannot
  carry: bytes become ``{"$bytes_hex": "..."}``, datetimes ``{"$datetime": "<ISO 8601>"}``,
  NaN and the infinities ``{"$float": "nan"}``; map keys become strings.
* :class:`Attempt` is one entry of a task's attempt history, typed (the broker sends each as
  the positional list of :class:`flowrra.broker.records.Attempt`).
* :func:`inspect_view` is the ``inspect`` reply made displayable: arguments and result
  decoded, history typed, raw bytes left out.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from typing import Any, Final

from flowrra.errors import ProtocolError
from flowrra.protocol import unpack_args, unpack_value

# The fields of an ``inspect`` reply that its view keeps as they are (timestamps are Unix
# seconds; callers format them).
INSPECT_FIELDS: Final = (
    "task_id",
    "task_name",
    "status",
    "priority",
    "error",
    "traceback",
    "retries",
    "max_retries",
    "retry_delay",
    "timeout",
    "attempt",
    "node_id",
    "worker_losses",
    "submitted_at",
    "started_at",
    "finished_at",
    "retry_at",
    "expires_at",
    "eta",  # when a SCHEDULED task is due
    "progress",  # the latest [current, total, message] reported, or None
    "workflow",  # None, or its workflow, kind, step, parents and children
)
# Fields of a task record or its view that hold Unix timestamps.
TIMESTAMP_FIELDS: Final = (
    "submitted_at",
    "started_at",
    "finished_at",
    "retry_at",
    "expires_at",
    "eta",
)


# --------------------------------------------------------------------------- JSON


def to_json(value: Any) -> Any:
    """A JSON-safe copy of a msgpack value (see the module's conventions)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": str(value)}
    if isinstance(value, bytes):
        return {"$bytes_hex": value.hex()}
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, Attempt):
        return to_json(value.as_dict())
    if isinstance(value, dict):
        return {_json_key(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return repr(value)


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes):
        return key.hex()
    return str(key)


def dumps(value: Any, *, compact: bool = True) -> str:
    """``value`` as strict JSON text (through :func:`to_json`)."""
    separators = (",", ":") if compact else None
    return json.dumps(to_json(value), separators=separators, allow_nan=False)


# --------------------------------------------------------------------------- attempts


@dataclass(frozen=True, slots=True)
class Attempt:
    """How one attempt of a task ended."""

    attempt: int
    node_id: str | None
    started_at: float | None
    finished_at: float | None
    outcome: str  # success, failed, lost (its node died) or returned (handed back)
    error: str | None

    @property
    def run_s(self) -> float | None:
        """How long it ran, when both ends are known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    @classmethod
    def from_wire(cls, entry: Any) -> Attempt | None:
        """An entry of an ``inspect`` reply's ``history``; None if it is not one."""
        if not isinstance(entry, list | tuple) or len(entry) < 6:
            return None
        attempt, node_id, started_at, finished_at, outcome, error = entry[:6]
        if isinstance(attempt, bool) or not isinstance(attempt, int):
            return None
        return cls(
            attempt,
            node_id if isinstance(node_id, str) else None,
            _number(started_at),
            _number(finished_at),
            str(outcome),
            error if isinstance(error, str) else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "node_id": self.node_id,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "run_s": self.run_s,
            "outcome": self.outcome,
            "error": self.error,
        }


def attempts(history: Any) -> list[Attempt]:
    """The typed history of an ``inspect`` reply, oldest first (malformed entries skipped)."""
    if not isinstance(history, list):
        return []
    return [a for a in (Attempt.from_wire(entry) for entry in history) if a is not None]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


# --------------------------------------------------------------------------- values


def decode_args(payload: Any, *, max_bytes: int | None = None) -> dict[str, Any]:
    """``args``, ``kwargs`` and ``args_note`` (why they are not shown, else None) of a
    packed call; a payload over ``max_bytes`` is not decoded."""
    out: dict[str, Any] = {"args": None, "kwargs": None, "args_note": None}
    if not isinstance(payload, bytes):
        out["args_note"] = "no arguments stored"
    elif max_bytes is not None and len(payload) > max_bytes:
        out["args_note"] = f"{len(payload)} bytes of arguments: too large to show"
    else:
        try:
            args, kwargs = unpack_args(payload)
        except ProtocolError as exc:
            out["args_note"] = f"undecodable arguments: {exc}"
        else:
            out["args"], out["kwargs"] = list(args), kwargs
    return out


def decode_result(packed: Any, *, max_bytes: int | None = None) -> dict[str, Any]:
    """``has_result``, ``result`` and ``result_note`` (why it is not shown, else None)."""
    out: dict[str, Any] = {"has_result": packed is not None, "result": None, "result_note": None}
    if packed is None:
        return out
    if not isinstance(packed, bytes):
        out["result_note"] = f"unexpected result type {type(packed).__name__}"
    elif max_bytes is not None and len(packed) > max_bytes:
        out["result_note"] = f"{len(packed)} bytes of result: too large to show"
    else:
        try:
            out["result"] = unpack_value(packed)
        except ProtocolError as exc:
            out["result_note"] = f"undecodable result: {exc}"
    return out


def inspect_view(record: dict[str, Any], *, max_decode_bytes: int | None = None) -> dict[str, Any]:
    """An ``inspect`` reply made displayable: the :data:`INSPECT_FIELDS`, the decoded
    arguments (:func:`decode_args`) and result (:func:`decode_result`), and ``history`` as a
    list of :class:`Attempt`. Values stay Python values: pass the view to :func:`to_json`."""
    view = {key: record.get(key) for key in INSPECT_FIELDS}
    view.update(decode_args(record.get("payload"), max_bytes=max_decode_bytes))
    view.update(decode_result(record.get("result"), max_bytes=max_decode_bytes))
    view["history"] = attempts(record.get("history"))
    return view
