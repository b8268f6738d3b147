"""``flowrra``: talk to a running broker from the command line."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sys
from typing import Any

import click

from flowrra import __version__
from flowrra.client import BrokerClient
from flowrra.errors import BrokerUnavailable
from flowrra.exitcodes import ExitCode
from flowrra.result import TaskResult
from flowrra.transport import ZmqConnector


def _client(broker: str, timeout: float) -> BrokerClient:
    return BrokerClient(ZmqConnector(broker), connect_timeout_s=timeout, request_timeout_s=timeout)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


@click.group(context_settings={"auto_envvar_prefix": "FLOWRRA", "show_default": True})
@click.version_option(__version__, prog_name="flowrra")
@click.option("--broker", default="tcp://127.0.0.1:5555", help="The broker's endpoint.")
@click.option("--timeout", default=5.0, type=click.FloatRange(min=0.1), help="Seconds to wait.")
@click.pass_context
def main(ctx: click.Context, broker: str, timeout: float) -> None:
    """Inspect a running Flowrra broker. Options can also be set as FLOWRRA_<OPTION>."""
    ctx.obj = {"broker": broker, "timeout": timeout}


@main.command()
@click.pass_obj
def ping(obj: dict[str, Any]) -> None:
    """Check that the broker answers; print what it announces."""

    async def run() -> None:
        client = _client(obj["broker"], obj["timeout"])
        await client.connect()
        welcome = client.welcome
        await client.close()
        assert welcome is not None
        click.echo(
            f"broker {welcome.broker_id} at {obj['broker']}: results on "
            f"{welcome.publish_endpoint}, heartbeat {welcome.heartbeat_interval_ms} ms, "
            f"messages up to {welcome.max_message_bytes} bytes"
        )

    _run(run())


@main.command()
@click.argument("task_id")
@click.option("--wait", "wait_s", type=float, default=None, help="Wait up to N s for the end.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def result(obj: dict[str, Any], task_id: str, wait_s: float | None, as_json: bool) -> None:
    """Show one task's status and result."""

    async def run() -> None:
        client = _client(obj["broker"], obj["timeout"])
        await client.connect()
        try:
            if wait_s is None:
                (record,) = await client.get([task_id])
            else:
                record = await client.wait(task_id, wait_s)
        finally:
            await client.close()
        if record is None:
            click.echo(f"unknown task id {task_id}", err=True)
            sys.exit(ExitCode.FAILURE)
        task = TaskResult.from_record(record)
        if as_json:
            fields = {name: getattr(task, name) for name in task.__dataclass_fields__}
            click.echo(json.dumps(fields, default=_jsonable))
            return
        click.echo(f"{task.task_id}  {task.task_name}  {task.status.value}")
        if task.success:
            click.echo(f"result: {task.result!r}")
        if task.error:
            click.echo(f"error: {task.error} (after {task.retries} retries)")

    _run(run())


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("destination", type=click.Path(file_okay=False))
def backup(data_dir: str, destination: str) -> None:
    """Copy a broker's store (compacted) from DATA_DIR to an empty DESTINATION.

    Safe while the broker runs. To restore, start a broker with --data-dir DESTINATION.
    """
    from broker.store import backup as backup_store

    try:
        size = backup_store(data_dir, destination)
    except (FileNotFoundError, FileExistsError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    click.echo(f"backed up {data_dir} to {destination} ({size / 2**20:.1f} MiB)")


def _run(coro: Any) -> None:
    try:
        asyncio.run(coro)
    except BrokerUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    except TimeoutError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
