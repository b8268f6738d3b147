"""``flowrra-node``: import the user's app, then run a :class:`Node` against a broker."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys

import click

from flowrra import protocol
from flowrra.app import Flowrra
from flowrra.exitcodes import ExitCode
from flowrra.logs import configure_logging
from flowrra.node.worker import Node
from flowrra.options import curve_client_options, log_options
from flowrra.runner import run
from flowrra.security import client_keys
from flowrra.transport import ZmqConnector

log = logging.getLogger("flowrra.node")


def import_app(spec: str) -> Flowrra:
    """Import ``package.module:attribute`` (the attribute defaults to ``app``)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise click.BadParameter(f"expected 'package.module:app', got {spec!r}")
    # Like `python -m`, make the working directory importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = importlib.import_module(module_name)
    app = getattr(module, attribute or "app", None)
    if not isinstance(app, Flowrra):
        raise click.BadParameter(f"{spec!r} is not a Flowrra app (got {type(app).__qualname__})")
    return app


async def run_node(node: Node, broker: str, grace_s: float = 30.0) -> None:
    """Run ``node`` until SIGINT or SIGTERM (the first drains for ``grace_s``, a second stops
    at once)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _on_signal, node, signum, grace_s)
    log.info(
        "node %s connecting to %s: %d async slots, %d worker processes, tasks: %s",
        node.node_id,
        broker,
        node.concurrency,
        node.processes,
        ", ".join(sorted(node.specs)) or "(none)",
    )
    await node.run()


def _on_signal(node: Node, signum: int, grace_s: float) -> None:
    log.info("received %s, shutting down", signal.Signals(signum).name)
    node.stop(grace_s)


@click.command(context_settings={"auto_envvar_prefix": "FLOWRRA", "show_default": True})
@click.option(
    "--app",
    "app_spec",
    required=True,
    envvar="FLOWRRA_APP",
    help="The app to serve, as 'module:attribute'.",
)
@click.option("--broker", default=protocol.DEFAULT_BROKER_URL, help="The broker's ROUTER endpoint.")
@click.option("--concurrency", default=100, type=click.IntRange(min=1), help="Async slots.")
@click.option(
    "--processes",
    default=None,
    type=click.IntRange(min=0),
    help="Worker processes for cpu_bound tasks [default: CPU count].",
)
@click.option(
    "--node-id", default=None, help="A stable name for this node [default: host-pid-random]."
)
@curve_client_options
@click.option(
    "--grace",
    default=30.0,
    type=click.FloatRange(min=0),
    help="Seconds running tasks get to finish on SIGTERM before they are handed back.",
)
@log_options
def main(
    app_spec: str,
    broker: str,
    concurrency: int,
    processes: int | None,
    node_id: str | None,
    curve_server_key: str | None,
    curve_secret_key: str | None,
    grace: float,
    log_level: str,
    log_format: str,
) -> None:
    """Run a Flowrra node. Every option can also be set as FLOWRRA_<OPTION>."""
    configure_logging(log_level, log_format)
    try:
        app = import_app(app_spec)
    except (ImportError, click.BadParameter) as exc:
        log.error("cannot load the app %r: %s", app_spec, exc)
        sys.exit(ExitCode.CONFIG)
    try:
        keys = client_keys(curve_server_key, curve_secret_key)
    except ValueError as exc:
        log.error("%s", exc)
        sys.exit(ExitCode.CONFIG)
    node = Node(
        app.tasks,
        ZmqConnector(broker, keys=keys),
        concurrency=concurrency,
        processes=processes,
        node_id=node_id,
    )
    run(run_node(node, broker, grace))
    sys.exit(ExitCode.OK)
