"""The dashboard as an ASGI application (Starlette): one broker connection, a poller, the API.

The page (``static/``: plain HTML, CSS and vanilla JavaScript, no build step) shows the
broker's nodes, queues, in-flight work, retry timers, a throughput chart, the periodic
schedules, recent failures, a task browser (recent tasks by status and name, per-name figures)
and a task lookup (attempts, error, traceback and the workflow a task belongs to). It polls
``api/status`` once per poll interval; every URL it uses is relative, so the app works at
``/`` and mounted under any prefix.

The server side keeps one :class:`~flowrra.client.BrokerClient`, connected on the first
request (a mounted app gets no lifespan events from FastAPI), and a poller that asks the
broker for ``status`` once per poll interval while pages ask for it, keeps a few minutes of
throughput history and stops after :data:`IDLE_S` without requests. :meth:`DashboardApp.aclose`
stops both; the standalone server calls it at shutdown, a host application calls it from its
own lifespan.

JSON endpoints (relative to where the app is mounted):

* ``GET api/status`` — the broker's ``status`` reply, the schedules, the throughput history;
* ``GET api/tasks?status=S&name=N&limit=L`` — recent tasks (``task_list``; ``status`` may
  repeat);
* ``GET api/stats`` — per-task-name figures (``task_stats``);
* ``GET api/task/{task_id}`` — one task's record with decoded arguments and result, its
  attempts and workflow links;
* ``GET api/workflow/{workflow_id}`` — one chain, group or chord as the broker stores it;
* ``GET api/schedules`` — every schedule, with decoded arguments;
* ``GET api/dead?limit=N`` — recent FAILED tasks with their errors.

A broker that does not answer within the request timeout is shown as unavailable; the client
is then dropped and the next request connects afresh, so the page recovers by itself.

Everything the page shows is inserted as text (``textContent``), never as markup, and a strict
Content-Security-Policy forbids inline scripts, so task errors and arguments (user data)
cannot inject anything. The dashboard is read-only and has no authentication: serve it on
127.0.0.1 (the default) or behind something that authenticates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import zmq
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from flowrra import render
from flowrra.client import BrokerClient
from flowrra.errors import AdminError, BrokerUnavailable, FlowrraError, ProtocolError
from flowrra.transport import ZmqConnector

if TYPE_CHECKING:
    from flowrra.security import ClientKeys

log = logging.getLogger("flowrra.dashboard")

POLL_INTERVAL_S: Final = 1.0
# How long a broker request may stay unanswered before the broker counts as unavailable.
REQUEST_TIMEOUT_S: Final = 2.0
HISTORY_S: Final = 300
# The poller stops (and drops its broker connection) after this long without a request.
IDLE_S: Final = 60.0
DEAD_LIMIT: Final = 50
TASK_LIMIT: Final = 50
# Arguments and results larger than this (msgpack bytes) are not decoded for display.
MAX_DECODE_BYTES: Final = 256 * 1024
# Most schedules a status snapshot carries (the page says how many more there are).
MAX_SCHEDULES_SHOWN: Final = 200
# The files of static/ the app serves, with their content types.
STATIC: Final = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
SECURITY_HEADERS: Final = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}

Snapshot = dict[str, Any]


class Dashboard:
    """The broker connection, the poller and the throughput history behind the web app.

    Everything starts on first use, inside the event loop that serves requests; :meth:`close`
    stops it all, and a later request starts it again.
    """

    def __init__(
        self,
        broker_url: str,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        history_s: float = HISTORY_S,
        idle_s: float = IDLE_S,
        keys: ClientKeys | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.keys = keys
        self.poll_interval_s = poll_interval_s
        self.request_timeout_s = request_timeout_s
        self.idle_s = idle_s
        self.history: deque[tuple[float, float | None]] = deque(
            maxlen=max(2, math.ceil(history_s / poll_interval_s))
        )
        self.latest: Snapshot | None = None
        # The schedules (schedule_view) of the last poll that fetched them.
        self.schedules: list[dict[str, Any]] = []
        self._client: BrokerClient | None = None
        self._connect_lock: asyncio.Lock | None = None
        # (broker id, finished tasks, when) at the last successful poll, for the rate.
        self._baseline: tuple[str, int, float] | None = None
        self._was_available: bool | None = None
        self._poller: asyncio.Task[None] | None = None
        self._polled: asyncio.Event | None = None
        self._last_request = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Stop the poller and close the broker connection (idempotent)."""
        poller, self._poller = self._poller, None
        if poller is not None and poller is not asyncio.current_task():
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
        client, self._client = self._client, None
        self._connect_lock = None
        polled, self._polled = self._polled, None
        if polled is not None:
            polled.set()  # requests waiting for a poll get the last snapshot
        if client is not None:
            await client.close()

    async def current(self) -> Snapshot:
        """The latest status snapshot: starts the poller if it is not running, and waits for
        its first poll when there is no recent snapshot."""
        loop = asyncio.get_running_loop()
        self._last_request = loop.time()
        if self._poller is None or self._poller.done():
            self._polled = asyncio.Event()
            self._poller = loop.create_task(self._poll_forever(), name="flowrra-dashboard-poller")
        latest = self.latest
        if latest is None or time.time() - latest["time"] > 2 * self.poll_interval_s + 1:
            polled = self._polled
            assert polled is not None
            polled.clear()
            await polled.wait()  # the next poll, or close()
            latest = self.latest
            if latest is None:
                latest = self.snapshot(time.time(), None, "the dashboard is closing")
        return latest

    # ------------------------------------------------------------------ broker access

    async def _connected(self) -> BrokerClient:
        """The shared client; connects first when there is none (raises BrokerUnavailable)."""
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
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
            # The page fetches api/dead again whenever this changes.
            "dead_signature": None if status is None else dead_signature(status),
            "schedules": self.schedules[:MAX_SCHEDULES_SHOWN],
            "throughput": [[round(t, 3), rate] for t, rate in self.history],
        }

    async def _poll_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while loop.time() - self._last_request < self.idle_s:
            try:
                snapshot = await self.poll()
            except Exception as exc:  # never let the poller die: report and go on
                log.exception("polling the broker failed")
                snapshot = self.snapshot(time.time(), None, f"dashboard error: {exc}")
            self.latest = snapshot
            if self._polled is not None:
                self._polled.set()
            next_at += self.poll_interval_s
            delay = next_at - loop.time()
            if delay < 0:  # a slow poll (broker down): do not try to catch up
                next_at, delay = loop.time(), 0.0
            await asyncio.sleep(delay)
        log.info("no dashboard requests for %.0f s: polling stops until the next", self.idle_s)
        await self.close()


def dead_signature(status: dict[str, Any]) -> list[Any]:
    """What changes whenever the list of dead letters may have changed."""
    counters = status.get("counters") or {}
    return [
        status.get("broker_id"),
        status.get("dead_letters"),
        counters.get("failed"),
        counters.get("dead_retried"),
        counters.get("purged"),
    ]


def _welcome_id(client: BrokerClient) -> str:
    return client.welcome.broker_id if client.welcome is not None else "?"


# --------------------------------------------------------------------------- views


def task_view(record: dict[str, Any]) -> dict[str, Any]:
    """The ``inspect`` reply as the page shows it (:func:`flowrra.render.inspect_view`, with
    large arguments and results left undecoded), JSON-safe."""
    view: dict[str, Any] = render.to_json(
        render.inspect_view(record, max_decode_bytes=MAX_DECODE_BYTES)
    )
    return view


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
    view = {key: schedule.get(key) for key in SCHEDULE_VIEW_FIELDS}
    if with_args:
        view.update(render.decode_args(schedule.get("payload"), max_bytes=MAX_DECODE_BYTES))
    out: dict[str, Any] = render.to_json(view)
    return out


def workflow_view(workflow: dict[str, Any]) -> dict[str, Any]:
    """A stored workflow without the packed arguments of its steps (JSON-safe)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not isinstance(v, bytes)}
        if isinstance(value, list):
            return [strip(v) for v in value if not isinstance(v, bytes)]
        return value

    out: dict[str, Any] = render.to_json(strip(workflow))
    return out


# --------------------------------------------------------------------------- web app


def _json(data: Any, status: int = 200) -> Response:
    return Response(render.dumps(data), status_code=status, media_type="application/json")


def _unavailable(exc: Exception) -> Response:
    return _json({"available": False, "error": str(exc)}, status=503)


def _bad_request(message: str) -> Response:
    return _json({"error": message}, status=400)


Endpoint = Callable[[Request, Dashboard], Awaitable[Response]]


def _asking_broker(endpoint: Endpoint, dashboard: Dashboard) -> Callable[..., Any]:
    """A route handler for ``endpoint``: a refused request is 400, a silent broker 503."""

    async def handler(request: Request) -> Response:
        try:
            return await endpoint(request, dashboard)
        except AdminError as exc:
            return _bad_request(str(exc))
        except (FlowrraError, ConnectionError) as exc:
            return _unavailable(exc)

    return handler


def _limit(request: Request, default: int, most: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise AdminError("limit must be an integer") from None
    return min(max(value, 1), most)


async def _api_status(request: Request, dashboard: Dashboard) -> Response:
    snapshot = await dashboard.current()
    return _json(snapshot, status=200 if snapshot["available"] else 503)


async def _api_tasks(request: Request, dashboard: Dashboard) -> Response:
    args: dict[str, Any] = {"limit": _limit(request, TASK_LIMIT, 1000)}
    statuses = [s for s in request.query_params.getlist("status") if s]
    if statuses:
        args["status"] = statuses  # the broker refuses unknown ones (400)
    name = request.query_params.get("name")
    if name:
        args["name"] = name
    found = await dashboard.admin("task_list", **args)
    return _json(found)


async def _api_stats(request: Request, dashboard: Dashboard) -> Response:
    name = request.query_params.get("name")
    return _json(await dashboard.admin("task_stats", **({"name": name} if name else {})))


async def _api_task(request: Request, dashboard: Dashboard) -> Response:
    task_id = request.path_params["task_id"]
    record = await dashboard.admin("inspect", task_id=task_id)
    if record is None:
        return _json({"error": f"unknown task id {task_id}"}, status=404)
    return _json(task_view(record))


async def _api_workflow(request: Request, dashboard: Dashboard) -> Response:
    workflow_id = request.path_params["workflow_id"]
    workflow = await dashboard.admin("workflow_get", id=workflow_id)
    if not isinstance(workflow, dict):
        return _json({"error": f"unknown workflow id {workflow_id}"}, status=404)
    return _json(workflow_view(workflow))


async def _api_schedules(request: Request, dashboard: Dashboard) -> Response:
    return _json(await dashboard.fetch_schedules(with_args=True))


async def _api_dead(request: Request, dashboard: Dashboard) -> Response:
    return _json(await dashboard.failures(_limit(request, DEAD_LIMIT, 1000)))


def static_text(name: str) -> str:
    """One of the page's files, from the package data (static/)."""
    return resources.files("flowrra.dashboard").joinpath("static", name).read_text("utf-8")


class DashboardApp:
    """The dashboard's ASGI application (see :func:`flowrra.dashboard.asgi_app`).

    Mount it anywhere (``app.mount("/flowrra", dashboard)``) or serve it on its own. It
    connects to the broker on the first request; call :meth:`aclose` when the host
    application stops (its lifespan runs it when served on its own).
    """

    def __init__(self, broker_url: str, **options: Any) -> None:
        self.dashboard = Dashboard(broker_url, **options)
        self._files = {name: static_text(name).encode() for name in STATIC}
        routes = [
            Route("/", self._index),
            Route("/static/{name}", self._static),
            Route("/api/status", _asking_broker(_api_status, self.dashboard)),
            Route("/api/tasks", _asking_broker(_api_tasks, self.dashboard)),
            Route("/api/stats", _asking_broker(_api_stats, self.dashboard)),
            Route("/api/task/{task_id:path}", _asking_broker(_api_task, self.dashboard)),
            Route(
                "/api/workflow/{workflow_id:path}",
                _asking_broker(_api_workflow, self.dashboard),
            ),
            Route("/api/schedules", _asking_broker(_api_schedules, self.dashboard)),
            Route("/api/dead", _asking_broker(_api_dead, self.dashboard)),
        ]
        self._app = Starlette(routes=routes, lifespan=self._lifespan)

    async def aclose(self) -> None:
        """Stop polling and close the broker connection. Call it when the host application
        shuts down; a request after it starts everything again."""
        await self.dashboard.close()

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield  # nothing to start: the first request connects
        await self.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in SECURITY_HEADERS.items():
                    if name.encode() not in present:
                        headers.append((name.encode(), value.encode()))
                if b"cache-control" not in present:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        await self._app(scope, receive, send_with_headers)

    async def _index(self, request: Request) -> Response:
        # The page's URLs are relative: at the mount point without its slash they would
        # resolve one level too high, so go to the slashed URL first.
        if not request.url.path.endswith("/"):
            return RedirectResponse(request.url.replace(path=request.url.path + "/"), 308)
        return Response(self._files["index.html"], media_type=STATIC["index.html"])

    async def _static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name == "index.html" or name not in self._files:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response(self._files[name], media_type=STATIC[name])
