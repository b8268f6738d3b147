"""The broker's task record: everything it knows about one task, as stored in LMDB."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from flowrra.errors import ProtocolError
from flowrra.protocol import Submission, TaskStatus, packb, same_call

_RECORD_FORMAT = 2
_STATUSES = {status.value: status for status in TaskStatus}
_SCHEDULED = TaskStatus.SCHEDULED  # read per published record: a module global is faster


def _status(value: object) -> TaskStatus:
    """The status a stored record names (a dict lookup: calling the enum costs 0.6 us)."""
    try:
        return _STATUSES[value]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ProtocolError(f"unknown task status {value!r} in a stored record") from None


class Attempt(NamedTuple):
    """How one attempt of a task ended (its history entry)."""

    attempt: int
    node_id: str | None
    started_at: float | None
    finished_at: float | None
    outcome: str  # success, failed, lost (its node died) or returned (handed back)
    error: str | None


def encode_attempt(entry: Attempt) -> bytes:
    return packb(list(entry))


def decode_attempt(data: bytes) -> Attempt:
    return Attempt(*msgpack.unpackb(data, raw=False))


@dataclass(slots=True)
class TaskRecord:
    """One task's durable state. ``attempt`` counts dispatches; it fences stale results."""

    task_id: str
    name: str
    priority: int
    payload: bytes
    max_retries: int
    retry_delay_s: float
    timeout_s: float | None
    submitted_at: float
    status: TaskStatus = TaskStatus.PENDING
    attempt: int = 0
    retries: int = 0
    order: int = 0  # position within its priority (lower runs first)
    started_at: float | None = None
    finished_at: float | None = None
    result: bytes | None = None
    error: str | None = None
    traceback: str | None = None
    retry_at: float | None = None
    node_id: str | None = None
    worker_losses: int = 0
    expires_at: float | None = None  # when a finished task's record is forgotten
    queued_at: float | None = None  # when it last entered a queue (for the queue-wait metric)
    eta: float | None = None  # not to start before (a countdown or eta), while SCHEDULED
    deadline: float | None = None  # expires if not started by then (``expires=``)
    workflow_id: str | None = None  # the chain, group or chord it belongs to
    step: int = 0  # its step in that workflow
    progress: list[Any] | None = None  # the latest [current, total, message] reported

    @classmethod
    def from_submission(cls, sub: Submission, order: int) -> TaskRecord:
        return cls(
            sub.task_id,
            sub.name,
            sub.priority,
            sub.payload,
            sub.max_retries,
            sub.retry_delay_s,
            sub.timeout_s,
            sub.submitted_at,
            order=order,
            eta=sub.eta,
            deadline=sub.deadline,
        )

    def snapshot(self) -> tuple[Any, ...]:
        """Every field but the arguments, as a tuple of immutable values: what the in-memory
        store keeps of a record (no caller can change it in place, so a rolled-back tick
        leaves it intact; nothing in it is tracked by the garbage collector), and what
        :meth:`encode` encodes."""
        progress = self.progress
        return (
            self.task_id,
            self.name,
            self.priority,
            self.max_retries,
            self.retry_delay_s,
            self.timeout_s,
            self.submitted_at,
            self.status._value_,  # (`.value` is a descriptor: 0.1 us)
            self.attempt,
            self.retries,
            self.order,
            self.started_at,
            self.finished_at,
            self.result,
            self.error,
            self.traceback,
            self.retry_at,
            self.node_id,
            self.worker_losses,
            self.expires_at,
            self.queued_at,
            self.eta,
            self.deadline,
            self.workflow_id,
            self.step,
            None if progress is None else tuple(progress),
        )

    @classmethod
    def from_snapshot(cls, snapshot: tuple[Any, ...], payload: bytes) -> TaskRecord:
        """A new record from :meth:`snapshot` and its arguments."""
        # Every field gets its declared type at construction (the status as a TaskStatus,
        # the progress as a list), as a compiled build (mypyc) checks: docs/benchmarks.md.
        args: list[Any] = [*snapshot[:3], payload, *snapshot[3:]]
        args[8] = _STATUSES[args[8]]
        progress = args[26]
        if progress is not None:
            args[26] = list(progress)
        return cls(*args)

    @staticmethod
    def encode_snapshot(snapshot: tuple[Any, ...]) -> bytes:
        """The stored record of a :meth:`snapshot` (what :meth:`encode` returns)."""
        return packb((_RECORD_FORMAT, *snapshot))

    def encode(self) -> bytes:
        """The stored record: every field but the arguments and the history, which the
        repository keeps apart (finishing a task rewrites neither)."""
        return packb((_RECORD_FORMAT, *self.snapshot()))

    @classmethod
    def decode(cls, data: bytes, payload: bytes) -> TaskRecord:
        fields = msgpack.unpackb(data, raw=False)
        if not isinstance(fields, list) or not fields or fields[0] != _RECORD_FORMAT:
            raise ProtocolError("unknown task record format")
        args = [*fields[1:4], payload, *fields[4:]]
        args[8] = _status(args[8])
        return cls(*args)

    @classmethod
    def decode_format_1(cls, data: bytes) -> tuple[TaskRecord, list[Attempt]]:
        """A record of store format 1 (arguments and history inside), and its history."""
        fields = msgpack.unpackb(data, raw=False)
        if not isinstance(fields, list) or not fields or fields[0] != 1:
            raise ProtocolError("unknown task record format")
        history = [Attempt(*entry) for entry in fields[21]]
        args = [*fields[1:21], *fields[22:]]
        args[8] = _status(args[8])
        return cls(*args), history

    def attempt_end(
        self,
        outcome: str,
        *,
        started_at: float | None = None,
        finished_at: float | None = None,
        error: str | None = None,
    ) -> Attempt:
        """The end of the current attempt, for the history."""
        return Attempt(self.attempt, self.node_id, started_at, finished_at, outcome, error)

    def is_call_of(self, sub: Submission) -> bool:
        """True when ``sub`` is the call this task was submitted as (same task, same
        arguments, whatever the payloads' headers): a resubmit of it is idempotent."""
        return self.name == sub.name and same_call(self.payload, sub.payload)

    def public_size(self) -> int:
        """Roughly the encoded size of :meth:`public` (its blobs and texts dominate)."""
        return (
            256
            + len(self.task_id)
            + len(self.name)
            + len(self.result or b"")
            + len(self.error or "")
            + len(self.traceback or "")
        )

    def public(self) -> dict[str, Any]:
        """The client-facing view (``protocol.RECORD_FIELDS``). It shares no mutable object
        with the record: an in-process client gets it unencoded."""
        progress = self.progress
        return {
            "task_id": self.task_id,
            "task_name": self.name,
            "status": self.status._value_,
            "result": self.result,
            "error": self.error,
            "traceback": self.traceback,
            "retries": self.retries,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "eta": self.eta if self.status is _SCHEDULED else None,
            "progress": None if progress is None else list(progress),
        }
