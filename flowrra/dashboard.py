"""``flowrra dashboard``: a live web view of one broker, served by aiohttp.

One page (plain HTML, CSS and vanilla JavaScript, no build step) shows the broker's nodes,
queues, in-flight work, retry timers, a throughput chart, the periodic schedules, recent
failures and a task lookup (with the workflow a task belongs to). It is fed by server-sent
events: the server asks the broker for ``status`` once per poll interval over one shared
:class:`~flowrra.client.BrokerClient` (and for ``schedule_list`` in the same poll when the
status counts any schedule), keeps a few minutes of throughput history (from the broker's
finished-task counters) and pushes one ``status`` event to every open page; the recent
failures (``dead_list``, a scan on the broker) are fetched only when the status shows they
changed, at most every few seconds, and pushed as a ``failures`` event. JSON endpoints give
the same data to scripts:

* ``GET /api/status`` — the broker's ``status`` reply, the schedules and the throughput
  history;
* ``GET /api/task/{task_id}`` — one task's record with decoded arguments and result, and its
  workflow links;
* ``GET /api/schedules`` — every schedule, with decoded arguments;
* ``GET /api/dead?limit=N`` — recent FAILED tasks with their errors;
* ``GET /events`` — the server-sent event stream the page listens to.

A broker that does not answer within the request timeout is shown as unavailable; the client
is then dropped and the next poll connects afresh, so the page recovers by itself.

Everything the page shows is inserted as text (``textContent``), never as markup, and a strict
Content-Security-Policy forbids inline scripts, so task errors and arguments (user data)
cannot inject anything. The dashboard is read-only and has no authentication: bind it to
127.0.0.1 (the default) or put it behind a proxy that authenticates.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import zmq
from aiohttp import web

from flowrra import protocol
from flowrra.client import BrokerClient
from flowrra.errors import AdminError, BrokerUnavailable, FlowrraError, ProtocolError
from flowrra.logs import configure_logging
from flowrra.transport import ZmqConnector

if TYPE_CHECKING:
    from flowrra.security import ClientKeys

log = logging.getLogger("flowrra.dashboard")

POLL_INTERVAL_S: Final = 1.0
# How long a broker request may stay unanswered before the broker counts as unavailable.
REQUEST_TIMEOUT_S: Final = 2.0
HISTORY_S: Final = 300
DEAD_LIMIT: Final = 50
# ``dead_list`` scans the broker's dead letters: while failures keep coming, the list of recent
# failures that open pages share is fetched again at most this often.
DEAD_REFRESH_S: Final = 3.0
# Arguments and results larger than this (msgpack bytes) are not decoded for display.
MAX_DECODE_BYTES: Final = 256 * 1024
# Most schedules a status event carries (the page says how many more there are).
MAX_SCHEDULES_SHOWN: Final = 200
# Seconds the server waits for open requests (event streams end at once) when it stops.
SHUTDOWN_TIMEOUT_S: Final = 2.0

Snapshot = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Dashboard:
    """The broker connection, the poller and the throughput history behind the web app."""

    def __init__(
        self,
        broker_url: str,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        history_s: float = HISTORY_S,
        keys: ClientKeys | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.keys = keys
        self.poll_interval_s = poll_interval_s
        self.request_timeout_s = request_timeout_s
        self.history: deque[tuple[float, float | None]] = deque(
            maxlen=max(2, math.ceil(history_s / poll_interval_s))
        )
        self.latest: Snapshot | None = None
        # The schedules (schedule_view) of the last poll that fetched them.
        self.schedules: list[dict[str, Any]] = []
        self._client: BrokerClient | None = None
        self._connect_lock = asyncio.Lock()
        # (broker id, finished tasks, when) at the last successful poll, for the rate.
        self._baseline: tuple[str, int, float] | None = None
        self._was_available: bool | None = None
        # The recent failures pages are shown, as a ``failures`` event, with the status
        # signature (see dead_signature) it was fetched for, and how many times it changed.
        self.failures_event: bytes | None = None
        self.failures_version = 0
        self._failures_signature: tuple[Any, ...] | None = None
        self._failures_fetched_at = 0.0
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._poller: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_forever(), name="flowrra-dashboard-poller")

    async def close(self) -> None:
        self.end_streams()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def end_streams(self) -> None:
        """Tell every open event stream to finish (the server is stopping)."""
        for queue in self._subscribers:
            _offer(queue, None)

    # ------------------------------------------------------------------ broker access

    async def _connected(self) -> BrokerClient:
        """The shared client; connects first when there is none (raises BrokerUnavailable)."""
        async with self._connect_lock:
            if self._client is None:
                client = BrokerClient(
                    ZmqConnector(self.broker_url, keys=self.keys),
                    connect_timeout_s=self.request_timeout_s,
                    request_timeout_s=self.request_timeout_s,
                )
                try:
                    await client.connect()  # closes the client itself when it fails
                except zmq.ZMQError as exc:
                    raise BrokerUnavailable(f"cannot connect to {self.broker_url}: {exc}") from exc
                self._client = client
                log.info("connected to broker %s at %s", _welcome_id(client), self.broker_url)
            return self._client

    async def admin(self, verb: str, **args: Any) -> Any:
        """One admin request over the shared client.

        A request the broker does not answer in time drops the client, so the next request
        connects afresh (instead of piling requests up in a socket nobody reads).
        """
        client = await self._connected()
        try:
            return await client.admin(verb, **args)
        except BrokerUnavailable:
            if self._client is client:
                self._client = None
                await client.close()
            raise

    # ------------------------------------------------------------------ polling

    async def poll(self) -> Snapshot:
        """Ask the broker for ``status`` and add one throughput sample to the history."""
        now = time.time()
        try:
            status = await self.admin("status")
            if not isinstance(status, dict):
                raise ProtocolError("the broker's status reply is not a map")
        except (FlowrraError, ConnectionError) as exc:
            self._baseline = None
            self.history.append((now, None))
            if self._was_available is not False:
                log.warning("broker unavailable at %s: %s", self.broker_url, exc)
            self._was_available = False
            return self.snapshot(now, None, str(exc))
        if self._was_available is False:
            log.info("broker available again at %s", self.broker_url)
        self._was_available = True
        self.history.append((now, self._rate(status, now)))
        with contextlib.suppress(FlowrraError, ConnectionError):  # keep the last ones
            self.schedules = await self.fetch_schedules(status)
        signature = dead_signature(status)
        if (
            self._subscribers  # nobody watching: no scan
            and signature != self._failures_signature
            and now - self._failures_fetched_at >= DEAD_REFRESH_S
        ):
            with contextlib.suppress(FlowrraError, ConnectionError):
                records = await self.failures()
                self.failures_event = sse_event("failures", records)
                self.failures_version += 1
                self._failures_signature = signature
                self._failures_fetched_at = now
        return self.snapshot(now, status, None)

    async def fetch_schedules(
        self, status: dict[str, Any] | None = None, *, with_args: bool = False
    ) -> list[dict[str, Any]]:
        """The broker's schedules (``schedule_list``) made displayable; none asked for when
        ``status`` counts none."""
        if status is not None and not status.get("schedules"):
            return []
        stored = await self.admin("schedule_list")
        if not isinstance(stored, list):
            raise ProtocolError("the broker's schedule_list reply is not a list")
        return [schedule_view(s, with_args=with_args) for s in stored if isinstance(s, dict)]

    async def failures(self, limit: int = DEAD_LIMIT) -> list[dict[str, Any]]:
        """Recent FAILED tasks, newest first (``dead_list``)."""
        records = await self.admin("dead_list", limit=limit)
        if not isinstance(records, list):
            raise ProtocolError("the broker's dead_list reply is not a list")
        for record in records:
            record.pop("result", None)  # FAILED tasks have none; never ship raw bytes
        return records

    def _rate(self, status: dict[str, Any], now: float) -> float | None:
        counters = status.get("counters") or {}
        finished = int(counters.get("succeeded", 0)) + int(counters.get("failed", 0))
        broker_id = str(status.get("broker_id"))
        baseline, self._baseline = self._baseline, (broker_id, finished, now)
        if baseline is None or baseline[0] != broker_id or finished < baseline[1]:
            return None  # no earlier sample of this broker's counters
        elapsed = now - baseline[2]
        return round((finished - baseline[1]) / elapsed, 3) if elapsed > 0 else None

    def snapshot(self, now: float, status: dict[str, Any] | None, error: str | None) -> Snapshot:
        return {
            "available": status is not None,
            "error": error,
            "broker_url": self.broker_url,
            "time": round(now, 3),
            "poll_interval_s": self.poll_interval_s,
            "status": status,
            "schedules": self.schedules[:MAX_SCHEDULES_SHOWN],
            "throughput": [[round(t, 3), rate] for t, rate in self.history],
        }

    async def _poll_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                snapshot = await self.poll()
            except Exception as exc:  # never let the poller die: report and go on
                log.exception("polling the broker failed")
                snapshot = self.snapshot(time.time(), None, f"dashboard error: {exc}")
            self.latest = snapshot
            self._broadcast(snapshot)
            next_at += self.poll_interval_s
            delay = next_at - loop.time()
            if delay < 0:  # a slow poll (broker down): do not try to catch up
                next_at, delay = loop.time(), 0.0
            await asyncio.sleep(delay)

    # ------------------------------------------------------------------ event streams

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=2)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self._subscribers.discard(queue)

    def _broadcast(self, snapshot: Snapshot) -> None:
        if not self._subscribers:
            return
        event = sse_event("status", snapshot)
        for queue in self._subscribers:
            _offer(queue, event)


def dead_signature(status: dict[str, Any]) -> tuple[Any, ...]:
    """What changes whenever the list of dead letters may have changed."""
    counters = status.get("counters") or {}
    return (
        status.get("broker_id"),
        status.get("dead_letters"),
        counters.get("failed"),
        counters.get("dead_retried"),
        counters.get("purged"),
    )


def _offer(queue: asyncio.Queue[bytes | None], item: bytes | None) -> None:
    """Queue ``item``, dropping the oldest one when a slow reader has fallen behind."""
    if queue.full():
        with contextlib.suppress(asyncio.QueueEmpty):
            queue.get_nowait()
    queue.put_nowait(item)


def _welcome_id(client: BrokerClient) -> str:
    return client.welcome.broker_id if client.welcome is not None else "?"


def sse_event(name: str, data: Any) -> bytes:
    """One server-sent event (JSON on one data line)."""
    return f"event: {name}\ndata: {_dumps(data)}\n\n".encode()


# --------------------------------------------------------------------------- values


def _dumps(value: Any) -> str:
    return json.dumps(_plain(value), separators=(",", ":"), allow_nan=False)


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a msgpack value (bytes, datetimes and odd floats made explicit)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": str(value)}
    if isinstance(value, bytes):
        return {"$bytes_hex": value.hex()}
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return repr(value)


def task_view(record: dict[str, Any]) -> dict[str, Any]:
    """The ``inspect`` reply made displayable: arguments and result decoded, history named."""
    view = {
        key: _plain(record.get(key))
        for key in (
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
            "workflow",  # None, or its workflow, kind, step, parents and children
        )
    }
    view.update(_arguments(record.get("payload")))
    result = record.get("result")
    view["has_result"] = isinstance(result, bytes)
    view["result"] = view["result_note"] = None
    if isinstance(result, bytes):
        if len(result) > MAX_DECODE_BYTES:
            view["result_note"] = f"{len(result)} bytes of result: too large to show"
        else:
            try:
                view["result"] = _plain(protocol.unpack_value(result))
            except ProtocolError as exc:
                view["result_note"] = f"undecodable result: {exc}"
    history = []
    for entry in record.get("history") or []:
        if isinstance(entry, list) and len(entry) >= 6:
            attempt, node_id, started_at, finished_at, outcome, error = entry[:6]
            history.append(
                _plain(
                    {
                        "attempt": attempt,
                        "node_id": node_id,
                        "started_at": started_at,
                        "finished_at": finished_at,
                        "outcome": outcome,
                        "error": error,
                    }
                )
            )
    view["history"] = history
    return view


def _arguments(payload: Any) -> dict[str, Any]:
    """``args``, ``kwargs`` and ``args_note`` (why they are not shown) of a packed call."""
    out: dict[str, Any] = {"args": None, "kwargs": None, "args_note": None}
    if isinstance(payload, bytes):
        if len(payload) > MAX_DECODE_BYTES:
            out["args_note"] = f"{len(payload)} bytes of arguments: too large to show"
        else:
            try:
                args, kwargs = protocol.unpack_args(payload)
            except ProtocolError as exc:
                out["args_note"] = f"undecodable arguments: {exc}"
            else:
                out["args"], out["kwargs"] = _plain(list(args)), _plain(kwargs)
    return out


# What the page shows of a schedule (its packed arguments are never shipped raw).
SCHEDULE_VIEW_FIELDS: Final = (
    "id",
    "task_name",
    "schedule_type",
    "schedule",  # cron expression, interval seconds, or run_at (Unix seconds)
    "tz",
    "enabled",
    "description",
    "priority",
    "catch_up",
    "next_run_at",
    "last_run_at",
    "last_task_id",
)


def schedule_view(schedule: dict[str, Any], *, with_args: bool = False) -> dict[str, Any]:
    """One ``schedule_list`` entry made displayable (with its arguments decoded if asked)."""
    view = {key: _plain(schedule.get(key)) for key in SCHEDULE_VIEW_FIELDS}
    if with_args:
        view.update(_arguments(schedule.get("payload")))
    return view


# --------------------------------------------------------------------------- web app

DASHBOARD: Final = web.AppKey("dashboard", Dashboard)

_SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if not response.prepared:  # event streams set theirs before they start
        response.headers.update(_SECURITY_HEADERS)
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=_dumps(data), status=status, content_type="application/json")


def _unavailable(exc: Exception) -> web.Response:
    return _json({"available": False, "error": str(exc)}, status=503)


async def _index(request: web.Request) -> web.Response:
    return web.Response(text=INDEX_HTML, content_type="text/html", charset="utf-8")


async def _script(request: web.Request) -> web.Response:
    return web.Response(text=SCRIPT_JS, content_type="text/javascript", charset="utf-8")


async def _style(request: web.Request) -> web.Response:
    return web.Response(text=STYLE_CSS, content_type="text/css", charset="utf-8")


async def _api_status(request: web.Request) -> web.Response:
    dashboard = request.app[DASHBOARD]
    try:
        status = await dashboard.admin("status")
    except (FlowrraError, ConnectionError) as exc:
        return _unavailable(exc)
    if isinstance(status, dict):
        with contextlib.suppress(FlowrraError, ConnectionError):  # keep the last ones
            dashboard.schedules = await dashboard.fetch_schedules(status)
    return _json(dashboard.snapshot(time.time(), status, None))


async def _api_task(request: web.Request) -> web.Response:
    task_id = request.match_info["task_id"]
    try:
        record = await request.app[DASHBOARD].admin("inspect", task_id=task_id)
    except AdminError as exc:
        return _json({"error": str(exc)}, status=400)
    except (FlowrraError, ConnectionError) as exc:
        return _unavailable(exc)
    if record is None:
        return _json({"error": f"unknown task id {task_id}"}, status=404)
    return _json(task_view(record))


async def _api_schedules(request: web.Request) -> web.Response:
    try:
        schedules = await request.app[DASHBOARD].fetch_schedules(with_args=True)
    except AdminError as exc:
        return _json({"error": str(exc)}, status=400)
    except (FlowrraError, ConnectionError) as exc:
        return _unavailable(exc)
    return _json(schedules)


async def _api_dead(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", DEAD_LIMIT))
    except ValueError:
        return _json({"error": "limit must be an integer"}, status=400)
    try:
        records = await request.app[DASHBOARD].failures(min(max(limit, 1), 1000))
    except AdminError as exc:
        return _json({"error": str(exc)}, status=400)
    except (FlowrraError, ConnectionError) as exc:
        return _unavailable(exc)
    return _json(records)


async def _events(request: web.Request) -> web.StreamResponse:
    dashboard = request.app[DASHBOARD]
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **_SECURITY_HEADERS,
        }
    )
    await response.prepare(request)
    queue = dashboard.subscribe()
    sent_failures = -1
    try:
        await response.write(b"retry: 2000\n\n")
        event = None if dashboard.latest is None else sse_event("status", dashboard.latest)
        while True:
            if event is not None:
                await response.write(event)
            # After each status, the recent failures when they changed since last sent.
            if dashboard.failures_event is not None and sent_failures != dashboard.failures_version:
                sent_failures = dashboard.failures_version
                await response.write(dashboard.failures_event)
            event = await queue.get()
            if event is None:
                break
    except ConnectionError:
        pass  # the page went away
    finally:
        dashboard.unsubscribe(queue)
    return response


def make_app(broker_url: str, **options: Any) -> web.Application:
    """The dashboard's aiohttp application (``options`` go to :class:`Dashboard`)."""
    app = web.Application(middlewares=[_security_headers])

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        dashboard = Dashboard(broker_url, **options)
        app[DASHBOARD] = dashboard
        dashboard.start()
        yield
        await dashboard.close()

    async def on_shutdown(app: web.Application) -> None:
        app[DASHBOARD].end_streams()

    app.cleanup_ctx.append(lifetime)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/", _index)
    app.router.add_get("/static/dashboard.js", _script)
    app.router.add_get("/static/dashboard.css", _style)
    app.router.add_get("/events", _events)
    app.router.add_get("/api/status", _api_status)
    app.router.add_get("/api/task/{task_id:.+}", _api_task)
    app.router.add_get("/api/schedules", _api_schedules)
    app.router.add_get("/api/dead", _api_dead)
    return app


async def serve(
    broker_url: str,
    host: str,
    port: int,
    *,
    poll_interval_s: float = POLL_INTERVAL_S,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    keys: ClientKeys | None = None,
) -> None:
    """Serve the dashboard for the broker at ``broker_url`` until SIGINT or SIGTERM.

    A broker that is down (or not up yet) is not an error: the page says so and recovers when
    the broker answers again. Port 0 picks a free port (the log line names it). ``keys`` are
    the CURVE client keys for a broker that requires them (``flowrra --curve-...``).
    """
    if not logging.getLogger().handlers:
        configure_logging()
    app = make_app(
        broker_url, poll_interval_s=poll_interval_s, request_timeout_s=request_timeout_s, keys=keys
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled: list[signal.Signals] = []
    try:
        site = web.TCPSite(runner, host, port, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await site.start()
        bound = port
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                bound = int(address[1])
                break
        shown_host = f"[{host}]" if ":" in host else host
        log.info("dashboard listening on http://%s:%d", shown_host, bound)
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, stop.set)
            except (NotImplementedError, RuntimeError, ValueError):
                continue  # not the main thread (or no signals here): the caller stops us
            handled.append(signum)
        await stop.wait()
        log.info("dashboard shutting down")
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await runner.cleanup()


# --------------------------------------------------------------------------- page

INDEX_HTML: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Flowrra dashboard</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head>
<body>
<header>
  <h1>Flowrra</h1>
  <span id="broker-url" class="muted"></span>
  <span id="conn" class="badge wait">connecting…</span>
  <span class="spacer"></span>
  <span class="muted">broker <span id="broker-id">&ndash;</span>,
    up <span id="uptime">&ndash;</span></span>
</header>
<div id="banner" hidden></div>
<main>
  <section class="cards">
    <div class="card"><div class="label">Queued</div>
      <div class="value" id="queued">&ndash;</div></div>
    <div class="card"><div class="label">In flight</div>
      <div class="value" id="in-flight">&ndash;</div></div>
    <div class="card"><div class="label">Retry timers</div>
      <div class="value" id="retry-timers">&ndash;</div></div>
    <div class="card"><div class="label">Dead letters</div>
      <div class="value" id="dead-letters">&ndash;</div></div>
    <div class="card"><div class="label">Tasks/s now</div>
      <div class="value" id="rate-now">&ndash;</div>
      <div class="sub">1 min avg <span id="rate-1m">&ndash;</span></div></div>
    <div class="card"><div class="label">Succeeded</div>
      <div class="value ok" id="succeeded">&ndash;</div>
      <div class="sub">submitted <span id="submitted">&ndash;</span></div></div>
    <div class="card"><div class="label">Failed</div>
      <div class="value bad" id="failed">&ndash;</div>
      <div class="sub">retried <span id="retried">&ndash;</span></div></div>
    <div class="card"><div class="label">Cancelled</div>
      <div class="value" id="cancelled">&ndash;</div>
      <div class="sub">expired <span id="expired">&ndash;</span></div></div>
  </section>

  <section class="panel wide">
    <h2>Throughput <span class="muted">tasks/s, last <span id="chart-span">5</span> min</span></h2>
    <canvas id="chart" height="180"></canvas>
  </section>

  <section class="panel">
    <h2>Queues <span class="muted">by priority</span></h2>
    <table><thead><tr><th>Priority</th><th class="num">Queued</th><th class="bar-col"></th>
      </tr></thead><tbody id="queue-rows"></tbody></table>
    <h3>By task</h3>
    <table><tbody id="name-rows"></tbody></table>
  </section>

  <section class="panel grow">
    <h2>Nodes <span class="muted" id="node-count"></span></h2>
    <table>
      <thead><tr><th>Node</th><th>Host</th><th>Async slots</th><th>CPU slots</th>
        <th class="num">Done</th><th class="num">Failed</th><th class="num">Heartbeat</th>
        <th class="num">Tasks</th></tr></thead>
      <tbody id="node-rows"></tbody>
    </table>
  </section>

  <section class="panel wide">
    <h2>Schedules <span class="muted" id="schedule-count"></span></h2>
    <table class="schedules">
      <thead><tr><th>Id</th><th>Task</th><th>Schedule</th><th>Enabled</th><th>Next run</th>
        <th>Last run</th><th>Last task</th></tr></thead>
      <tbody id="schedule-rows"></tbody>
    </table>
  </section>

  <section class="panel wide">
    <h2>Recent failures</h2>
    <table class="failures">
      <thead><tr><th>Finished</th><th>Task</th><th>Name</th><th>Error</th>
        <th class="num">Retries</th></tr></thead>
      <tbody id="failure-rows"></tbody>
    </table>
  </section>

  <section class="panel wide">
    <h2>Task lookup</h2>
    <form id="lookup-form" autocomplete="off">
      <input id="lookup-id" name="task_id" placeholder="task id" spellcheck="false" required>
      <button type="submit">Look up</button>
    </form>
    <div id="lookup-out"></div>
  </section>
</main>
</body>
</html>
"""

STYLE_CSS: Final = """
:root {
  --bg: #f4f6f9; --panel: #fff; --text: #1d2330; --muted: #6b7385; --line: #e2e6ee;
  --accent: #2f6fdf; --ok: #1f8a4c; --bad: #c8372d; --warn: #b7791f;
  font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--text); }
header { display: flex; align-items: center; gap: 12px; padding: 10px 20px;
  background: #1d2330; color: #fff; }
header h1 { font-size: 18px; margin: 0; letter-spacing: .5px; }
header .muted { color: #aab2c4; }
.spacer { flex: 1; }
.muted { color: var(--muted); font-weight: normal; }
.badge { padding: 2px 10px; border-radius: 10px; font-size: 12px; font-weight: 600; }
.badge.live { background: var(--ok); color: #fff; }
.badge.down { background: var(--bad); color: #fff; }
.badge.wait { background: var(--warn); color: #fff; }
#banner { background: var(--bad); color: #fff; padding: 8px 20px; font-weight: 600; }
main { display: flex; flex-wrap: wrap; gap: 16px; padding: 16px 20px; }
body.stale main { opacity: .55; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; width: 100%; }
.card { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 14px; min-width: 130px; flex: 1; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; }
.card .value { font-size: 26px; font-weight: 600; font-variant-numeric: tabular-nums; }
.card .sub { color: var(--muted); font-size: 12px; }
.ok { color: var(--ok); } .bad { color: var(--bad); } .warn { color: var(--warn); }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px;
  padding: 12px 16px; min-width: 260px; overflow-x: auto; }
.panel.wide { width: 100%; }
.panel.grow { flex: 1; }
h2 { font-size: 15px; margin: 0 0 8px; }
h3 { font-size: 13px; margin: 12px 0 4px; color: var(--muted); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { font-size: 12px; color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.empty { color: var(--muted); font-style: italic; }
.mono, code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace;
  font-size: 12px; }
pre { background: #f7f8fb; border: 1px solid var(--line); border-radius: 4px; padding: 6px 8px;
  margin: 4px 0; white-space: pre-wrap; word-break: break-word; max-height: 320px;
  overflow: auto; }
.bar-col { width: 40%; }
.bar { background: var(--line); border-radius: 3px; height: 8px; min-width: 60px; }
.bar > div { background: var(--accent); height: 100%; border-radius: 3px; }
.slots { display: flex; align-items: center; gap: 6px; white-space: nowrap; }
.slots .bar { width: 70px; }
canvas { width: 100%; display: block; }
.failures td.error { color: var(--bad); white-space: pre-wrap; word-break: break-word; }
button.link { background: none; border: 0; padding: 0; color: var(--accent); cursor: pointer;
  font: inherit; text-decoration: underline; }
form { display: flex; gap: 8px; margin-bottom: 10px; }
form input { flex: 1; max-width: 520px; padding: 6px 8px; border: 1px solid var(--line);
  border-radius: 4px; font-family: ui-monospace, Menlo, Consolas, monospace; }
form button { padding: 6px 14px; border: 0; border-radius: 4px; background: var(--accent);
  color: #fff; cursor: pointer; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 14px; margin: 0 0 8px; }
dt { color: var(--muted); } dd { margin: 0; }
.status-success { color: var(--ok); font-weight: 600; }
.status-failed { color: var(--bad); font-weight: 600; }
.status-running, .status-retrying, .status-pending { color: var(--warn); font-weight: 600; }
.status-scheduled, .status-waiting { color: var(--accent); font-weight: 600; }
.status-expired, .status-cancelled { color: var(--muted); font-weight: 600; }
.schedules tr.disabled td { color: var(--muted); }
details summary { cursor: pointer; color: var(--muted); font-size: 12px; }
"""

SCRIPT_JS: Final = r"""
"use strict";
(() => {
  // Everything from the server is inserted with textContent / text nodes, never as HTML.
  const $ = (id) => document.getElementById(id);
  const DASH = "\u2013";

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (key === "class") node.className = value;
        else if (key === "title") node.title = value;
        else node.setAttribute(key, value);
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const fmtInt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : DASH);
  const fmtRate = (r) => (typeof r === "number" ? r.toFixed(r >= 100 ? 0 : r >= 10 ? 1 : 2)
    : DASH);

  function fmtDuration(s) {
    if (typeof s !== "number") return DASH;
    if (s < 60) return s.toFixed(0) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function fmtTime(t) {
    if (typeof t !== "number") return DASH;
    const d = new Date(t * 1000);
    const today = new Date().toDateString() === d.toDateString();
    return today ? d.toLocaleTimeString("en-GB") : d.toLocaleString("en-GB");
  }

  function pretty(value) {
    return JSON.stringify(value, null, 2);
  }

  function bar(fraction) {
    const inner = el("div");
    inner.style.width = Math.max(0, Math.min(1, fraction)) * 100 + "%";
    return el("div", { class: "bar" }, inner);
  }

  function emptyRow(columns, text) {
    return el("tr", null, el("td", { class: "empty", colspan: String(columns) }, text));
  }

  // ------------------------------------------------------------------ status

  let lastSnapshot = null;
  let everAvailable = false;

  function setConnection(state, text) {
    const badge = $("conn");
    badge.className = "badge " + state;
    badge.textContent = text;
  }

  function setBanner(text) {
    const banner = $("banner");
    banner.hidden = !text;
    banner.textContent = text || "";
  }

  function render(snapshot) {
    lastSnapshot = snapshot;
    $("broker-url").textContent = snapshot.broker_url;
    drawChart(snapshot);
    if (!snapshot.available) {
      setConnection("down", "broker unavailable");
      setBanner("broker unavailable: " + (snapshot.error || "no answer") + (everAvailable
        ? " (retrying; the numbers below are from its last answer)" : " (retrying)"));
      document.body.classList.add("stale");
      return;
    }
    everAvailable = true;
    setConnection("live", "live");
    setBanner(null);
    document.body.classList.remove("stale");
    const s = snapshot.status;
    const counters = s.counters || {};
    $("broker-id").textContent = String(s.broker_id).slice(0, 12);
    $("broker-id").title = String(s.broker_id);
    $("uptime").textContent = fmtDuration(s.uptime_s);
    $("queued").textContent = fmtInt(s.queued);
    $("in-flight").textContent = fmtInt(s.in_flight);
    $("retry-timers").textContent = fmtInt(s.retry_timers);
    $("dead-letters").textContent = fmtInt(s.dead_letters);
    $("succeeded").textContent = fmtInt(counters.succeeded || 0);
    $("failed").textContent = fmtInt(counters.failed || 0);
    $("submitted").textContent = fmtInt(counters.submitted || 0);
    $("retried").textContent = fmtInt(counters.retried || 0);
    $("cancelled").textContent = fmtInt(counters.cancelled || 0);
    $("expired").textContent = fmtInt(counters.expired || 0);
    $("rate-1m").textContent = fmtRate(s.tasks_per_second_1m);
    const samples = snapshot.throughput.filter((p) => p[1] !== null);
    $("rate-now").textContent = samples.length ? fmtRate(samples[samples.length - 1][1]) : DASH;
    renderQueues(s);
    renderNodes(s.nodes || []);
    renderSchedules(snapshot.schedules || [], s.schedules);
  }

  function renderQueues(s) {
    const byPriority = Object.entries(s.queued_by_priority || {})
      .map(([p, n]) => [Number(p), n]).sort((a, b) => b[0] - a[0]);
    const most = Math.max(1, ...byPriority.map((e) => e[1]));
    $("queue-rows").replaceChildren(...(byPriority.length ? byPriority.map(([p, n]) =>
      el("tr", null, el("td", { class: "mono" }, p), el("td", { class: "num" }, fmtInt(n)),
        el("td", null, bar(n / most)))) : [emptyRow(3, "no queued tasks")]));
    const byName = Object.entries(s.queued_by_name || {}).sort((a, b) => b[1] - a[1]);
    const shown = byName.slice(0, 10).map(([name, n]) =>
      el("tr", null, el("td", { class: "mono" }, name), el("td", { class: "num" }, fmtInt(n))));
    if (byName.length > 10) shown.push(emptyRow(2, (byName.length - 10) + " more names"));
    $("name-rows").replaceChildren(...(shown.length ? shown : [emptyRow(2, "none")]));
  }

  function slots(used, total) {
    if (!total) return el("span", { class: "muted" }, "none");
    return el("span", { class: "slots" }, bar(used / total), fmtInt(used) + " / " + fmtInt(total));
  }

  function renderNodes(nodes) {
    $("node-count").textContent = nodes.length + (nodes.length === 1 ? " node" : " nodes");
    const rows = nodes.map((n) => {
      const age = n.last_heartbeat_age_s;
      const ageClass = "num " + (age > 5 ? "bad" : age > 2 ? "warn" : "");
      const names = n.tasks || [];
      return el("tr", { "data-node-id": n.node_id },
        el("td", { class: "mono node-id" }, n.node_id),
        el("td", null, n.hostname, el("span", { class: "muted" }, " pid " + n.pid)),
        el("td", null, slots(n.async_used, n.async_total)),
        el("td", null, slots(n.cpu_used, n.cpu_total)),
        el("td", { class: "num ok" }, fmtInt(n.tasks_done)),
        el("td", { class: n.tasks_failed ? "num bad" : "num" }, fmtInt(n.tasks_failed)),
        el("td", { class: ageClass }, typeof age === "number" ? age.toFixed(1) + " s" : DASH),
        el("td", { class: "num", title: names.join("\n") }, fmtInt(names.length)));
    });
    $("node-rows").replaceChildren(...(rows.length ? rows : [emptyRow(8, "no nodes connected")]));
  }

  // ------------------------------------------------------------------ schedules

  function fmtSeconds(s) {
    if (s < 60) return (Number.isInteger(s) ? String(s) : s.toFixed(2)) + " s";
    return fmtDuration(s);
  }

  function fmtSchedule(s) {
    if (s.schedule_type === "interval" && typeof s.schedule === "number") {
      return "every " + fmtSeconds(s.schedule);
    }
    if (s.schedule_type === "once" && typeof s.schedule === "number") {
      return "once, " + fmtTime(s.schedule);
    }
    return "cron " + String(s.schedule);
  }

  function taskLink(taskId) {
    const link = el("button", { class: "link mono", type: "button" }, taskId);
    link.addEventListener("click", () => lookup(taskId));
    return link;
  }

  function renderSchedules(list, total) {
    const count = typeof total === "number" ? total : list.length;
    $("schedule-count").textContent = count + (count === 1 ? " schedule" : " schedules");
    const rows = list.map((s) => el("tr", { "data-schedule-id": s.id,
      class: s.enabled ? "enabled" : "disabled" },
      el("td", { class: "mono schedule-id", title: s.description || "" }, s.id),
      el("td", { class: "mono schedule-task" }, s.task_name),
      el("td", { class: "schedule-when" }, fmtSchedule(s),
        el("span", { class: "muted" }, " " + s.tz)),
      el("td", { class: "schedule-enabled " + (s.enabled ? "ok" : "muted") },
        s.enabled ? "yes" : "no"),
      // A disabled schedule has no next run: enabling it picks the next slot.
      el("td", { class: "schedule-next" }, s.enabled ? fmtTime(s.next_run_at) : DASH),
      el("td", { class: "schedule-last" }, fmtTime(s.last_run_at)),
      el("td", null, s.last_task_id ? taskLink(s.last_task_id) : DASH)));
    if (count > list.length) rows.push(emptyRow(7, (count - list.length) + " more"));
    $("schedule-rows").replaceChildren(...(rows.length ? rows : [emptyRow(7, "no schedules")]));
  }

  // ------------------------------------------------------------------ chart

  function drawChart(snapshot) {
    const canvas = $("chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 600;
    const height = 180;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const points = snapshot.throughput || [];
    const span = points.length ? Math.max(60, points.length * snapshot.poll_interval_s) : 300;
    $("chart-span").textContent = String(Math.round(span / 60));
    const end = snapshot.time;
    const start = end - span;
    const left = 48, right = 10, top = 10, bottom = 22;
    const plotW = width - left - right, plotH = height - top - bottom;
    let peak = 0;
    for (const p of points) if (p[1] !== null && p[1] > peak) peak = p[1];
    const yStep = niceStep(peak / 4);
    const yMax = yStep * 4;
    const decimals = yStep >= 1 ? 0 : yStep === 0.25 ? 2 : 1;
    const x = (t) => left + ((t - start) / span) * plotW;
    const y = (v) => top + plotH - (v / yMax) * plotH;
    ctx.font = "11px system-ui, sans-serif";
    ctx.strokeStyle = "#e2e6ee";
    ctx.fillStyle = "#6b7385";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const v = (yMax * i) / 4;
      const yy = Math.round(y(v)) + 0.5;
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(width - right, yy); ctx.stroke();
      ctx.fillText(v.toFixed(decimals), left - 6, yy);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const step = span > 240 ? 60 : 30;
    for (let ago = 0; ago <= span; ago += step) {
      ctx.fillText(ago === 0 ? "now" : "-" + fmtAgo(ago), x(end - ago), top + plotH + 6);
    }
    // The series, with a gap wherever the broker did not answer.
    const segments = [];
    let current = [];
    for (const [t, v] of points) {
      if (v === null) { if (current.length) segments.push(current); current = []; }
      else current.push([x(t), y(v)]);
    }
    if (current.length) segments.push(current);
    for (const seg of segments) {
      ctx.beginPath();
      ctx.moveTo(seg[0][0], y(0));
      for (const [px, py] of seg) ctx.lineTo(px, py);
      ctx.lineTo(seg[seg.length - 1][0], y(0));
      ctx.closePath();
      ctx.fillStyle = "rgba(47, 111, 223, 0.15)";
      ctx.fill();
      ctx.beginPath();
      seg.forEach(([px, py], i) => (i ? ctx.lineTo(px, py) : ctx.moveTo(px, py)));
      ctx.strokeStyle = "#2f6fdf";
      ctx.lineWidth = 2;
      ctx.stroke();
    }
  }

  function fmtAgo(s) {
    return s % 60 === 0 ? s / 60 + " min" : s + " s";
  }

  function niceStep(v) {
    // The smallest of 1, 2 or 5 times a power of ten that is at least v (0.25 at the least).
    if (v <= 0.25) return 0.25;
    const magnitude = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5]) if (v <= m * magnitude) return m * magnitude;
    return 10 * magnitude;
  }

  window.addEventListener("resize", () => { if (lastSnapshot) drawChart(lastSnapshot); });

  // ------------------------------------------------------------------ failures

  function renderFailures(records) {
    const rows = records.map((r) => {
      const error = el("td", { class: "error" }, r.error || "");
      if (r.traceback) {
        error.append(el("details", null, el("summary", null, "traceback"),
          el("pre", null, r.traceback)));
      }
      return el("tr", { "data-task-id": r.task_id },
        el("td", null, fmtTime(r.finished_at)), el("td", null, taskLink(r.task_id)),
        el("td", { class: "mono" }, r.task_name), error,
        el("td", { class: "num" }, fmtInt(r.retries)));
    });
    $("failure-rows").replaceChildren(...(rows.length ? rows : [emptyRow(5, "no failures")]));
  }

  // ------------------------------------------------------------------ lookup

  function field(list, name, value) {
    list.append(el("dt", null, name), el("dd", null, value));
  }

  function taskLinks(ids, none, id) {
    const out = el("span", { id: id });
    if (!ids || !ids.length) {
      out.append(el("span", { class: "muted" }, none));
      return out;
    }
    ids.slice(0, 50).forEach((taskId, i) => {
      if (i) out.append(", ");
      out.append(taskLink(taskId));
    });
    if (ids.length > 50) out.append(" and " + (ids.length - 50) + " more");
    return out;
  }

  async function lookup(taskId) {
    const out = $("lookup-out");
    $("lookup-id").value = taskId;
    out.replaceChildren(el("p", { class: "muted" }, "looking up…"));
    let response, data;
    try {
      response = await fetch("/api/task/" + encodeURIComponent(taskId), { cache: "no-store" });
      data = await response.json();
    } catch (e) {
      out.replaceChildren(el("p", { class: "bad" }, "the dashboard did not answer"));
      return;
    }
    if (!response.ok) {
      const text = response.status === 503 ? "broker unavailable: " : "";
      out.replaceChildren(el("p", { class: "bad", id: "lookup-error" },
        text + (data.error || response.statusText)));
      return;
    }
    const info = el("dl");
    field(info, "Task id", el("span", { class: "mono" }, data.task_id));
    field(info, "Name", el("span", { class: "mono" }, data.task_name));
    field(info, "Status", el("span", { class: "status-" + data.status, id: "lookup-status" },
      data.status));
    field(info, "Priority", String(data.priority));
    field(info, "Attempts", data.attempt + " (retries " + data.retries + " of " +
      data.max_retries + ")");
    if (data.node_id) field(info, "Running on", el("span", { class: "mono" }, data.node_id));
    field(info, "Submitted", fmtTime(data.submitted_at));
    if (data.started_at) field(info, "Started", fmtTime(data.started_at));
    if (data.finished_at) field(info, "Finished", fmtTime(data.finished_at));
    if (data.retry_at) field(info, "Next retry", fmtTime(data.retry_at));
    if (data.eta) field(info, "Due", el("span", { id: "lookup-eta" }, fmtTime(data.eta)));
    const wf = data.workflow;
    if (wf) {
      field(info, "Workflow", el("span", { id: "lookup-workflow" },
        el("span", { class: "mono" }, wf.workflow),
        " (" + wf.kind + (typeof wf.step === "number" ? ", step " + (wf.step + 1) : "") + ")"));
      field(info, "Parents", taskLinks(wf.parents, "none (first step)", "lookup-parents"));
      field(info, "Children", taskLinks(wf.children, "none (last step)", "lookup-children"));
    }
    const parts = [info];
    if (data.args_note) parts.push(el("p", { class: "muted" }, data.args_note));
    else {
      parts.push(el("h3", null, "Arguments"), el("pre", { id: "lookup-args" }, pretty(data.args)));
      if (data.kwargs && Object.keys(data.kwargs).length) {
        parts.push(el("h3", null, "Keyword arguments"), el("pre", null, pretty(data.kwargs)));
      }
    }
    if (data.has_result) {
      parts.push(el("h3", null, "Result"), data.result_note
        ? el("p", { class: "muted" }, data.result_note)
        : el("pre", { id: "lookup-result" }, pretty(data.result)));
    }
    if (data.error) {
      parts.push(el("h3", null, "Error"), el("pre", { class: "bad", id: "lookup-error" },
        data.error));
      if (data.traceback) parts.push(el("details", null, el("summary", null, "traceback"),
        el("pre", null, data.traceback)));
    }
    if (data.history && data.history.length) {
      const rows = data.history.map((h) => el("tr", null,
        el("td", { class: "num" }, h.attempt), el("td", { class: "mono" }, h.node_id || DASH),
        el("td", null, fmtTime(h.started_at)), el("td", null, fmtTime(h.finished_at)),
        el("td", { class: "status-" + h.outcome }, h.outcome),
        el("td", { class: "bad" }, h.error || "")));
      parts.push(el("h3", null, "History"), el("table", null,
        el("thead", null, el("tr", null, ...["#", "Node", "Started", "Finished", "Outcome",
          "Error"].map((h) => el("th", null, h)))),
        el("tbody", null, ...rows)));
    }
    out.replaceChildren(...parts);
  }

  // ------------------------------------------------------------------ start

  function start() {
    $("lookup-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const id = $("lookup-id").value.trim();
      if (id) lookup(id);
    });
    const events = new EventSource("/events");
    events.addEventListener("status", (event) => render(JSON.parse(event.data)));
    events.addEventListener("failures", (event) => renderFailures(JSON.parse(event.data)));
    events.addEventListener("error", () => {
      if (events.readyState !== EventSource.OPEN) {
        setConnection("wait", "dashboard unreachable");
      }
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
"""
