"""The node: connects to a broker, advertises its capacity, runs tasks, reports outcomes.

``async def`` tasks run on the node's event loop, plain functions in a thread pool (so they
cannot stall it) and ``cpu_bound`` functions in the node's :class:`ProcessPool`. The broker
only sends a task while the node has a free slot of the right kind, except that it may send
one ``cpu_bound`` task per worker process ahead (``cpu_prefetch``): such a task waits here,
in arrival order, for the next free worker, and its timeout and start time count from then.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import os
import socket
import time
import traceback
import uuid
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flowrra import protocol, tracing
from flowrra.errors import ProtocolError, RemoteTaskError, TaskTimeoutError
from flowrra.node.heartbeat import HeartbeatThread
from flowrra.node.process_pool import FunctionRef, ProcessPool
from flowrra.progress import PROGRESS_INTERVAL_S, Progress, Throttle, current_sink
from flowrra.protocol import Command, Dispatch, ErrorInfo, Outcome, SlotKind
from flowrra.task import TaskSpec
from flowrra.transport import Connector, Link, Wakeup, ZmqConnector

# Read per message: a module global costs a few ns, an enum member read from its class
# about 70 ns (Python 3.11).
_TASKS, _RESULTS = Command.TASKS, Command.RESULTS

log = logging.getLogger("flowrra.node")

DRAIN_LIMIT = 1000
# Outcomes are kept this long after sending and sent again after a re-registration: the broker
# may have restarted before committing them. Attempt fencing makes the resend harmless.
RECENT_OUTCOMES_S = 30.0
RECENT_OUTCOMES_MAX = 10_000
# Bytes kept free in a RESULTS message for everything but the result value itself.
OUTCOME_HEADROOM = 64 * 1024


class Node:
    """Runs the tasks of one app for one broker until :meth:`stop`."""

    def __init__(
        self,
        tasks: Mapping[str, TaskSpec],
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
        self.connector = connector
        self.concurrency = concurrency
        self.specs: dict[str, TaskSpec] = dict(tasks)
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
        self._cancelled: set[tuple[str, int]] = set()  # attempts the broker cancelled
        # cpu_bound attempts dispatched ahead, waiting for a worker process (not yet started).
        self._waiting: set[tuple[str, int]] = set()
        # Latest progress per running task, sent every PROGRESS_INTERVAL_S (coalesced).
        self._progress: dict[str, list[Any]] = {}
        self._progress_handle: asyncio.TimerHandle | None = None
        # Outcomes as RESULTS items (tuples, see _execute).
        self._outcomes: list[Sequence[Any]] = []
        # The outcomes sent in the last RECENT_OUTCOMES_S, and when each was sent
        # (time.monotonic()), side by side: no (time, outcome) tuple to allocate per task.
        self._recent: deque[Sequence[Any]] = deque(maxlen=RECENT_OUTCOMES_MAX)
        self._recent_at: deque[float] = deque(maxlen=RECENT_OUTCOMES_MAX)
        self._registrations = 0
        self._reconnecting = False
        self._flush_scheduled = False
        self._stopping = False
        self._drain_until: float | None = None
        self._last_sent = 0.0
        self._last_heard = 0.0
        self._welcomed = False
        self._interval_s = self.heartbeat_interval_s
        self._expiry_s = self.heartbeat_interval_s * heartbeat_liveness
        self._max_message_bytes = protocol.MAX_MESSAGE_BYTES
        self._heartbeat: HeartbeatThread | None = None

    def stop(self, grace_s: float = 0.0) -> None:
        """Leave the broker.

        With ``grace_s`` the node first drains: it asks for no more tasks and lets the running
        ones finish for up to ``grace_s`` seconds. Whatever is still running then (or at once,
        without grace or on a second call) is cancelled and handed back to the broker, which
        queues it again. Nothing is lost either way.
        """
        if grace_s > 0 and self._drain_until is None and not self._stopping and self._running:
            self._drain_until = time.monotonic() + grace_s
            log.info(
                "draining: waiting up to %.0fs for %d running tasks", grace_s, len(self._running)
            )
            if self._link is not None:
                self._link.send(protocol.encode(Command.PAUSE))
        else:
            self._stopping = True
        self._wakeup.set()

    async def run(self) -> None:
        tracing.refresh()  # configure OpenTelemetry before this (docs/tracing.md)
        if self.processes:
            self._pool = ProcessPool(self.processes)
            await self._pool.start()
        self._threads = ThreadPoolExecutor(self.concurrency, thread_name_prefix="flowrra-task")
        if isinstance(self.connector, ZmqConnector):
            self._heartbeat = HeartbeatThread(
                self.connector.context,
                self.connector.broker_url,
                self.node_id,
                self.heartbeat_interval_s,
                self.connector.keys,
            )
            self._heartbeat.start()
        try:
            while not self._stopping:
                await self._session()
        finally:
            if self._heartbeat is not None:
                self._heartbeat.stop()
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
            running=self._held_attempts(),
            limits={
                name: spec.limits for name, spec in self.specs.items() if spec.limits is not None
            },
        )
        return protocol.encode(Command.READY, ready.to_wire())

    def _held_attempts(self) -> list[tuple[str, int]]:
        """Attempts this node still answers for: running, or finished with the outcome not
        yet confirmed, so the broker keeps their leases instead of running them again."""
        # Started attempts first: the broker gives the first ones its slots, the rest wait.
        running = sorted(
            ((task_id, attempt) for task_id, (attempt, _) in self._running.items()),
            key=lambda held: held in self._waiting,
        )
        held = dict(running)
        for outcome in self._recent:
            held.setdefault(outcome[0], outcome[1])
        for outcome in self._outcomes:
            held.setdefault(outcome[0], outcome[1])
        return list(held.items())

    def _broker_last_heard(self, main_loop_heard: float) -> float:
        if self._heartbeat is None:
            return main_loop_heard
        return max(main_loop_heard, self._heartbeat.last_heard)

    async def _session(self) -> None:
        """One connection to the broker, until it is lost or the node stops."""
        link = self.connector.link(self._wakeup)
        self._link = link
        # In-process, the broker's messages are handled as it sends them (no loop hop).
        link.push_to(self._on_pushed)
        link.push_bodies_to(self._on_pushed_body)
        link.send(self._ready_message())
        self._last_sent = self._last_heard = time.monotonic()
        self._welcomed = False
        self._interval_s = self.heartbeat_interval_s
        self._expiry_s = self._interval_s * self.heartbeat_liveness
        try:
            while not self._stopping:
                messages = link.drain(DRAIN_LIMIT)
                now = time.monotonic()
                if messages:
                    self._last_heard = now
                for frames in messages:
                    self._on_message(frames, link, now)
                if self._drain_until is not None and (
                    not self._running or now >= self._drain_until
                ):
                    if self._running:
                        log.warning("grace period over: handing %d tasks back", len(self._running))
                    self._stopping = True
                    break
                heard = self._broker_last_heard(self._last_heard)
                expiry, interval = self._expiry_s, self._interval_s
                if now - heard > expiry:
                    # Once per outage at WARNING; the retries after it only at DEBUG.
                    level = logging.DEBUG if self._reconnecting else logging.WARNING
                    if self._registrations == 0 and not self._reconnecting:
                        log.warning(
                            "no answer from the broker at %s: check that it runs there and "
                            "whether it requires CURVE (the broker's public key and this "
                            "node's key must match what it expects)",
                            getattr(self.connector, "broker_url", "?"),
                        )
                    log.log(level, "broker silent for %.1fs; reconnecting", now - heard)
                    self._reconnecting = True
                    return
                if self._welcomed and now - self._last_sent >= interval:
                    link.send(protocol.encode(Command.HEARTBEAT))
                    self._last_sent = now
                if len(messages) >= DRAIN_LIMIT:
                    await asyncio.sleep(0)  # more waits: let what started run, then go on
                    continue
                # The drain stopped because nothing is left (it asks ZeroMQ, which then
                # signals the next arrival), and a send re-checks for input: sleep now,
                # without a pass of the loop and an empty drain first.
                wait = expiry - (now - heard)
                if self._welcomed:  # heartbeats only once registered
                    wait = min(wait, interval - (now - self._last_sent))
                await self._wakeup.wait(max(wait, 0.001))
        finally:
            if self._stopping:
                self._flush()
                link.send(protocol.encode(Command.BYE))
                link.close(linger_ms=1000)  # let BYE and the last outcomes leave
            else:
                link.close()
            self._link = None

    def _on_pushed(self, frames: list[bytes]) -> None:
        link = self._link
        if link is not None:
            now = time.monotonic()
            self._last_heard = now
            self._on_message(frames, link, now)

    def _on_pushed_body(self, command: Command, body: Any) -> None:
        """A message the in-process broker handed over unencoded."""
        link = self._link
        if link is not None:
            now = time.monotonic()
            self._last_heard = now
            self._on_command(command, body, link, now)

    def _on_message(self, frames: list[bytes], link: Link, now: float) -> None:
        """One message from the broker."""
        try:
            message = protocol.decode(frames)
        except ProtocolError as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        self._on_command(message.command, message.body, link, now)

    def _on_command(self, command: Command, body: Any, link: Link, now: float) -> None:
        try:
            if command is _TASKS:
                self._start(protocol.parse_tasks(body))
            elif command is Command.CANCEL:
                self._cancel(protocol.parse_cancel(body))
            elif command is Command.WELCOME:
                welcome = protocol.parse_welcome(body)
                # Heartbeat rates must agree on both sides: adopt the broker's.
                self._interval_s = welcome.heartbeat_interval_ms / 1000
                self._expiry_s = self._interval_s * welcome.heartbeat_liveness
                if self._heartbeat is not None:
                    self._heartbeat.interval_s = self._interval_s
                self._max_message_bytes = welcome.max_message_bytes
                if not self._welcomed:
                    log.info("registered with broker %s", welcome.broker_id[:8])
                self._welcomed = True
                self._reconnecting = False
                self._registrations += 1
                self.ready.set()
                if self._drain_until is not None:
                    link.send(protocol.encode(Command.PAUSE))
                if self._registrations > 1:
                    self._resend_recent()
                self._flush()  # outcomes that finished while we were away
            elif command is Command.RECONNECT:
                log.info("broker asked us to register again")
                link.send(self._ready_message())
                self._last_sent = now
            elif command is Command.ERROR:
                code, text = protocol.parse_error(body)
                log.error("broker error (%s): %s", code, text)
        except ProtocolError as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)

    # ------------------------------------------------------------------ execution

    def _start(self, dispatches: list[Dispatch]) -> None:
        loop = asyncio.get_running_loop()
        for dispatch in dispatches:
            current = self._running.get(dispatch.task_id)
            if current is not None:
                current[1].cancel()  # the broker moved this task to a newer attempt
            task = loop.create_task(self._execute(dispatch))
            self._running[dispatch.task_id] = (dispatch.attempt, task)

    def _cancel(self, attempts: list[tuple[str, int]]) -> None:
        """The broker cancelled these attempts: stop them (a cpu_bound call's worker process
        is killed and replaced) and report each, so the broker frees its slot."""
        for task_id, attempt in attempts:
            current = self._running.get(task_id)
            if current is not None and current[0] == attempt:
                self._cancelled.add((task_id, attempt))
                current[1].cancel()

    async def _execute(self, dispatch: Dispatch) -> None:
        started = [time.time()]  # a call that waits for a worker process starts later
        value: bytes | None = None
        error: ErrorInfo | None = None
        # The attempt's span (docs/tracing.md), current while the task runs.
        run = tracing.start_run(dispatch, self.node_id) if tracing.tracer is not None else None
        try:
            spec = self.specs.get(dispatch.name)
            if (
                spec is not None
                and spec.is_async
                and not spec.cpu_bound
                and dispatch.timeout_s is None
            ):
                # The usual attempt, an async def without a timeout, run here: what _call
                # does for it, without a coroutine and a frame more per task.
                args, kwargs = protocol.unpack_args(dispatch.payload)
                current_sink.set(
                    _ProgressSink(
                        self, asyncio.get_running_loop(), dispatch.task_id, dispatch.attempt
                    )
                )
                value = protocol.pack_value(await spec.fn(*args, **kwargs))
            else:
                value = await self._call(dispatch, started)
        except asyncio.CancelledError:
            if (dispatch.task_id, dispatch.attempt) not in self._cancelled:
                if self._running.get(dispatch.task_id, (None,))[0] == dispatch.attempt:
                    del self._running[dispatch.task_id]
                if run is not None:
                    tracing.end_run(run, None, tracing.RETURNED)
                raise
            self._cancelled.discard((dispatch.task_id, dispatch.attempt))
            error = ErrorInfo("CancelledError", "cancelled at the broker's request", None)
        except RemoteTaskError as exc:
            error = ErrorInfo.safe(exc.exc_type, exc.message, exc.traceback)
        except TaskTimeoutError as exc:
            error = ErrorInfo("TaskTimeoutError", str(exc), None)
        except BaseException as exc:  # SystemExit from a task is its failure, not ours
            # Never raises (a broken __str__, lone surrogates): the slot is always given back.
            error = ErrorInfo.from_exception(exc, _format_traceback())
        limit = self._max_message_bytes - min(OUTCOME_HEADROOM, self._max_message_bytes // 8)
        if value is not None and len(value) > limit:
            error = ErrorInfo(
                "MessageTooLargeError",
                f"the result encodes to {len(value)} bytes; the broker accepts at most {limit}",
                None,
            )
            value = None
        if run is not None:
            tracing.end_run(run, error)
        entry = self._running.get(dispatch.task_id)
        if entry is not None and entry[0] == dispatch.attempt:
            del self._running[dispatch.task_id]
            if self._drain_until is not None:
                self._wakeup.set()  # the drain may be complete
        # A plain tuple, not Outcome.to_wire()'s list: the node keeps every outcome for
        # RECENT_OUTCOMES_S (thousands of them), and a tuple of str, numbers, bytes and None
        # is untracked by the garbage collector at its first collection, a list never is.
        self._outcomes.append(
            (
                dispatch.task_id,
                dispatch.attempt,
                value,
                None if error is None else tuple(error),
                started[0],
                time.time(),
            )
        )
        if not self._flush_scheduled:
            # Nothing else waits to go: send it now (in-process, the broker records it and
            # the waiting client has it before this returns), and batch what ends later in
            # this loop iteration. Only an attempt running now can end later in it (one
            # dispatched now starts in the next): with none, there is nothing to batch, and
            # no callback to run (in-process, one sequential round trip after another).
            self._flush()
            if self._running:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def _call(self, dispatch: Dispatch, started: list[float]) -> bytes:
        spec = self.specs.get(dispatch.name)
        if spec is None:
            raise LookupError(f"this node has no task named {dispatch.name!r}")
        timeout = dispatch.timeout_s
        loop = asyncio.get_running_loop()
        if spec.cpu_bound:

            def on_progress(progress: Progress) -> None:
                self._note_progress(dispatch.task_id, dispatch.attempt, progress)

            if self._pool is None:
                raise RuntimeError("this node runs no worker processes for cpu_bound tasks")
            key = (dispatch.task_id, dispatch.attempt)

            def on_start() -> None:
                self._waiting.discard(key)
                started[0] = time.time()

            self._waiting.add(key)
            try:
                return await self._pool.run(
                    FunctionRef(spec.module, spec.qualname),
                    dispatch.payload,
                    timeout,
                    on_progress,
                    on_start,
                )
            finally:
                self._waiting.discard(key)
        args, kwargs = protocol.unpack_args(dispatch.payload)
        # report_progress() in the task (on this loop, or in a thread) lands in on_progress,
        # at most every PROGRESS_INTERVAL_S.
        current_sink.set(_ProgressSink(self, loop, dispatch.task_id, dispatch.attempt))
        call: Awaitable[Any]
        if spec.is_async:
            call = spec.fn(*args, **kwargs)
        else:
            # A thread cannot be killed: on timeout the attempt fails now and the thread's
            # eventual return value is discarded.
            run = functools.partial(spec.fn, *args, **kwargs)
            call = loop.run_in_executor(self._threads, contextvars.copy_context().run, run)
        if timeout is None:
            return protocol.pack_value(await call)
        try:
            return protocol.pack_value(await asyncio.wait_for(call, timeout))
        except TimeoutError:
            raise TaskTimeoutError(f"task exceeded its timeout of {timeout}s") from None

    def _note_progress(self, task_id: str, attempt: int, progress: Progress) -> None:
        """Keep a running attempt's latest progress; send all pending ones shortly."""
        current = self._running.get(task_id)
        if current is None or current[0] != attempt:
            return  # it ended meanwhile: its outcome supersedes any progress
        self._progress[task_id] = [task_id, attempt, *progress]
        if self._progress_handle is None:
            loop = asyncio.get_running_loop()
            self._progress_handle = loop.call_later(PROGRESS_INTERVAL_S, self._flush_progress)

    def _flush_progress(self) -> None:
        self._progress_handle = None
        pending, self._progress = self._progress, {}
        items = [item for item in pending.values() if item[0] in self._running]
        if items and self._link is not None:
            self._link.send(protocol.encode(Command.PROGRESS, items))

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outcomes or self._link is None:
            return  # sent on the next link once it exists
        outcomes, self._outcomes = self._outcomes, []
        if len(outcomes) == 1:
            self._send_results(outcomes)  # one outcome always fits (see _execute's limit)
        else:
            self._send_outcomes(outcomes)
        now = time.monotonic()
        self._last_sent = now
        recent, recent_at = self._recent, self._recent_at
        recent.extend(outcomes)
        recent_at.extend(itertools.repeat(now, len(outcomes)))
        cutoff = now - RECENT_OUTCOMES_S
        while recent_at and recent_at[0] < cutoff:
            recent_at.popleft()
            recent.popleft()

    def _send_outcomes(self, outcomes: list[Sequence[Any]]) -> None:
        """RESULTS messages no larger than the broker accepts (it drops bigger ones)."""
        limit = self._max_message_bytes
        batch: list[Sequence[Any]] = []
        size = 0
        for outcome in outcomes:
            cost = _outcome_size(outcome)
            if batch and size + cost > limit:
                self._send_results(batch)
                batch, size = [], 0
            batch.append(outcome)
            size += cost
        if batch:
            self._send_results(batch)

    def _send_results(self, batch: list[Sequence[Any]]) -> None:
        assert self._link is not None
        if self._link.send_body(_RESULTS, batch):
            return  # in-process: handed over unencoded (outcome texts are always encodable)
        try:
            frames = protocol.encode(Command.RESULTS, batch)
        except Exception:
            # One outcome that cannot be encoded must not cost the others theirs: encode
            # them one by one and report each bad one as a failure with a safe text.
            for index, outcome in enumerate(batch):
                try:
                    protocol.encode(Command.RESULTS, [outcome])
                except Exception as exc:
                    log.exception("outcome of %s could not be encoded", outcome[0])
                    batch[index] = _unencodable(outcome, exc)
            frames = protocol.encode(Command.RESULTS, batch)
        self._link.send(frames)

    def _resend_recent(self) -> None:
        if self._recent and self._link is not None:
            log.info("re-reporting %d recent outcomes to the broker", len(self._recent))
            self._send_outcomes(list(self._recent))

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


class _ProgressSink(Throttle):
    """Where report_progress() of an attempt on this node's loop (or in one of its threads)
    lands: a :class:`~flowrra.progress.Throttle` that hands what it passes on to the loop.
    One object per attempt, instead of a throttle, a lambda and a closure with its cells:
    set for every attempt, and nearly always unused."""

    __slots__ = ("_attempt", "_loop", "_node", "_task_id")

    def __init__(
        self, node: Node, loop: asyncio.AbstractEventLoop, task_id: str, attempt: int
    ) -> None:
        super().__init__()
        self._node = node
        self._loop = loop
        self._task_id = task_id
        self._attempt = attempt

    def _send(self, progress: Progress) -> None:
        self._loop.call_soon_threadsafe(
            self._node._note_progress, self._task_id, self._attempt, progress
        )


def _format_traceback() -> str | None:
    try:
        return traceback.format_exc()
    except Exception:
        return None


def _unencodable(outcome: Sequence[Any], exc: Exception) -> list[Any]:
    """A failed outcome in place of one that could not be encoded (same task and attempt)."""
    error = ErrorInfo.safe(
        "SerializationError", f"the attempt's outcome could not be encoded: {exc}", None
    )
    task_id, attempt, _, _, started_at, finished_at = outcome
    return Outcome(task_id, attempt, None, error, started_at, finished_at).to_wire()


def _outcome_size(outcome: Sequence[Any]) -> int:
    """Roughly the encoded size of one outcome (its value or error text dominates)."""
    value, error = outcome[2], outcome[3]
    size = 256 + (len(value) if value else 0)
    if error:
        size += len(error[1]) + len(error[2] or "")
    return size
