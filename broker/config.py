"""Broker settings: parsed once by the CLI (or built by the embedded app), then passed around."""

from __future__ import annotations

from dataclasses import dataclass

from flowrra.broker.store import Durability
from flowrra.protocol import (
    DEFAULT_BROKER_URL,
    HEARTBEAT_INTERVAL_MS,
    HEARTBEAT_LIVENESS,
    MAX_MESSAGE_BYTES,
)


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything a broker needs to run."""

    bind: str = DEFAULT_BROKER_URL
    publish: str | None = None  # default: the bind port + 1
    advertise_publish: str | None = None  # what clients are told to connect to, if not `publish`
    data_dir: str | None = "./flowrra-data"  # None keeps state in memory (embedded default)
    durability: Durability = Durability.FULL
    heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    result_ttl_s: float = 24 * 3600.0
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_worker_losses: int = 3  # a task whose node died this often ends FAILED
    expiry_sweep_interval_s: float = 10.0
    # An attempt of a task with a timeout that no node reported within timeout + this grace
    # is treated as lost (its node heartbeats but never answers) and runs again.
    lease_grace_s: float = 30.0
    # Tasks dispatched ahead per cpu slot of a node, to run as soon as a worker process frees
    # (0: one task per free slot). Tasks with fleet-wide limits or a deadline never are.
    cpu_prefetch: int = 1
    curve_secret_key: str | None = None  # enables CURVE with the two key directories below
    node_keys: str | None = None
    client_keys: str | None = None
