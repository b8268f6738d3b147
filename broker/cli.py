"""``flowrra-broker``: parse options into a :class:`BrokerConfig`, then :func:`serve` it."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING

import click
import zmq

from flowrra.broker.config import BrokerConfig
from flowrra.broker.core import Broker
from flowrra.broker.endpoint import ZmqBrokerEndpoint
from flowrra.broker.security import BrokerAccess
from flowrra.broker.server import BrokerService, open_store
from flowrra.broker.store import Durability
from flowrra.exitcodes import ExitCode
from flowrra.logs import configure_logging
from flowrra.options import log_options
from flowrra.runner import run
from flowrra.transport import Wakeup

if TYPE_CHECKING:
    from flowrra.broker.metrics import BrokerMetrics

log = logging.getLogger("flowrra.broker")

METRICS_EXTRA_HINT = "pip install 'flowrra-fabric[metrics]'"


async def serve(config: BrokerConfig, *, metrics: BrokerMetrics | None = None) -> None:
    """Run a broker on ZeroMQ sockets until SIGINT or SIGTERM (reporting to ``metrics``)."""
    wakeup = Wakeup()
    security = None
    if config.curve_secret_key is not None:
        if config.node_keys is None or config.client_keys is None:
            raise ValueError("--curve-secret-key needs --node-keys and --client-keys")
        security = BrokerAccess(config.curve_secret_key, config.node_keys, config.client_keys)
    endpoint = ZmqBrokerEndpoint(
        config.bind,
        config.publish,
        wakeup,
        advertised_publish=config.advertise_publish,
        max_message_bytes=config.max_message_bytes,
        security=security,
    )
    store = open_store(config)
    broker = Broker(store, config, endpoint.publish_endpoint)
    if metrics is not None:
        metrics.attach(broker)
        broker.observers.append(metrics)
    service = BrokerService(broker, endpoint, wakeup, store)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _on_signal, service, signum)
    log.info(
        "broker listening on %s, publishing results on %s; data in %s (durability %s, %s)",
        endpoint.bind_url,
        endpoint.publish_endpoint,
        config.data_dir or "memory",
        config.durability,
        "CURVE authentication on" if security else "no authentication",
    )
    try:
        await service.run()
    finally:
        endpoint.close()
        store.close()
        log.info("broker stopped")


def _on_signal(service: BrokerService, signum: int) -> None:
    log.info("received %s, shutting down", signal.Signals(signum).name)
    service.stop()


def metrics_host(bind: str) -> str:
    """The host of a ``tcp://host:port`` bind URL; 127.0.0.1 for a wildcard or non-TCP one."""
    scheme, _, rest = bind.partition("://")
    host = rest.rpartition(":")[0].strip("[]") if scheme == "tcp" else ""
    return "127.0.0.1" if host in ("", "*", "0.0.0.0", "::") else host


def _start_metrics(bind: str, host: str | None, port: int) -> BrokerMetrics:
    """Serve /metrics on host:port (exits with a clear message if that is impossible)."""
    try:
        from flowrra.broker.metrics import BrokerMetrics
    except ImportError as exc:
        log.error(
            "--metrics-port needs the prometheus_client package (%s): %s", exc, METRICS_EXTRA_HINT
        )
        sys.exit(ExitCode.CONFIG)
    host = host or metrics_host(bind)
    metrics = BrokerMetrics()
    try:
        metrics.serve(host, port)
    except OSError as exc:
        log.error("cannot serve metrics on %s port %d: %s", host, port, exc)
        sys.exit(ExitCode.UNAVAILABLE)
    log.info("serving metrics on http://%s:%d/metrics", host, metrics.port or port)
    return metrics


# Every default below is BrokerConfig's: one source of truth for the CLI and the library.
_DEFAULTS = BrokerConfig()


@click.command(context_settings={"auto_envvar_prefix": "FLOWRRA", "show_default": True})
@click.option("--bind", default=_DEFAULTS.bind, help="ROUTER endpoint to bind.")
@click.option("--publish", default=None, help="Result PUB endpoint (default: bind port + 1).")
@click.option(
    "--advertise-publish",
    default=None,
    help="Publish endpoint clients are told to connect to (default: the bound one).",
)
@click.option("--data-dir", default=_DEFAULTS.data_dir, help="Directory of the LMDB store.")
@click.option(
    "--durability",
    type=click.Choice([d.value for d in Durability]),
    default=_DEFAULTS.durability.value,
    help="full: fsync every commit; fast: no fsync (survives a killed process only).",
)
@click.option(
    "--heartbeat-ms", default=_DEFAULTS.heartbeat_interval_ms, type=click.IntRange(min=10)
)
@click.option(
    "--liveness",
    default=_DEFAULTS.heartbeat_liveness,
    type=click.IntRange(min=1),
    help="Missed heartbeats.",
)
@click.option(
    "--result-ttl", default=_DEFAULTS.result_ttl_s, type=click.FloatRange(min=1), help="Seconds."
)
@click.option(
    "--max-message-bytes", default=_DEFAULTS.max_message_bytes, type=click.IntRange(min=65536)
)
@click.option(
    "--max-worker-losses", default=_DEFAULTS.max_worker_losses, type=click.IntRange(min=1)
)
@click.option(
    "--lease-grace",
    default=_DEFAULTS.lease_grace_s,
    type=click.FloatRange(min=0),
    help="Seconds past a task's timeout after which an attempt its node never reported "
    "counts as lost and runs again.",
)
@click.option(
    "--cpu-prefetch",
    default=_DEFAULTS.cpu_prefetch,
    type=click.IntRange(min=0),
    help="cpu_bound tasks dispatched ahead per worker process of a node, so that a worker "
    "never waits for the next dispatch (0: none). Tasks with fleet-wide limits or a "
    "deadline never are.",
)
@click.option(
    "--curve-secret-key",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="The broker's secret key file: enables CURVE authentication and encryption.",
)
@click.option(
    "--node-keys",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Directory of public keys allowed to connect as nodes.",
)
@click.option(
    "--client-keys",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Directory of public keys allowed to connect as clients.",
)
@click.option(
    "--metrics-port",
    default=None,
    type=click.IntRange(0, 65535),
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port, logged).",
)
@click.option(
    "--metrics-host",
    default=None,
    help="Address of the metrics server [default: the --bind host, 127.0.0.1 for a wildcard].",
)
@log_options
def main(
    bind: str,
    publish: str | None,
    advertise_publish: str | None,
    data_dir: str,
    durability: str,
    heartbeat_ms: int,
    liveness: int,
    result_ttl: float,
    max_message_bytes: int,
    max_worker_losses: int,
    lease_grace: float,
    cpu_prefetch: int,
    curve_secret_key: str | None,
    node_keys: str | None,
    client_keys: str | None,
    metrics_port: int | None,
    metrics_host: str | None,
    log_level: str,
    log_format: str,
) -> None:
    """Run the Flowrra broker. Every option can also be set as FLOWRRA_<OPTION>."""
    configure_logging(log_level, log_format)
    config = BrokerConfig(
        bind=bind,
        publish=publish,
        advertise_publish=advertise_publish,
        data_dir=data_dir,
        durability=Durability(durability),
        heartbeat_interval_ms=heartbeat_ms,
        heartbeat_liveness=liveness,
        result_ttl_s=result_ttl,
        max_message_bytes=max_message_bytes,
        max_worker_losses=max_worker_losses,
        lease_grace_s=lease_grace,
        cpu_prefetch=cpu_prefetch,
        curve_secret_key=curve_secret_key,
        node_keys=node_keys,
        client_keys=client_keys,
    )
    metrics = None
    if metrics_port is not None:
        metrics = _start_metrics(bind, metrics_host, metrics_port)
    try:
        run(serve(config, metrics=metrics))
    except zmq.ZMQError as exc:
        log.error("cannot bind %s / %s: %s", bind, publish or "bind port + 1", exc)
        sys.exit(ExitCode.UNAVAILABLE)
    except ValueError as exc:
        log.error("%s", exc)
        sys.exit(ExitCode.CONFIG)
    except Exception:
        log.exception("the broker stopped on an internal error")
        sys.exit(ExitCode.SOFTWARE)
    finally:
        if metrics is not None:
            metrics.close()
    sys.exit(ExitCode.OK)
