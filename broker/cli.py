"""``flowrra-broker``: parse options into a :class:`BrokerConfig`, then :func:`serve` it."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import click
import zmq

from broker.config import BrokerConfig
from broker.core import Broker
from broker.server import BrokerService, open_store
from broker.store import Durability
from flowrra.exitcodes import ExitCode
from flowrra.logs import LOG_LEVELS, configure_logging
from flowrra.transport import Wakeup, ZmqBrokerEndpoint

log = logging.getLogger("flowrra.broker")


async def serve(config: BrokerConfig) -> None:
    """Run a broker on ZeroMQ sockets until SIGINT or SIGTERM."""
    wakeup = Wakeup()
    endpoint = ZmqBrokerEndpoint(
        config.bind,
        config.publish,
        wakeup,
        advertised_publish=config.advertise_publish,
        max_message_bytes=config.max_message_bytes,
    )
    store = open_store(config)
    service = BrokerService(
        Broker(store, config, endpoint.publish_endpoint), endpoint, wakeup, store
    )
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _on_signal, service, signum)
    log.info(
        "broker listening on %s, publishing results on %s; data in %s (durability %s)",
        endpoint.bind_url,
        endpoint.publish_endpoint,
        config.data_dir or "memory",
        config.durability,
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


@click.command(context_settings={"auto_envvar_prefix": "FLOWRRA", "show_default": True})
@click.option("--bind", default="tcp://127.0.0.1:5555", help="ROUTER endpoint to bind.")
@click.option("--publish", default=None, help="Result PUB endpoint (default: bind port + 1).")
@click.option(
    "--advertise-publish",
    default=None,
    help="Publish endpoint clients are told to connect to (default: the bound one).",
)
@click.option("--data-dir", default="./flowrra-data", help="Directory of the LMDB store.")
@click.option(
    "--durability",
    type=click.Choice([d.value for d in Durability]),
    default=Durability.FULL.value,
    help="full: fsync every commit; fast: no fsync (survives a killed process only).",
)
@click.option("--heartbeat-ms", default=1000, type=click.IntRange(min=10))
@click.option("--liveness", default=3, type=click.IntRange(min=1), help="Missed heartbeats.")
@click.option("--result-ttl", default=86400.0, type=click.FloatRange(min=1), help="Seconds.")
@click.option("--max-message-bytes", default=16 * 1024 * 1024, type=click.IntRange(min=1024))
@click.option("--max-worker-losses", default=3, type=click.IntRange(min=1))
@click.option("--log-level", default="INFO", type=click.Choice(LOG_LEVELS))
@click.option("--log-format", default="text", type=click.Choice(["text", "json"]))
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
    )
    try:
        asyncio.run(serve(config))
    except zmq.ZMQError as exc:
        log.error("cannot bind %s / %s: %s", bind, publish or "bind port + 1", exc)
        sys.exit(ExitCode.UNAVAILABLE)
    except ValueError as exc:
        log.error("%s", exc)
        sys.exit(ExitCode.CONFIG)
    except Exception:
        log.exception("the broker stopped on an internal error")
        sys.exit(ExitCode.SOFTWARE)
    sys.exit(ExitCode.OK)
