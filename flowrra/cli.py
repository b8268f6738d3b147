"""``flowrra``: talk to a running broker from the command line."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import sys
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from types import FrameType
from typing import Any, TypeVar

import click

from flowrra import __version__, render
from flowrra.client import BrokerClient
from flowrra.errors import AdminError, BrokerUnavailable
from flowrra.exitcodes import ExitCode
from flowrra.options import curve_client_options
from flowrra.protocol import (
    DEFAULT_BROKER_URL,
    FINAL_STATUS_VALUES,
    MAX_PRIORITY,
    MIN_PRIORITY,
    TaskStatus,
)
from flowrra.result import TaskResult
from flowrra.security import client_keys
from flowrra.security import keygen as generate_keys
from flowrra.transport import ZmqConnector

T = TypeVar("T")

# Queue priorities the broker accepts.
_PRIORITY = click.IntRange(MIN_PRIORITY, MAX_PRIORITY)
# Clear the screen and move the cursor home (what click.clear() writes on a terminal).
_CLEAR = "\033[2J\033[1;1H"
DASHBOARD_EXTRA_HINT = (
    "the dashboard needs the 'dashboard' extra: pip install 'flowrra-fabric[dashboard]'"
)


def _client(obj: dict[str, Any]) -> BrokerClient:
    """A client of the group's broker, with its CURVE keys if any."""
    timeout = obj["timeout"]
    connector = ZmqConnector(obj["broker"], keys=obj.get("keys"))
    return BrokerClient(connector, connect_timeout_s=timeout, request_timeout_s=timeout)


def _echo_json(value: Any) -> None:
    """Strict JSON of ``value``, in the conventions of :func:`flowrra.render.to_json`."""
    click.echo(render.dumps(value, compact=False))


def _iso_times(item: dict[str, Any], names: Sequence[str] = render.TIMESTAMP_FIELDS) -> None:
    """Turn the Unix timestamps ``names`` of ``item`` into ISO 8601 strings, in place."""
    for name in names:
        if name in item:
            value = item[name]
            item[name] = _iso_or_none(value if isinstance(value, int | float) else None)


# --------------------------------------------------------------------------- formatting


def _iso(timestamp: float | None) -> str:
    """A Unix timestamp as ISO 8601 in UTC (millisecond precision), or "-"."""
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="milliseconds")


def _iso_or_none(timestamp: float | None) -> str | None:
    return None if timestamp is None else _iso(timestamp)


def _duration(seconds: float | None) -> str:
    """A duration for people: 0.012s, 4.2s, 3m 12s, 2h 5m, 1d 3h."""
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.3f}s" if seconds < 1 else f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Aligned plain-text columns (two spaces apart, no trailing blanks)."""
    cells = [[str(c) for c in headers], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    ]


def _fields(pairs: Sequence[tuple[str, object]]) -> list[str]:
    """``label  value`` lines with the values aligned."""
    width = max(len(label) for label, _ in pairs)
    return [f"{label.ljust(width)}  {value}".rstrip() for label, value in pairs]


def _one_line(text: str | None, limit: int = 80) -> str:
    """The first line of ``text``, shortened to ``limit`` characters."""
    if not text:
        return "-"
    line = text.strip().splitlines()[0] if text.strip() else "-"
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------- running


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except BrokerUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    except AdminError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    except TimeoutError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)


class CtrlC:
    """SIGINT handling owned by a command that runs until Ctrl-C (``status --watch``).

    ``asyncio.run`` installs its own Ctrl-C handler only when SIGINT still has Python's
    default handler. A process that inherits SIGINT *ignored* (a background job of a
    non-interactive shell, and every process that job starts: ``pytest`` run that way and the
    CLI it launches) never gets one, so Ctrl-C did nothing there. Inside :meth:`installed`,
    SIGINT is always handled, whatever it was inherited as, from before the event loop exists
    until after it is gone:

    * the first SIGINT sets :attr:`requested` and, while a coroutine is :meth:`attach`-ed,
      cancels it through the loop (which also wakes the loop's selector). The coroutine
      checks :attr:`requested` too, so a cancellation swallowed on the way (Python 3.11's
      ``asyncio.wait_for`` drops one that races with its result) still ends it;
    * every further SIGINT raises :class:`KeyboardInterrupt` at once, in case the cleanup
      after the first one is itself stuck.
    """

    def __init__(self) -> None:
        self.requested = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[CtrlC]:
        try:
            previous = signal.signal(signal.SIGINT, self._on_sigint)
        except ValueError:  # not the main thread: signals are not ours to handle
            yield self
            return
        try:
            yield self
        finally:
            # None: the previous handler was not set from Python; the default is closest.
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)

    @contextlib.contextmanager
    def attach(self) -> Iterator[None]:
        """Make the current task the one the first SIGINT cancels (call inside it)."""
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        try:
            yield
        finally:
            self._loop = self._task = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            # Not task.cancel() here: this runs between any two bytecodes, possibly in the
            # middle of the event loop's own code.
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(_cancel_task, task)


def _cancel_task(task: asyncio.Task[Any]) -> None:
    if not task.done():
        task.cancel()


async def _admin(obj: dict[str, Any], verb: str, **args: Any) -> Any:
    """One operator command on a fresh connection."""
    client = _client(obj)
    await client.connect()
    try:
        return await client.admin(verb, **args)
    finally:
        await client.close()


@click.group(context_settings={"auto_envvar_prefix": "FLOWRRA", "show_default": True})
@click.version_option(__version__, prog_name="flowrra")
@click.option("--broker", default=DEFAULT_BROKER_URL, help="The broker's endpoint.")
@click.option("--timeout", default=5.0, type=click.FloatRange(min=0.1), help="Seconds to wait.")
@curve_client_options
@click.pass_context
def main(
    ctx: click.Context,
    broker: str,
    timeout: float,
    curve_server_key: str | None,
    curve_secret_key: str | None,
) -> None:
    """Inspect a running Flowrra broker. Options can also be set as FLOWRRA_<OPTION>."""
    try:
        keys = client_keys(curve_server_key, curve_secret_key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    ctx.obj = {"broker": broker, "timeout": timeout, "keys": keys}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def ping(obj: dict[str, Any], as_json: bool) -> None:
    """Check that the broker answers; print what it announces."""

    async def run() -> None:
        client = _client(obj)
        await client.connect()
        welcome = client.welcome
        await client.close()
        assert welcome is not None
        if as_json:
            _echo_json({"endpoint": obj["broker"], **welcome.to_wire()})
            return
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
        client = _client(obj)
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
            for name, value in fields.items():  # the record's own times: ISO strings
                if isinstance(value, dt.datetime):
                    fields[name] = value.isoformat()
            _echo_json(fields)
            return
        click.echo(f"{task.task_id}  {task.task_name}  {task.status.value}")
        if task.eta is not None:
            click.echo(f"due: {task.eta.isoformat(timespec='milliseconds')}")
        if task.success:
            click.echo(f"result: {task.result!r}")
        if task.error:
            click.echo(f"error: {task.error} (after {task.retries} retries)")

    _run(run())


# --------------------------------------------------------------------------- status


def render_status(reply: dict[str, Any]) -> list[str]:
    """The lines of ``flowrra status`` for one ``status`` reply."""
    lines = _fields(
        [
            ("broker", reply.get("broker_id", "?")),
            ("uptime", _duration(reply.get("uptime_s"))),
            ("queued", reply.get("queued", 0)),
            ("in flight", reply.get("in_flight", 0)),
            ("retry timers", reply.get("retry_timers", 0)),
            ("dead letters", reply.get("dead_letters", 0)),
            ("schedules", reply.get("schedules", 0)),
            ("results stored", reply.get("results_stored", 0)),
            ("tasks/s (1 min)", f"{reply.get('tasks_per_second_1m', 0.0):.3f}"),
        ]
    )
    nodes = reply.get("nodes") or []
    lines.append("")
    if nodes:
        lines += _table(
            ("NODE", "HOST", "PID", "ASYNC", "CPU", "DONE", "FAILED", "HEARTBEAT"),
            (
                (
                    n["node_id"],
                    n["hostname"],
                    n["pid"],
                    f"{n['async_used']}/{n['async_total']}",
                    f"{n['cpu_used']}/{n['cpu_total']}",
                    n["tasks_done"],
                    n["tasks_failed"],
                    f"{_duration(n['last_heartbeat_age_s'])} ago",
                )
                for n in nodes
            ),
        )
    else:
        lines.append("no nodes connected")
    by_priority: dict[str, int] = reply.get("queued_by_priority") or {}
    if by_priority:
        lines.append("")
        ordered = sorted(by_priority.items(), key=lambda item: int(item[0]), reverse=True)
        lines += _table(("PRIORITY", "QUEUED"), ordered)
    by_name: dict[str, int] = reply.get("queued_by_name") or {}
    if by_name:
        lines.append("")
        lines += _table(("TASK", "QUEUED"), sorted(by_name.items()))
    return lines


@main.command()
@click.option("--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C.")
@click.option(
    "--interval", default=2.0, type=click.FloatRange(min=0.05), help="Seconds between redraws."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one document per line).")
@click.pass_obj
def status(obj: dict[str, Any], watch: bool, interval: float, as_json: bool) -> None:
    """Nodes, queue depths, in-flight work, retries, dead letters and throughput."""
    if not watch:
        reply = _run(_admin(obj, "status"))
        if as_json:
            _echo_json(reply)
        else:
            click.echo("\n".join(render_status(reply)))
        return
    # Ctrl-C ends watching, at any moment: a normal exit.
    with CtrlC().installed() as ctrl_c, contextlib.suppress(KeyboardInterrupt):
        _run(_watch_status(obj, interval, as_json, ctrl_c))
    sys.exit(ExitCode.OK)


async def _watch_status(obj: dict[str, Any], interval: float, as_json: bool, ctrl_c: CtrlC) -> None:
    with ctrl_c.attach():
        if ctrl_c.requested:  # Ctrl-C before the loop started
            return
        client = _client(obj)
        try:
            await client.connect()
            terminal = sys.stdout.isatty()
            while not ctrl_c.requested:
                try:
                    reply: Any = await client.admin("status")
                    error = None
                except BrokerUnavailable as exc:
                    reply, error = None, str(exc)
                if as_json:
                    _echo_json(reply if error is None else {"error": error})
                else:
                    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
                    header = f"every {interval:g}s: flowrra status {obj['broker']}  {now}"
                    body = render_status(reply) if error is None else [f"error: {error}"]
                    frame = "\n".join([header, "", *body])
                    # On a terminal, clear and redraw in one write; piped, frames follow
                    # each other separated by a blank line.
                    click.echo(_CLEAR + frame if terminal else frame + "\n")
                await asyncio.sleep(interval)
        except asyncio.CancelledError:
            if not ctrl_c.requested:
                raise
        finally:
            await client.close()


# --------------------------------------------------------------------------- inspect


def inspect_json(record: dict[str, Any]) -> dict[str, Any]:
    """The ``inspect --json`` document: the :func:`flowrra.render.inspect_view` of the reply,
    with its times (and those of its attempts) in ISO 8601."""
    view = render.inspect_view(record)
    _iso_times(view)
    history = []
    for attempt in view["history"]:
        entry = attempt.as_dict()
        _iso_times(entry, ("started_at", "finished_at"))
        history.append(entry)
    view["history"] = history
    return view


def _id_list(ids: Any, none: str, limit: int = 10) -> str:
    """Task ids separated by commas (the first ``limit`` of them), or ``none``."""
    if not ids:
        return none
    shown = ", ".join(str(i) for i in ids[:limit])
    return shown if len(ids) <= limit else f"{shown} and {len(ids) - limit} more"


def _workflow_pairs(links: Any) -> list[tuple[str, object]]:
    """The ``workflow`` / ``parents`` / ``children`` lines of a workflow member."""
    if not isinstance(links, dict):
        return []
    step = links.get("step")
    where = f", step {step + 1}" if isinstance(step, int) else ""
    return [
        ("workflow", f"{links.get('workflow')} ({links.get('kind')}{where})"),
        ("parents", _id_list(links.get("parents"), "none (first step)")),
        ("children", _id_list(links.get("children"), "none (last step)")),
    ]


def render_inspect(record: dict[str, Any]) -> list[str]:
    """The lines of ``flowrra inspect`` for one ``inspect`` reply."""
    view = render.inspect_view(record)
    timeout = record.get("timeout")
    pairs: list[tuple[str, object]] = [
        ("task id", record["task_id"]),
        ("name", record["task_name"]),
        ("status", record["status"]),
        ("priority", record.get("priority", "-")),
        ("submitted", _iso(record.get("submitted_at"))),
    ]
    if record.get("eta") is not None:  # a SCHEDULED task: when it is due
        pairs.append(("due", _iso(record["eta"])))
    pairs += [
        ("started", _iso(record.get("started_at"))),
        ("finished", _iso(record.get("finished_at"))),
        (
            "retries",
            f"{record.get('retries', 0)} of {record.get('max_retries', '?')} "
            f"(delay {record.get('retry_delay', '?')}s)",
        ),
        ("timeout", "none" if timeout is None else f"{timeout}s"),
        ("attempt", record.get("attempt", "-")),
        ("node", record.get("node_id") or "-"),
        ("retry at", _iso(record.get("retry_at"))),
        ("worker losses", record.get("worker_losses", 0)),
        ("expires", _iso(record.get("expires_at"))),
        *_workflow_pairs(record.get("workflow")),
    ]
    if view["args_note"] is not None:
        pairs.append(("args", view["args_note"]))
    else:
        pairs += [("args", repr(view["args"])), ("kwargs", repr(view["kwargs"]))]
    if view["result_note"] is not None:
        pairs.append(("result", view["result_note"]))
    elif view["has_result"]:
        pairs.append(("result", repr(view["result"])))
    if record.get("error"):
        pairs.append(("error", record["error"]))
    lines = _fields(pairs)
    attempts: list[render.Attempt] = view["history"]
    lines.append("")
    if attempts:
        lines.append("attempts:")
        lines += _table(
            ("ATTEMPT", "NODE", "STARTED", "FINISHED", "TOOK", "OUTCOME", "ERROR"),
            (
                (
                    a.attempt,
                    a.node_id or "-",
                    _iso(a.started_at),
                    _iso(a.finished_at),
                    _duration(a.run_s),
                    a.outcome,
                    _one_line(a.error),
                )
                for a in attempts
            ),
        )
    else:
        lines.append("attempts: none finished yet")
    traceback = record.get("traceback")
    if traceback:
        lines.append("")
        lines.append("traceback:")
        lines += ["  " + line for line in str(traceback).rstrip().splitlines()]
    return lines


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def inspect(obj: dict[str, Any], task_id: str, as_json: bool) -> None:
    """Everything the broker knows about one task: arguments, attempts, error, result."""
    record = _run(_admin(obj, "inspect", task_id=task_id))
    if record is None:
        click.echo(f"unknown task id {task_id}", err=True)
        sys.exit(ExitCode.FAILURE)
    if as_json:
        _echo_json(inspect_json(record))
    else:
        click.echo("\n".join(render_inspect(record)))


# --------------------------------------------------------------------------- tasks, purge


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def tasks(obj: dict[str, Any], as_json: bool) -> None:
    """Task names the connected nodes serve, and which nodes serve them."""
    served: dict[str, list[str]] = _run(_admin(obj, "tasks"))
    if as_json:
        _echo_json(served)
    elif not served:
        click.echo("no connected node serves any task")
    else:
        rows = ((name, ", ".join(nodes)) for name, nodes in sorted(served.items()))
        click.echo("\n".join(_table(("TASK", "NODES"), rows)))


_STATUS = click.Choice([s.value for s in TaskStatus])


def render_recent(tasks: Sequence[dict[str, Any]]) -> list[str]:
    """The lines of ``flowrra recent``."""
    if not tasks:
        return ["no recent tasks match"]
    return _table(
        ("TASK ID", "NAME", "STATUS", "ATTEMPT", "SUBMITTED", "FINISHED", "ERROR"),
        (
            (
                t["task_id"],
                t["task_name"],
                t["status"],
                t.get("attempt", "-"),
                _iso(t.get("submitted_at")),
                _iso(t.get("finished_at")),
                _one_line(t.get("error"), 60),
            )
            for t in tasks
        ),
    )


@main.command()
@click.option(
    "--status", "statuses", type=_STATUS, multiple=True, help="Only this status (repeatable)."
)
@click.option("--name", default=None, help="Only tasks of this name.")
@click.option("--limit", default=50, type=click.IntRange(1, 1000), help="Most shown.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def recent(
    obj: dict[str, Any], statuses: tuple[str, ...], name: str | None, limit: int, as_json: bool
) -> None:
    """Tasks with the latest activity, newest first (the broker remembers the last 10,000
    submitted, started, retried or finished since it started)."""
    args: dict[str, Any] = {"limit": limit}
    if statuses:
        args["status"] = list(statuses)
    if name is not None:
        args["name"] = name
    found: list[dict[str, Any]] = _run(_admin(obj, "task_list", **args))
    if as_json:
        for item in found:
            _iso_times(item)
        _echo_json(found)
    else:
        click.echo("\n".join(render_recent(found)))


def _seconds(value: Any) -> str:
    return _duration(value) if isinstance(value, int | float) else "-"


def render_stats(reply: dict[str, Any]) -> list[str]:
    """The lines of ``flowrra stats``."""
    figures: dict[str, dict[str, Any]] = reply.get("tasks") or {}
    if not figures:
        return ["no task has been submitted or run since the broker started"]
    window = reply.get("run_window", "?")
    return [
        f"since {_iso(reply.get('since'))}; run times of the last {window} finished per name",
        "",
        *_table(
            ("TASK", "SUBMITTED", "FINISHED", "FAILED", "FAILURE RATE", "RETRIED", "P50", "P95"),
            (
                (
                    name,
                    f.get("submitted", 0),
                    f.get("finished", 0),
                    f.get("failed", 0),
                    "-" if f.get("failure_rate") is None else f"{f['failure_rate']:.1%}",
                    f.get("retried", 0),
                    _seconds(f.get("p50_s")),
                    _seconds(f.get("p95_s")),
                )
                for name, f in sorted(figures.items())
            ),
        ),
    ]


@main.command()
@click.option("--name", default=None, help="Only this task name.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def stats(obj: dict[str, Any], name: str | None, as_json: bool) -> None:
    """Per task name since the broker started: counts, failure rate, p50 and p95 run time."""
    reply: dict[str, Any] = _run(
        _admin(obj, "task_stats", **({} if name is None else {"name": name}))
    )
    if as_json:
        _iso_times(reply, ("since",))
        _echo_json(reply)
    else:
        click.echo("\n".join(render_stats(reply)))


@main.command()
@click.option("--priority", type=_PRIORITY, default=None, help="Only tasks of this priority.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def purge(obj: dict[str, Any], priority: int | None, yes: bool) -> None:
    """Drop queued tasks (running, retrying and finished tasks are kept)."""
    which = "queued tasks" if priority is None else f"queued tasks of priority {priority}"
    if not yes:
        reply = _run(_admin(obj, "status"))
        if priority is None:
            queued = int(reply.get("queued", 0))
        else:
            queued = int((reply.get("queued_by_priority") or {}).get(str(priority), 0))
        if queued == 0:
            click.echo(f"no {which}: nothing to purge")
            return
        if not click.confirm(f"drop {queued} {which} at {obj['broker']}?", default=False):
            click.echo("nothing purged", err=True)
            sys.exit(ExitCode.FAILURE)
    args = {} if priority is None else {"priority": priority}
    dropped = _run(_admin(obj, "purge", **args))
    click.echo(f"dropped {dropped} {which}")


# --------------------------------------------------------------------------- cancel


async def _cancel(obj: dict[str, Any], task_id: str) -> tuple[bool, dict[str, Any] | None]:
    """Whether ``cancel`` stopped the task, and, when it did not, the task's record (None:
    unknown), on one connection."""
    client = _client(obj)
    await client.connect()
    try:
        if await client.admin("cancel", task_id=task_id):
            return True, None
        (record,) = await client.get([task_id])
        return False, record
    finally:
        await client.close()


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def cancel(obj: dict[str, Any], task_id: str, as_json: bool) -> None:
    """Stop a task before it finishes.

    A scheduled, waiting, queued or retrying task never runs; a running one is cancelled on
    its node. The task ends cancelled, with no retry. Exits 1 when the task had already
    finished or the id is unknown.
    """
    stopped, record = _run(_cancel(obj, task_id))
    if stopped:
        status: str | None = TaskStatus.CANCELLED.value
    else:
        status = None if record is None else str(record["status"])
    if as_json:
        _echo_json({"task_id": task_id, "cancelled": stopped, "status": status})
    if stopped:
        if not as_json:
            click.echo(f"task {task_id} cancelled")
        return
    if status is None:
        message = f"unknown task id {task_id}"
    elif status in FINAL_STATUS_VALUES:
        message = f"task {task_id} had already finished ({status}): nothing cancelled"
    else:  # not final, yet the broker did not cancel it
        message = f"task {task_id} was not cancelled (status {status})"
    click.echo(message, err=True)
    sys.exit(ExitCode.FAILURE)


# --------------------------------------------------------------------------- dead letters


@main.group()
def dead() -> None:
    """Tasks that failed after all their retries (the dead-letter list)."""


@dead.command("list")
@click.option("--limit", default=100, type=click.IntRange(1, 2**31 - 1), help="Most shown.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def dead_list(obj: dict[str, Any], limit: int, as_json: bool) -> None:
    """FAILED tasks, newest first."""
    records: list[dict[str, Any]] = _run(_admin(obj, "dead_list", limit=limit))
    if as_json:
        out = []
        for record in records:
            item = dict(record)
            _iso_times(item)
            out.append(item)
        _echo_json(out)
    elif not records:
        click.echo("no dead letters")
    else:
        rows = (
            (
                r["task_id"],
                r["task_name"],
                r["retries"],
                _iso(r["finished_at"]),
                _one_line(r["error"], 60),
            )
            for r in records
        )
        click.echo("\n".join(_table(("TASK ID", "NAME", "RETRIES", "FAILED AT", "ERROR"), rows)))


@dead.command("retry")
@click.argument("task_id")
@click.pass_obj
def dead_retry(obj: dict[str, Any], task_id: str) -> None:
    """Queue a dead-lettered task again, with its retries reset."""
    queued = _run(_admin(obj, "dead_retry", task_id=task_id))
    click.echo(f"task {queued} queued again")


# --------------------------------------------------------------------------- schedules

# Schedule fields that hold Unix timestamps (and ``schedule`` itself for a one-off run).
_SCHEDULE_TIMES = ("start", "next_run_at", "last_run_at")


def schedule_text(schedule: dict[str, Any]) -> str:
    """When a schedule runs, for people: the cron expression, ``every 30s``, ``at <ISO>``."""
    kind, spec = schedule.get("schedule_type"), schedule.get("schedule")
    is_number = isinstance(spec, int | float) and not isinstance(spec, bool)
    if kind == "interval" and is_number:
        return f"every {spec:g}s"
    if kind == "once" and is_number:
        return f"at {_iso(spec)}"
    return str(spec)


def schedule_json(schedule: dict[str, Any]) -> dict[str, Any]:
    """One schedule of ``schedules list --json``: arguments decoded, times ISO."""
    out = dict(schedule)
    out.update(render.decode_args(out.pop("payload", None)))
    _iso_times(out, _SCHEDULE_TIMES)
    if out.get("schedule_type") == "once" and isinstance(out.get("schedule"), int | float):
        out["schedule"] = _iso(out["schedule"])
    return out


def render_schedules(schedules: Sequence[dict[str, Any]]) -> list[str]:
    """The lines of ``flowrra schedules list``."""
    if not schedules:
        return ["no schedules"]
    return _table(
        (
            "ID",
            "TASK",
            "TYPE",
            "SCHEDULE",
            "TZ",
            "ENABLED",
            "NEXT RUN",
            "LAST RUN",
            "LAST TASK ID",
        ),
        (
            (
                s["id"],
                s["task_name"],
                s["schedule_type"],
                schedule_text(s),
                s.get("tz") or "-",
                "yes" if s.get("enabled") else "no",
                # A disabled schedule has no next run: enabling it picks the next slot.
                _iso(s.get("next_run_at")) if s.get("enabled") else "-",
                _iso(s.get("last_run_at")),
                s.get("last_task_id") or "-",
            )
            for s in schedules
        ),
    )


@main.group()
def schedules() -> None:
    """Periodic schedules the broker keeps and fires.

    Schedules are declared from an app with 'app.create_scheduler()'.
    """


@schedules.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def schedules_list(obj: dict[str, Any], as_json: bool) -> None:
    """Every schedule, with its next and last run.

    Times are UTC; a disabled schedule shows no next run. With --json, 'args' and 'kwargs'
    are decoded and 'schedule' is a cron expression, interval seconds, or the ISO time of a
    one-off run.
    """
    stored: list[dict[str, Any]] = _run(_admin(obj, "schedule_list"))
    if as_json:
        _echo_json([schedule_json(s) for s in stored])
    else:
        click.echo("\n".join(render_schedules(stored)))


async def _change_schedule(
    obj: dict[str, Any], verb: str, schedule_id: str, **args: Any
) -> tuple[bool, dict[str, Any] | None]:
    """Run a ``schedule_*`` verb; whether the id was known, and the schedule after it."""
    client = _client(obj)
    await client.connect()
    try:
        if not await client.admin(verb, id=schedule_id, **args):
            return False, None
        if verb == "schedule_remove":
            return True, None
        return True, await client.admin("schedule_get", id=schedule_id)
    finally:
        await client.close()


def _schedule_changed(obj: dict[str, Any], verb: str, schedule_id: str, **args: Any) -> Any:
    known, schedule = _run(_change_schedule(obj, verb, schedule_id, **args))
    if not known:
        click.echo(f"unknown schedule id {schedule_id}", err=True)
        sys.exit(ExitCode.FAILURE)
    return schedule


@schedules.command("enable")
@click.argument("schedule_id", metavar="ID")
@click.pass_obj
def schedules_enable(obj: dict[str, Any], schedule_id: str) -> None:
    """Fire a disabled schedule again.

    It runs from its next slot on; slots that passed while it was disabled do not run.
    """
    schedule = _schedule_changed(obj, "schedule_enable", schedule_id, enabled=True)
    next_run = _iso(schedule.get("next_run_at")) if isinstance(schedule, dict) else "-"
    click.echo(f"schedule {schedule_id} enabled: next run {next_run}")


@schedules.command("disable")
@click.argument("schedule_id", metavar="ID")
@click.pass_obj
def schedules_disable(obj: dict[str, Any], schedule_id: str) -> None:
    """Stop firing a schedule, but keep it.

    Tasks it already started are not touched; 'enable' starts it again.
    """
    _schedule_changed(obj, "schedule_enable", schedule_id, enabled=False)
    click.echo(f"schedule {schedule_id} disabled")


@schedules.command("remove")
@click.argument("schedule_id", metavar="ID")
@click.pass_obj
def schedules_remove(obj: dict[str, Any], schedule_id: str) -> None:
    """Delete a schedule.

    Tasks it already started are not touched.
    """
    _schedule_changed(obj, "schedule_remove", schedule_id)
    click.echo(f"schedule {schedule_id} removed")


# --------------------------------------------------------------------------- dashboard


@main.command()
@click.option(
    "--broker", "broker_url", default=None, help="The broker's endpoint [default: the group's]."
)
@click.option("--host", default="127.0.0.1", help="Address the web server listens on.")
@click.option("--port", default=8080, type=click.IntRange(1, 65535), help="Its port.")
@click.pass_obj
def dashboard(obj: dict[str, Any], broker_url: str | None, host: str, port: int) -> None:
    """Serve a live web dashboard of the broker (needs the 'dashboard' extra).

    It runs the ASGI app of flowrra.dashboard.asgi_app() on uvicorn; the same app mounts
    inside FastAPI or Starlette. It is read-only and has no authentication: keep it on
    127.0.0.1 or behind an authenticating proxy.
    """
    try:
        from flowrra.dashboard import serve
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "flowrra":
            raise  # the package itself is incomplete: not a missing extra
        click.echo(f"error: {DASHBOARD_EXTRA_HINT}", err=True)
        sys.exit(ExitCode.CONFIG)
    try:
        asyncio.run(serve(broker_url or obj["broker"], host, port, keys=obj.get("keys")))
    except KeyboardInterrupt:
        pass
    except BrokerUnavailable as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    except OSError as exc:  # cannot listen on host:port
        click.echo(f"error: cannot serve the dashboard on {host}:{port}: {exc}", err=True)
        sys.exit(ExitCode.UNAVAILABLE)
    sys.exit(ExitCode.OK)


# --------------------------------------------------------------------------- keys


@main.command()
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    default=".",
    type=click.Path(file_okay=False),
    help="Where to write NAME.key and NAME.key_secret.",
)
def keygen(name: str, directory: str) -> None:
    """Write a new CURVE key pair: NAME.key (public) and NAME.key_secret (keep it private)."""
    try:
        public, secret = generate_keys(directory, name)
    except (FileExistsError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    click.echo(
        f"public key: {public}\nsecret key: {secret} (mode 0600: never copy it off this host)"
    )


# --------------------------------------------------------------------------- backup


@main.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("destination", type=click.Path(file_okay=False))
def backup(data_dir: str, destination: str) -> None:
    """Copy a broker's store (compacted) from DATA_DIR to an empty DESTINATION.

    Safe while the broker runs. To restore, start a broker with --data-dir DESTINATION.
    """
    from flowrra.broker.store import backup as backup_store

    try:
        size = backup_store(data_dir, destination)
    except (FileNotFoundError, FileExistsError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.FAILURE)
    click.echo(f"backed up {data_dir} to {destination} ({size / 2**20:.1f} MiB)")
