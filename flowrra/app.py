"""The user-facing application object: define tasks, submit them, get results."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from flowrra import protocol, tracing
from flowrra.blocking import BlockingFlowrra
from flowrra.client import BrokerClient
from flowrra.errors import BrokerUnavailable, FlowrraError, SubmitRejected, TaskNotFoundError
from flowrra.inproc import InprocHub
from flowrra.protocol import Submission, TaskStatus, pack_args
from flowrra.result import TaskResult
from flowrra.scheduler import Scheduler
from flowrra.security import client_keys
from flowrra.task import TaskSpec, check_priority, make_spec, time_options
from flowrra.transport import Connector, Wakeup, ZmqConnector
from flowrra.workflow import Call

if TYPE_CHECKING:
    from flowrra.broker.server import BrokerService
    from flowrra.node.worker import Node

log = logging.getLogger("flowrra")

F = TypeVar("F", bound=Callable[..., Any])
# The (not before, deadline) of a submit without time options.
_NO_TIMES: tuple[float | None, float | None] = (None, None)


class Flowrra:
    """A Flowrra application: a task registry plus a connection to a broker.

    Use :meth:`from_urls`: with no broker URL the broker and a node run inside this process
    (the embedded default); with ``broker="tcp://host:5555"`` this app is a client of a remote
    broker, and ``flowrra-node --app module:app`` processes run its tasks.
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        data_dir: str | None = None,
        durability: str = "fast",
        concurrency: int = 100,
        processes: int | None = None,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        curve_server_key: str | None = None,
        curve_secret_key: str | None = None,
        confirm_submits: bool = False,
        connector: Connector | None = None,
    ) -> None:
        _check_options(
            broker, data_dir, durability, concurrency, processes, connect_timeout, request_timeout
        )
        if (curve_server_key is None) != (curve_secret_key is None):
            raise ValueError("give both curve_server_key and curve_secret_key, or neither")
        if connector is not None and (broker is None or curve_server_key is not None):
            raise ValueError("connector= is for a remote broker, and replaces the curve_* keys")
        self.broker_url = broker
        self.data_dir = data_dir
        self.durability = durability
        self.concurrency = concurrency
        self.processes = processes
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.curve_server_key = curve_server_key
        self.curve_secret_key = curve_secret_key
        # False (the default): submit() returns once the task is queued in this client, which
        # keeps it until the broker confirms it is stored (re-sending it after a broker
        # restart); stop() waits, bounded, for the confirmations. True: every submit() waits
        # for its own confirmation (one broker round trip, and one fsync in full durability).
        self.confirm_submits = bool(confirm_submits)
        # The connection to the remote broker; made from the URL and keys at start() unless
        # given (a test's own ZmqConnector, say over another zmq context).
        self._connector = connector
        self._tasks: dict[str, TaskSpec] = {}
        self._by_function: dict[Callable[..., Any], TaskSpec] = {}
        self._client: BrokerClient | None = None
        self._scheduler: Scheduler | None = None
        self._service: BrokerService | None = None
        self._node: Node | None = None
        self._background: list[asyncio.Task[None]] = []
        # Where the embedded broker reads the time: a private hook for flowrra.testing, whose
        # fixtures set a clock the test advances (retries and countdowns without waiting).
        self._broker_clock: Callable[[], float] = time.time

    @classmethod
    def from_urls(cls, broker: str | None = None, **options: Any) -> Flowrra:
        """An app for ``broker`` (a ``tcp://`` URL), or the embedded default when omitted.

        Embedded options: ``data_dir`` (keep state in LMDB there instead of in memory),
        ``durability``, ``concurrency`` and ``processes`` (the in-process node's slots).
        Client options: ``connect_timeout`` and ``request_timeout`` (seconds before
        :class:`~flowrra.errors.BrokerUnavailable`), and ``curve_server_key`` with
        ``curve_secret_key`` (key files) for a broker that requires CURVE; ``confirm_submits``
        (True: each ``submit()`` waits until the broker has stored the task); ``connector``
        (a :class:`~flowrra.transport.Connector` to use instead of one made from the URL).
        """
        return cls(broker, **options)

    @property
    def embedded(self) -> bool:
        """True when no broker URL was given: the broker and a node run in this process."""
        return self.broker_url is None

    @property
    def sync(self) -> BlockingFlowrra:
        """The blocking, thread-safe facade of this app, for code that is not async:
        ``app.sync.submit(...)``, ``app.sync.wait_for_result(...)`` and the other client
        methods, by the same names (see :doc:`sync-api`)."""
        return BlockingFlowrra.of(self)

    # ------------------------------------------------------------------ tasks

    def task(
        self,
        name: str | Callable[..., Any] | None = None,
        max_retries: int = 3,
        retry_delay: float = 1.0,
        priority: int = 0,
        cpu_bound: bool = False,
        timeout: float | None = None,
        rate_limit: str | None = None,
        max_concurrency: int | None = None,
    ) -> Callable[[F], F]:
        """Register a function as a task; the function itself is returned unchanged.

        Use it as ``@app.task()`` (or ``@app.task`` without parentheses for the defaults).
        ``rate_limit="10/s"`` (also ``/m``, ``/h``) and ``max_concurrency=2`` are limits the
        broker enforces across all nodes; runs held back stay queued.
        """
        if callable(name):  # used bare: @app.task
            return self.task()(name)
        task_name = name

        def register(fn: F) -> F:
            spec = make_spec(
                fn,
                name=task_name,
                max_retries=max_retries,
                retry_delay=retry_delay,
                priority=priority,
                cpu_bound=cpu_bound,
                timeout=timeout,
                rate_limit=rate_limit,
                max_concurrency=max_concurrency,
            )
            existing = self._tasks.get(spec.name)
            if existing is not None and existing.fn is not fn:
                raise ValueError(f"a different function is already registered as {spec.name!r}")
            self._tasks[spec.name] = spec
            self._by_function[fn] = spec
            return fn

        return register

    @property
    def tasks(self) -> Mapping[str, TaskSpec]:
        """Registered tasks by name."""
        return self._tasks

    def spec_for(self, task: Callable[..., Any] | str) -> TaskSpec:
        """The registration of ``task`` (a decorated function or a task name)."""
        spec = self._tasks.get(task) if isinstance(task, str) else self._by_function.get(task)
        if spec is None:
            what = task if isinstance(task, str) else getattr(task, "__qualname__", repr(task))
            raise TaskNotFoundError(
                f"{what!r} is not a registered task of this app; decorate it with @app.task()"
            )
        return spec

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect to the broker, or start the embedded broker and node."""
        if self._client is not None:
            return
        tracing.refresh()  # configure OpenTelemetry before this (docs/tracing.md)
        if self.embedded:
            hub = await self._start_embedded()
            client = BrokerClient(
                hub, connect_timeout_s=self.connect_timeout, request_timeout_s=self.request_timeout
            )
        else:
            assert self.broker_url is not None
            connector = self._connector or ZmqConnector(
                self.broker_url, keys=client_keys(self.curve_server_key, self.curve_secret_key)
            )
            client = BrokerClient(
                connector,
                connect_timeout_s=self.connect_timeout,
                request_timeout_s=self.request_timeout,
                # Deferred confirmation: ACKs may come with the results (one wake-up).
                late_acks=not self.confirm_submits,
            )
        try:
            await client.connect()
        except BaseException:
            await self.stop()
            raise
        self._client = client

    async def _start_embedded(self) -> InprocHub:
        from flowrra.broker.config import BrokerConfig
        from flowrra.broker.core import Broker
        from flowrra.broker.server import BrokerService, open_store
        from flowrra.broker.store import Durability
        from flowrra.node.worker import Node

        wakeup = Wakeup()
        hub = InprocHub(wakeup)
        config = BrokerConfig(data_dir=self.data_dir, durability=Durability(self.durability))
        store = open_store(config)
        service = BrokerService(
            Broker(store, config, hub.publish_endpoint),
            hub,
            wakeup,
            store,
            clock=self._broker_clock,
        )
        self._service = service
        self._background.append(asyncio.create_task(service.run(), name="flowrra-broker"))
        await self._until(service.ready)
        if service.commits_inline:
            # No event-loop hop per in-process message, and the hot ones unencoded.
            hub.process_now = service.process_now
            hub.process_body = service.process_body
        node = Node(self.tasks, hub, concurrency=self.concurrency, processes=self.processes)
        self._node = node
        self._background.append(asyncio.create_task(node.run(), name="flowrra-node"))
        await self._until(node.ready)
        return hub

    async def _until(self, event: asyncio.Event) -> None:
        """Wait for ``event``, but fail fast if a background task died first."""
        waiter = asyncio.create_task(event.wait())
        done, _ = await asyncio.wait(
            [waiter, *self._background], return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            waiter.cancel()
            for task in done:
                task.result()  # raises what killed it
            raise FlowrraError("the embedded broker or node stopped during start-up")

    async def stop(self) -> None:
        """Disconnect, and stop the embedded node and broker."""
        client, self._client = self._client, None
        unconfirmed: BrokerUnavailable | None = None
        if client is not None:
            try:
                await client.confirmed(self.request_timeout)
            except BrokerUnavailable as exc:
                unconfirmed = exc
            await client.close()
        if self._node is not None:
            self._node.stop()
        if self._service is not None:
            self._service.stop()
        background, self._background = self._background, []
        for task in background:
            try:
                await task
            except Exception:
                log.exception("embedded %s failed", task.get_name())
        if self._service is not None:
            # Its last commit ran as the broker stopped: release the data dir, so that an
            # app of this process can open it again.
            self._service.store.close()
        self._node = None
        self._service = None
        if unconfirmed is not None:
            raise unconfirmed

    async def __aenter__(self) -> Flowrra:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ submitting

    def _connected(self) -> BrokerClient:
        if self._client is None:
            raise FlowrraError(
                "the app is not started: use 'async with app:' or 'await app.start()'"
            )
        return self._client

    def _submission(
        self,
        client: BrokerClient,
        spec: TaskSpec,
        args: Iterable[Any],
        kwargs: dict[str, Any],
        priority: int | None,
        task_id: str | None = None,
        times: tuple[float | None, float | None] = _NO_TIMES,
    ) -> Submission:
        if task_id is not None and (
            not isinstance(task_id, str)
            or not task_id
            or len(task_id.encode()) > protocol.MAX_TASK_ID_BYTES
        ):
            raise ValueError(
                f"task_id must be a non-empty string of at most 200 bytes: {task_id!r}"
            )
        return Submission(  # positional: a NamedTuple takes keywords more slowly
            task_id or client.new_task_id(),  # task_id
            spec.name,  # name
            spec.priority if priority is None else priority,  # priority
            pack_args(list(args), kwargs),  # payload
            spec.max_retries,  # max_retries
            spec.retry_delay,  # retry_delay_s
            spec.timeout,  # timeout_s
            time.time(),  # submitted_at
            times[0],  # eta
            times[1],  # deadline
        )

    async def submit(
        self,
        task: Callable[..., Any] | str,
        *args: Any,
        priority: int | None = None,
        task_id: str | None = None,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        expires: float | dt.datetime | None = None,
        **kwargs: Any,
    ) -> str:
        """Queue one call of ``task`` and return its id.

        By default the id comes back as soon as the call is queued in this client, which keeps
        it until the broker confirms it is stored and sends it again after a broker restart
        (so a broker crash neither loses nor doubles it); a refusal reaches the task's
        :meth:`wait_for_result` as :class:`~flowrra.errors.SubmitRejected`, and :meth:`stop`
        waits for the outstanding confirmations. With ``Flowrra(confirm_submits=True)`` every
        submit returns only once the broker has stored the task (see :doc:`operations`).

        Arguments must be msgpack values (plus datetime and bytes); anything else raises
        :class:`~flowrra.errors.SerializationError` before anything is sent. ``priority``
        overrides the task's default; ``task_id`` makes the submit idempotent: submitting the
        same call under an id the broker already has queues nothing new and returns the same
        id (another call under it raises :class:`~flowrra.errors.TaskIdConflict`).

        ``countdown`` (seconds) or ``eta`` (a timezone-aware datetime) delays the start: the
        broker keeps the task SCHEDULED until then. ``expires`` (seconds from now, or an
        aware datetime) ends a task that has not started by then as EXPIRED.
        """
        if countdown is None and eta is None and expires is None:
            times = _NO_TIMES  # the usual submit: no clock read, no checks to make
        else:
            times = time_options(countdown, eta, expires, self._broker_clock())
        if priority is not None:
            check_priority(priority)
        spec = self.spec_for(task)
        client = self._connected()
        submission = self._submission(client, spec, args, kwargs, priority, task_id, times)
        # An explicit task_id always waits: its caller wants to hear of a conflict now.
        confirm = self.confirm_submits or task_id is not None
        if tracing.tracer is None:
            await client.submit([submission], confirm=confirm)
        else:
            await tracing.submit(client.submit, [submission], confirm=confirm)
        return submission.task_id

    async def submit_many(
        self,
        task: Callable[..., Any] | str,
        calls: Iterable[Iterable[Any] | tuple[Iterable[Any], dict[str, Any]]],
        *,
        priority: int | None = None,
        countdown: float | None = None,
        eta: dt.datetime | None = None,
        expires: float | dt.datetime | None = None,
    ) -> list[str]:
        """Queue many calls of one task with a single acknowledgement.

        Each item of ``calls`` is a sequence of positional arguments, or an
        ``(args, kwargs)`` pair when it is a 2-tuple whose second item is a dict.
        ``countdown``, ``eta`` and ``expires`` apply to every call, as in :meth:`submit`.
        """
        check_priority(priority)
        times = time_options(countdown, eta, expires, self._broker_clock())
        spec = self.spec_for(task)
        client = self._connected()
        submissions = []
        for call in calls:
            if isinstance(call, str | bytes | dict):
                raise TypeError(
                    f"each call of submit_many is a sequence of arguments (or an (args, kwargs) "
                    f"pair), not {type(call).__qualname__}: write [(x,), ...] for one argument"
                )
            if isinstance(call, tuple) and len(call) == 2 and isinstance(call[1], dict):
                args, kwargs = call
            else:
                args, kwargs = call, {}
            submissions.append(self._submission(client, spec, args, kwargs, priority, None, times))
        task_ids = [s.task_id for s in submissions]
        try:
            if tracing.tracer is None:
                await client.submit(submissions)
            else:
                await tracing.submit(client.submit, submissions)
        except SubmitRejected as exc:
            exc.task_ids = task_ids  # the others were accepted and will run
            raise
        return task_ids

    # ------------------------------------------------------------------ results

    async def wait_for_result(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """Wait until the task is complete; raises TimeoutError after ``timeout`` seconds."""
        client = self._connected()
        record = client.finished(task_id)  # there already: no future to make and await
        if record is None:
            record = await client.wait(task_id, timeout)
        return TaskResult.from_record(record)

    # ------------------------------------------------------------------ workflows

    async def chain(self, *links: Call | list[Call] | tuple[Call, ...]) -> str:
        """Run calls one after another, each receiving the previous result as its first
        positional argument (a list of results after a group: a list or tuple of calls in
        the chain). Returns the last task's id: ``wait_for_result`` of it gives the final
        result. If a link fails after its retries, every later one ends FAILED, naming it."""
        if not links:
            raise ValueError("a chain needs at least one call")
        steps = [list(link) if isinstance(link, list | tuple) else [link] for link in links]
        ids = await self._submit_workflow("chain", steps)
        return ids[-1][-1]

    async def group(self, *calls: Call) -> str:
        """Run calls side by side; returns a group id for :meth:`wait_for_group`."""
        if not calls:
            raise ValueError("a group needs at least one call")
        client = self._connected()
        group_id = client.new_task_id()
        await self._submit_workflow("group", [list(calls)], workflow_id=group_id)
        return group_id

    async def chord(self, header: Iterable[Call], callback: Call) -> str:
        """Run ``header`` as a group, then ``callback`` with the list of their results (in
        order) as its first argument, once every member has succeeded; returns the
        callback's id. If a member fails, the callback ends FAILED, naming it."""
        members = list(header)
        if not members:
            raise ValueError("a chord needs at least one call in its header")
        ids = await self._submit_workflow("chord", [members, [callback]])
        return ids[-1][0]

    async def wait_for_group(self, group_id: str, timeout: float | None = None) -> list[TaskResult]:
        """The results of a group's calls, in call order, once all are complete."""
        ids = await self._group_members(group_id)
        if ids is None:
            raise FlowrraError(f"no group {group_id!r} is known to the broker")
        client = self._connected()
        waits = [client.wait(task_id, timeout) for task_id in ids]
        return [TaskResult.from_record(record) for record in await asyncio.gather(*waits)]

    async def get_group(self, group_id: str) -> list[TaskResult] | None:
        """The current state of a group's calls, in call order (None for an unknown id)."""
        ids = await self._group_members(group_id)
        if ids is None:
            return None
        records = await self._connected().get(ids)
        return [
            TaskResult(task_id, "", TaskStatus.PENDING) if r is None else TaskResult.from_record(r)
            for task_id, r in zip(ids, records, strict=True)
        ]

    async def _group_members(self, group_id: str) -> list[str] | None:
        stored = await self.admin("workflow_get", id=group_id)
        if stored is None or stored["kind"] != "group":
            return None
        members: list[str] = stored["steps"][0]
        return members

    async def _submit_workflow(
        self, kind: str, steps: list[list[Call]], workflow_id: str | None = None
    ) -> list[list[str]]:
        client = self._connected()
        wire_steps: list[list[Any]] = []
        ids: list[list[str]] = []
        for step in steps:
            if not step:
                raise ValueError("a group inside a workflow needs at least one call")
            wire: list[Any] = []
            for one in step:
                if not isinstance(one, Call):
                    raise TypeError(f"workflows take call(...) descriptions, not {one!r}")
                check_priority(one.priority)
                times = time_options(one.countdown, None, one.expires, self._broker_clock())
                spec = self.spec_for(one.task)
                sub = self._submission(
                    client, spec, one.args, dict(one.kwargs), one.priority, one.task_id, times
                )
                wire.append(sub.to_wire())
            wire_steps.append(wire)
            ids.append([item[0] for item in wire])
        declared = {"id": workflow_id or client.new_task_id(), "kind": kind, "steps": wire_steps}
        if tracing.tracer is None:
            stored = await self.admin("workflow_submit", workflow=declared)
        else:
            with tracing.Producing() as producing:
                declared["steps"] = producing.add_steps(wire_steps)
                stored = await self.admin("workflow_submit", workflow=declared)
        stored_ids: list[list[str]] = stored["steps"]
        return stored_ids

    def create_scheduler(self) -> Scheduler:
        """The app's :class:`~flowrra.scheduler.Scheduler` (also ``app.scheduler`` after
        this): periodic schedules that the broker keeps and fires."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self.spec_for, self.admin)
        return self._scheduler

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler made by :meth:`create_scheduler`."""
        if self._scheduler is None:
            raise FlowrraError("no scheduler yet: call app.create_scheduler() first")
        return self._scheduler

    async def admin(self, verb: str, **args: Any) -> Any:
        """Run an operator command on the broker (``status``, ``inspect``, ``tasks``,
        ``purge``, ``dead_list``, ``dead_retry``, ``cancel``, ``schedule_*``), as the
        ``flowrra`` CLI does; raises :class:`~flowrra.errors.AdminError` if refused."""
        return await self._connected().admin(verb, **args)

    async def cancel(self, task_id: str) -> bool:
        """Stop a task before it finishes; True if this call stopped it.

        A queued, scheduled or retrying task never runs; a running one is cancelled on its
        node (an ``async def`` sees ``CancelledError``, a ``cpu_bound`` call's worker process
        is killed and replaced). It ends CANCELLED with no retries, and waiters wake. A
        finished task or an unknown id gives False and changes nothing.
        """
        if not isinstance(task_id, str) or not task_id:
            raise ValueError(f"task_id must be a non-empty string: {task_id!r}")
        return bool(await self.admin("cancel", task_id=task_id))

    async def watch(self, task_id: str) -> AsyncIterator[TaskResult]:
        """``async for snapshot in app.watch(task_id)``: the task's state each time its
        status or progress changes (the current one first), ending after the final one.
        Updates are pushed by the broker; nothing polls. Unknown ids raise FlowrraError."""
        async for record in self._connected().watch(task_id):
            yield TaskResult.from_record(record)

    async def get_result(self, task_id: str) -> TaskResult | None:
        """The task's current state without waiting; None for an unknown id."""
        (record,) = await self._connected().get([task_id])
        return None if record is None else TaskResult.from_record(record)


def _check_options(
    broker: object,
    data_dir: object,
    durability: object,
    concurrency: object,
    processes: object,
    connect_timeout: object,
    request_timeout: object,
) -> None:
    """Bad options fail when the app is made, not at its first start."""
    if broker is not None and (not isinstance(broker, str) or "://" not in broker):
        raise ValueError(f"broker must be a URL such as 'tcp://host:5555', got {broker!r}")
    if data_dir is not None and not isinstance(data_dir, str | os.PathLike):
        raise TypeError(f"data_dir must be a path or None, got {data_dir!r}")
    if durability not in ("full", "fast"):
        raise ValueError(f"durability must be 'full' or 'fast', got {durability!r}")
    for name, value, least in (("concurrency", concurrency, 1), ("processes", processes, 0)):
        if value is None and name == "processes":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    for name, value in (("connect_timeout", connect_timeout), ("request_timeout", request_timeout)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
