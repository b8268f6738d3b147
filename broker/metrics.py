"""Prometheus metrics for ``flowrra-broker --metrics-port`` (the optional ``metrics`` extra).

:class:`BrokerMetrics` is a :class:`flowrra.broker.core.BrokerObserver`: the broker's loop
calls it on every task event, and it keeps per-task-name counters and histograms in a
registry of its own.
Gauges (queue depths, tasks in flight, nodes and their free slots, retry timers) are read from
the broker's state when Prometheus scrapes, on the HTTP server's thread: that state is only
read there, copied defensively, and the store (not thread safe) is never touched.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeVar
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flowrra.protocol import SlotKind, TaskStatus

if TYPE_CHECKING:
    from flowrra.broker.core import Broker

log = logging.getLogger("flowrra.broker")

T = TypeVar("T")

# Queue waits and run times span milliseconds to hours.
BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 300.0, 900.0, 3600.0, float("inf"),
)  # fmt: skip
# How often a scrape re-reads state the broker loop changed under it before giving up.
SNAPSHOT_ATTEMPTS = 20


class _TaskMetrics:
    """The labelled children of one task name (looked up once, then cached)."""

    __slots__ = ("failed", "queue_wait", "retried", "run", "submitted", "succeeded")

    def __init__(self, metrics: BrokerMetrics, name: str) -> None:
        self.submitted = metrics.submitted_total.labels(task=name)
        self.succeeded = metrics.succeeded_total.labels(task=name)
        self.failed = metrics.failed_total.labels(task=name)
        self.retried = metrics.retried_total.labels(task=name)
        self.queue_wait = metrics.queue_wait.labels(task=name)
        self.run = metrics.run_time.labels(task=name)


class BrokerMetrics:
    """Task counters and timings, plus the broker's state as gauges, in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.submitted_total = Counter(
            "flowrra_tasks_submitted",
            "Tasks accepted by the broker.",
            ["task"],
            registry=self.registry,
        )
        self.succeeded_total = Counter(
            "flowrra_tasks_succeeded",
            "Tasks that finished with a result.",
            ["task"],
            registry=self.registry,
        )
        self.failed_total = Counter(
            "flowrra_tasks_failed",
            "Tasks that ended FAILED (after their retries).",
            ["task"],
            registry=self.registry,
        )
        self.retried_total = Counter(
            "flowrra_tasks_retried",
            "Failed attempts that were scheduled to run again.",
            ["task"],
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "flowrra_task_queue_wait_seconds",
            "Time from submission to the start of an attempt.",
            ["task"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.run_time = Histogram(
            "flowrra_task_run_seconds",
            "Run time of the final attempt of finished tasks, as the node measured it.",
            ["task"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.state = BrokerStateCollector()
        self.registry.register(self.state)
        self._tasks: dict[str, _TaskMetrics] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def attach(self, broker: Broker) -> None:
        """Report ``broker``'s state as gauges (the caller also adds this observer to it)."""
        self.state.broker = broker

    # ------------------------------------------------------------------ BrokerObserver

    def _for(self, name: str) -> _TaskMetrics:
        children = self._tasks.get(name)
        if children is None:
            children = self._tasks[name] = _TaskMetrics(self, name)
        return children

    def submitted(self, name: str, task_id: str) -> None:
        self._for(name).submitted.inc()

    def started(self, name: str, queue_wait_s: float, task_id: str) -> None:
        self._for(name).queue_wait.observe(queue_wait_s)

    def retried(self, name: str, task_id: str) -> None:
        self._for(name).retried.inc()

    def finished(self, name: str, status: TaskStatus, run_s: float | None, task_id: str) -> None:
        children = self._for(name)
        if status is TaskStatus.SUCCESS:
            children.succeeded.inc()
        else:
            children.failed.inc()
        if run_s is not None:
            children.run.observe(run_s)

    # ------------------------------------------------------------------ HTTP

    def serve(self, host: str, port: int) -> None:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; raises OSError if the
        address cannot be bound."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)

    @property
    def port(self) -> int | None:
        """The port actually bound (useful with port 0)."""
        return None if self._server is None else int(self._server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP server."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None


class BrokerStateCollector(Collector):
    """Gauges read from the broker's in-memory state at scrape time (never from the store).

    Runs on the HTTP thread while the broker loop mutates that state: every read is a copy,
    retried when the loop changed a dict under it.
    """

    def __init__(self, broker: Broker | None = None) -> None:
        self.broker = broker

    def describe(self) -> Iterable[Metric]:
        return [
            GaugeMetricFamily("flowrra_queue_depth", "Queued tasks.", labels=["priority"]),
            GaugeMetricFamily("flowrra_tasks_in_flight", "Task attempts running on nodes."),
            GaugeMetricFamily("flowrra_nodes_connected", "Nodes registered with the broker."),
            GaugeMetricFamily(
                "flowrra_node_free_slots", "Free slots per node.", labels=["node", "kind"]
            ),
            GaugeMetricFamily("flowrra_retry_timers", "Failed tasks waiting for their retry."),
        ]

    def collect(self) -> Iterable[Metric]:
        broker = self.broker
        if broker is None:
            return []
        depth = GaugeMetricFamily("flowrra_queue_depth", "Queued tasks.", labels=["priority"])
        by_priority = _snapshot(lambda: broker.queues.depth_by_priority())
        for priority, count in sorted((by_priority or {}).items()):
            depth.add_metric([str(priority)], count)
        in_flight = GaugeMetricFamily(
            "flowrra_tasks_in_flight", "Task attempts running on nodes.", len(broker.leases)
        )
        timers = GaugeMetricFamily(
            "flowrra_retry_timers", "Failed tasks waiting for their retry.", len(broker.timers)
        )
        nodes = _snapshot(lambda: [(n.node_id, dict(n.free)) for n in list(broker.nodes)])
        connected = GaugeMetricFamily(
            "flowrra_nodes_connected",
            "Nodes registered with the broker.",
            len(broker.nodes) if nodes is None else len(nodes),
        )
        free = GaugeMetricFamily(
            "flowrra_node_free_slots", "Free slots per node.", labels=["node", "kind"]
        )
        for node_id, slots in sorted(nodes or []):
            for kind in SlotKind:
                free.add_metric([node_id, kind.value], slots.get(kind, 0))
        return [depth, in_flight, connected, free, timers]


def _snapshot(read: Callable[[], T]) -> T | None:
    """``read()``, retried while the broker loop changes a dict or set it iterates."""
    for _ in range(SNAPSHOT_ATTEMPTS):
        try:
            return read()
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    log.warning("metrics: broker state kept changing during a scrape; a gauge is left out")
    return None
