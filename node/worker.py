"""The node: connects to a broker, advertises its capacity, runs tasks, reports outcomes.

``async def`` tasks run on the node's event loop, plain functions in a thread pool (so they
cannot stall it) and ``cpu_bound`` functions in the node's :class:`ProcessPool`. The broker
only sends a task while the node has a free slot of the right kind, so nothing queues here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import traceback
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from flowrra import protocol
from flowrra.errors import ProtocolError, RemoteTaskError, TaskTimeoutError
from flowrra.protocol import Command, Dispatch, ErrorInfo, Outcome, SlotKind
from flowrra.task import TaskSpec
from flowrra.transport import Connector, Link, Wakeup
from node.process_pool import FunctionRef, ProcessPool

if TYPE_CHECKING:
    from flowrra.app import Flowrra

log = logging.getLogger("flowrra.node")

DRAIN_LIMIT = 1000
# Outcomes are kept this long after sending and sent again after a re-registration: the broker
# may have restarted before committing them. Attempt fencing makes the resend harmless.
RECENT_OUTCOMES_S = 30.0
RECENT_OUTCOMES_MAX = 10_000


class Node:
    """Runs the tasks of one app for one broker until :meth:`stop`."""

    def __init__(
        self,
        app: Flowrra,
        connector: Connector,
        *,
        concurrency: int = 100,
        processes: int | None = None,
        node_id: str | None = None,
        heartbeat_interval_ms: int = protocol.HEARTBEAT_INTERVAL_MS,
        heartbeat_liveness: int = protocol.HEARTBEAT_LIVENESS,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.app = app
        self.connector = connector
        self.concurrency = concurrency
        self.specs: dict[str, TaskSpec] = dict(app.tasks)
        has_cpu_tasks = any(spec.cpu_bound for spec in self.specs.values())
        if processes is None:
            processes = os.cpu_count() or 1
        self.processes = processes if has_cpu_tasks else 0
        self.hostname = socket.gethostname()
        self.node_id = node_id or f"{self.hostname}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.heartbeat_interval_s = heartbeat_interval_ms / 1000
        self.heartbeat_liveness = heartbeat_liveness
        self.ready = asyncio.Event()
        self._wakeup = Wakeup()
        self._link: Link | None = None
        self._pool: ProcessPool | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._running: dict[str, tuple[int, asyncio.Task[None]]] = {}
        self._outcomes: list[list[Any]] = []
        self._recent: deque[tuple[float, list[Any]]] = deque(maxlen=RECENT_OUTCOMES_MAX)
        self._registrations = 0
        self._flush_scheduled = False
        self._stopping = False
        self._last_sent = 0.0
        self.tasks_done = 0

    def stop(self) -> None:
        """Leave the broker: running attempts are cancelled and handed back."""
        self._stopping = True
        self._wakeup.set()

    async def run(self) -> None:
        if self.processes:
            self._pool = ProcessPool(self.processes)
            await self._pool.start()
        self._threads = ThreadPoolExecutor(self.concurrency, thread_name_prefix="flowrra-task")
        try:
            while not self._stopping:
                await self._session()
        finally:
            await self._shutdown()

    # ------------------------------------------------------------------ broker session

    def _ready_message(self) -> list[bytes]:
        ready = protocol.NodeReady(
            node_id=self.node_id,
            hostname=self.hostname,
            pid=os.getpid(),
            async_slots=self.concurrency,
            cpu_slots=self.processes,
            tasks={
                name: spec.kind
                for name, spec in self.specs.items()
                if spec.kind is SlotKind.ASYNC or self.processes
            },
            running=[(task_id, attempt) for task_id, (attempt, _) in self._running.items()],
        )
        return protocol.encode(Command.READY, ready.to_wire())

    async def _session(self) -> None:
        """One connection to the broker, until it is lost or the node stops."""
        link = self.connector.link(self._wakeup)
        self._link = link
        link.send(self._ready_message())
        self._last_sent = last_heard = time.monotonic()
        welcomed = False
        interval = self.heartbeat_interval_s
        expiry = interval * self.heartbeat_liveness
        try:
            while not self._stopping:
                messages = link.drain(DRAIN_LIMIT)
                now = time.monotonic()
                if messages:
                    last_heard = now
                for frames in messages:
                    try:
                        message = protocol.decode(frames)
                    except ProtocolError as exc:
                        log.warning("dropped a malformed message from the broker: %s", exc)
                        continue
                    command = message.command
                    if command is Command.TASKS:
                        self._start(protocol.parse_tasks(message.body))
                    elif command is Command.WELCOME:
                        welcome = protocol.parse_welcome(message.body)
                        # Heartbeat rates must agree on both sides: adopt the broker's.
                        interval = welcome.heartbeat_interval_ms / 1000
                        expiry = interval * welcome.heartbeat_liveness
                        if not welcomed:
                            log.info("registered with broker %s", welcome.broker_id[:8])
                        welcomed = True
                        self._registrations += 1
                        self.ready.set()
                        if self._registrations > 1:
                            self._resend_recent()
                        self._flush()  # outcomes that finished while we were away
                    elif command is Command.RECONNECT:
                        log.info("broker asked us to register again")
                        link.send(self._ready_message())
                        self._last_sent = now
                    elif command is Command.ERROR:
                        code, text = protocol.parse_error(message.body)
                        log.error("broker error (%s): %s", code, text)
                if now - last_heard > expiry:
                    log.warning("broker silent for %.1fs; reconnecting", now - last_heard)
                    return
                if welcomed and now - self._last_sent >= interval:
                    link.send(protocol.encode(Command.HEARTBEAT))
                    self._last_sent = now
                if not messages:
                    wait = min(interval - (now - self._last_sent), expiry - (now - last_heard))
                    await self._wakeup.wait(max(wait, 0.001))
                else:
                    await asyncio.sleep(0)
        finally:
            if self._stopping:
                link.send(protocol.encode(Command.BYE))
            link.close()
            self._link = None

    # ------------------------------------------------------------------ execution

    def _start(self, dispatches: list[Dispatch]) -> None:
        loop = asyncio.get_running_loop()
        for dispatch in dispatches:
            current = self._running.get(dispatch.task_id)
            if current is not None:
                current[1].cancel()  # the broker moved this task to a newer attempt
            task = loop.create_task(self._execute(dispatch))
            self._running[dispatch.task_id] = (dispatch.attempt, task)

    async def _execute(self, dispatch: Dispatch) -> None:
        started = time.time()
        value: bytes | None = None
        error: ErrorInfo | None = None
        try:
            value = await self._call(dispatch)
        except asyncio.CancelledError:
            if self._running.get(dispatch.task_id, (None,))[0] == dispatch.attempt:
                del self._running[dispatch.task_id]
            raise
        except RemoteTaskError as exc:
            error = ErrorInfo(exc.exc_type, exc.message, exc.traceback)
        except TaskTimeoutError as exc:
            error = ErrorInfo("TaskTimeoutError", str(exc), None)
        except Exception as exc:
            error = ErrorInfo.from_exception(exc, traceback.format_exc())
        entry = self._running.get(dispatch.task_id)
        if entry is not None and entry[0] == dispatch.attempt:
            del self._running[dispatch.task_id]
        self.tasks_done += 1
        self._outcomes.append(
            Outcome(
                dispatch.task_id, dispatch.attempt, value, error, started, time.time()
            ).to_wire()
        )
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def _call(self, dispatch: Dispatch) -> bytes:
        spec = self.specs.get(dispatch.name)
        if spec is None:
            raise LookupError(f"this node has no task named {dispatch.name!r}")
        timeout = dispatch.timeout_s
        if spec.cpu_bound:
            if self._pool is None:
                raise RuntimeError("this node runs no worker processes for cpu_bound tasks")
            return await self._pool.run(
                FunctionRef(spec.module, spec.qualname), dispatch.payload, timeout
            )
        args, kwargs = protocol.unpack_args(dispatch.payload)
        if spec.is_async:
            coroutine = spec.fn(*args, **kwargs)
            if timeout is None:
                result = await coroutine
            else:
                try:
                    result = await asyncio.wait_for(coroutine, timeout)
                except TimeoutError:
                    raise TaskTimeoutError(f"task exceeded its timeout of {timeout}s") from None
        else:
            loop = asyncio.get_running_loop()
            call = loop.run_in_executor(self._threads, functools.partial(spec.fn, *args, **kwargs))
            if timeout is None:
                result = await call
            else:
                try:
                    # A thread cannot be killed: the attempt fails now and the thread's
                    # eventual return value is discarded.
                    result = await asyncio.wait_for(call, timeout)
                except TimeoutError:
                    raise TaskTimeoutError(f"task exceeded its timeout of {timeout}s") from None
        return protocol.pack_value(result)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outcomes or self._link is None:
            return  # sent on the next link once it exists
        outcomes, self._outcomes = self._outcomes, []
        self._link.send(protocol.encode(Command.RESULTS, outcomes))
        now = time.monotonic()
        self._last_sent = now
        recent = self._recent
        recent.extend((now, outcome) for outcome in outcomes)
        while recent and recent[0][0] < now - RECENT_OUTCOMES_S:
            recent.popleft()

    def _resend_recent(self) -> None:
        if self._recent and self._link is not None:
            log.info("re-reporting %d recent outcomes to the broker", len(self._recent))
            outcomes = [outcome for _, outcome in self._recent]
            self._link.send(protocol.encode(Command.RESULTS, outcomes))

    async def _shutdown(self) -> None:
        running = [task for _, task in self._running.values()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        if self._pool is not None:
            await self._pool.close()
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
        log.info("node %s stopped", self.node_id)
