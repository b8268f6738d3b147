"""A broker driven directly, with helpers to talk to it as clients and nodes would."""

from __future__ import annotations

from typing import Any

from flowrra.broker.config import BrokerConfig
from flowrra.broker.core import Broker
from flowrra.broker.records import TaskRecord
from flowrra.broker.store import MemoryStore, Store
from flowrra.protocol import (
    Command,
    Dispatch,
    ErrorInfo,
    Message,
    NodeReady,
    Outcome,
    SlotKind,
    Submission,
    decode,
    encode,
    pack_args,
    pack_value,
    parse_record,
    parse_tasks,
)

T0 = 1_000_000.0  # the test clock's start, in seconds
INTERVAL_MS = 1000
LIVENESS = 3
EXPIRY_S = INTERVAL_MS * LIVENESS / 1000
STEP = INTERVAL_MS / 4000  # how often tick() does housekeeping

CLIENT = b"client-1"
NODE_A = b"node-a"
NODE_B = b"node-b"


def submission(task_id: str, **overrides: Any) -> Submission:
    fields: dict[str, Any] = {
        "task_id": task_id,
        "name": "jobs.work",
        "priority": 0,
        "payload": pack_args([task_id], {}),
        "max_retries": 3,
        "retry_delay_s": 2.0,
        "timeout_s": None,
        "submitted_at": T0,
    }
    fields.update(overrides)
    return Submission(**fields)


def node_ready(node_id: str = "node-a", **overrides: Any) -> NodeReady:
    fields: dict[str, Any] = {
        "node_id": node_id,
        "hostname": "host",
        "pid": 42,
        "async_slots": 1,
        "cpu_slots": 0,
        "tasks": {"jobs.work": SlotKind.ASYNC},
        "running": [],
    }
    fields.update(overrides)
    return NodeReady(**fields)


class Harness:
    """A broker plus helpers to talk to it as clients and nodes would."""

    def __init__(self, store: Store | None = None, **config: Any) -> None:
        options: dict[str, Any] = {
            "data_dir": None,
            "heartbeat_interval_ms": INTERVAL_MS,
            "heartbeat_liveness": LIVENESS,
        }
        options.update(config)
        self.broker = Broker(store or MemoryStore(), BrokerConfig(**options), "inproc://results")
        self.now = T0

    # ------------------------------------------------------------------ input

    def send(self, peer: bytes, command: Command, body: object = None) -> None:
        self.broker.handle(peer, encode(command, body), self.now)

    def submit(self, *subs: Submission, peer: bytes = CLIENT) -> None:
        self.send(peer, Command.SUBMIT, [s.to_wire() for s in subs])

    def ready(self, peer: bytes, node_id: str | None = None, **overrides: Any) -> None:
        ready = node_ready(node_id or peer.decode(), **overrides)
        self.send(peer, Command.READY, ready.to_wire())

    def result(self, peer: bytes, task_id: str, attempt: int, value: object = None) -> None:
        outcome = Outcome(task_id, attempt, pack_value(value), None, self.now - 0.5, self.now)
        self.send(peer, Command.RESULTS, [outcome.to_wire()])

    def failure(self, peer: bytes, task_id: str, attempt: int, exc: str = "ValueError") -> None:
        error = ErrorInfo(exc, "boom", "Traceback (most recent call last): ...")
        outcome = Outcome(task_id, attempt, None, error, self.now - 0.5, self.now)
        self.send(peer, Command.RESULTS, [outcome.to_wire()])

    def tick(self, now: float | None = None) -> None:
        if now is not None:
            self.now = now
        self.broker.tick(self.now)

    def advance(self, seconds: float, heartbeats: tuple[bytes, ...] = ()) -> None:
        """Let time pass in housekeeping steps; ``heartbeats`` peers stay alive meanwhile."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(self.now + STEP, end)
            for peer in heartbeats:
                self.send(peer, Command.HEARTBEAT)
            self.broker.tick(self.now)

    # ------------------------------------------------------------------ output

    def take(self) -> tuple[list[tuple[bytes, Message]], list[tuple[bytes, Message]]]:
        messages, publications = self.broker.outbox.take()
        return (
            [(peer, decode(frames)) for peer, frames in messages],
            [(frames[0], decode(frames[1:])) for frames in publications],
        )

    def replies(self, command: Command | None = None) -> list[tuple[bytes, Message]]:
        """Messages (not publications) in the outbox, heartbeats left out; empties it."""
        messages, _ = self.take()
        return [
            (peer, m)
            for peer, m in messages
            if m.command is not Command.HEARTBEAT and (command is None or m.command is command)
        ]

    def dispatched(self) -> dict[bytes, list[Dispatch]]:
        """TASKS sent, per node; empties the outbox."""
        out: dict[bytes, list[Dispatch]] = {}
        for peer, message in self.replies(Command.TASKS):
            out.setdefault(peer, []).extend(parse_tasks(message.body))
        return out

    def record(self, task_id: str) -> TaskRecord:
        """The broker's current view of a task (running tasks may differ from the store)."""
        record = self.broker.view(task_id)
        assert record is not None, f"no record for {task_id}"
        return record

    def get(self, task_id: str) -> dict[str, Any] | None:
        """The public record a client's GET returns."""
        self.send(b"getter", Command.GET, [0, [task_id]])
        messages, publications = self.broker.outbox.take()
        self.broker.outbox.messages = [m for m in messages if m[0] != b"getter"]
        self.broker.outbox.publications = publications
        (frames,) = [f for peer, f in messages if peer == b"getter"]
        records = decode(frames).body[1]  # found records only: none for an unknown id
        return parse_record(records[0]) if records else None


def ids(dispatches: list[Dispatch]) -> list[str]:
    return [d.task_id for d in dispatches]
