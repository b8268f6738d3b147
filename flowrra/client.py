"""The client's connection to a broker: submit tasks, receive results, query state.

Results arrive as pushes on the broker's PUB socket. The client subscribes to its own id
prefix once (every task id it creates starts with it) and waits until the broker confirms the
subscription is live before the first submit, so no result of its own can slip past. For a task
id created elsewhere it subscribes to that id and asks for the stored state; the broker also
replays stored state whenever a subscription becomes live, which closes the slow-joiner gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from flowrra import protocol
from flowrra.errors import (
    AdminError,
    BrokerUnavailable,
    FlowrraError,
    MessageTooLargeError,
    ProtocolError,
    SubmitRejected,
    TaskIdConflict,
)
from flowrra.protocol import Command, Submission, TaskStatus, Welcome
from flowrra.transport import Connector, Link, Subscriber, Wakeup

log = logging.getLogger("flowrra.client")

# An unacknowledged submit (or unanswered query) is sent again after this long: the broker
# may have restarted and lost it before committing. Task ids make the resend idempotent.
RESEND_INTERVAL_S = 1.0
# A waiter that has heard nothing for this long asks the broker for its task's record: the
# publication may have been dropped on the way (the broker bounds what it holds for a
# subscriber that does not read, and results are stored). One GET covers every such waiter;
# a task still running is asked about again after twice the interval, up to the maximum.
# It asks only when a publication may really have been lost: when a task awaited after it
# has its result already, or when no result at all has arrived for the interval. While
# results keep arriving in the order they were awaited, a quiet task is most likely still
# queued behind them, and asking about each of thousands of queued tasks would cost the
# broker a record read apiece, just when it is busiest.
QUIET_REQUERY_S = 1.0
QUIET_REQUERY_MAX_S = 16.0
# Waiters due this soon are asked about too: one query (and one look at every waiter) for
# all that fall due about the same time.
_QUIET_SLACK_S = 0.1
_NEVER = float("inf")
# Final results kept for tasks nobody is waiting on yet (submit now, wait later).
RESULT_CACHE_SIZE = 50_000
# Submissions per SUBMIT message: large enough to batch, small enough to stay far below the
# broker's message size limit with typical payloads.
SUBMIT_BATCH = 1000
_FINAL = protocol.FINAL_STATUS_VALUES
# Module constants: reading an enum member from its class costs ~0.1 us (Python 3.11), and
# these are read once or twice per task.
_ACK = Command.ACK
_RESULT = Command.RESULT
_SUBMIT = Command.SUBMIT
_PENDING = TaskStatus.PENDING._value_
# The client's one timer keeps the deadlines of waits with a timeout; entries of waits that
# ended sooner are dropped when the list has doubled since it was last cleaned.
_MIN_DEADLINES_CLEANUP = 1024
# In-process, a coroutine that submits without waiting (confirm=False) lets the event loop
# run after this many submits: the in-process broker then stores and dispatches them and the
# node runs them while the burst goes on, as a bounded queue would, instead of everything
# piling up (submissions, then waiters) until the burst ends. Below the default node
# concurrency (100), so that one burst's tasks all find a slot: W1-seq (10k submits, then
# gather the results) 46.7 -> 38.6 us/task; above it, the broker's queue grows and most of
# the gain is lost (128: 46 us/task). One suspension per this many submits only (the
# counter restarts at each flush and each yield), so a gather of many submit coroutines
# is not slowed.
_IN_PROCESS_BURST = 64


class _AckWait:
    """Acknowledgements still expected for one submit call."""

    __slots__ = ("conflict", "deferred", "done", "error", "future", "remaining")

    def __init__(self, count: int) -> None:
        # Made only when someone has to wait: in-process, the ACK usually comes during the
        # send, and a deferred submit then needs no future at all.
        self.future: asyncio.Future[None] | None = None
        self.done = False  # every acknowledgement is in (or the client closed)
        self.remaining = count
        self.error: str | None = None
        self.conflict = False  # the first refusal was a task id taken by another call
        self.deferred = False  # submit() returned without waiting (confirm=False)

    def pending(self) -> asyncio.Future[None]:
        """The future that completes with the last acknowledgement (call while not done)."""
        if self.future is None:
            self.future = asyncio.get_running_loop().create_future()
        return self.future

    def finish(self) -> None:
        self.done = True
        if self.future is not None and not self.future.done():
            self.future.set_result(None)


class _StateWait:
    """The records found so far for one state query, which may take several GETs."""

    __slots__ = ("found", "future", "pending")

    def __init__(self, future: asyncio.Future[dict[str, Any]]) -> None:
        self.future = future
        self.found: dict[str, dict[str, Any]] = {}
        self.pending = 0  # GETs not answered in full yet


class BrokerClient:
    """One client session with a broker, over any :class:`Connector`."""

    def __init__(
        self,
        connector: Connector,
        *,
        connect_timeout_s: float = 10.0,
        request_timeout_s: float = 30.0,
        late_acks: bool = False,
    ) -> None:
        self._connector = connector
        # Ask the broker to send an ACK together with the results of the tasks it
        # acknowledges when they finish quickly (protocol.md §4.4): for a client whose
        # submits do not wait for their ACKs, one wake-up per quick task instead of two.
        self.late_acks = late_acks
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.client_id = os.urandom(protocol.CLIENT_PREFIX_CHARS // 2).hex()
        self._prefix = self.client_id.encode()
        self._random_ids: list[str] = []  # unused random id suffixes (see new_task_id)
        self._request_ids = itertools.count(1)
        self._wakeup = Wakeup()
        self._link: Link | None = None
        self._subscriber: Subscriber | None = None
        self._reader: asyncio.Task[None] | None = None
        self._welcome: asyncio.Future[Welcome] | None = None
        self._live: asyncio.Event = asyncio.Event()
        self.welcome: Welcome | None = None
        # Each time the prefix subscription is confirmed (again, after a reconnect) the epoch
        # grows; a task submitted in the current epoch will have its result pushed.
        self._epoch = 0
        self._acks: dict[str, _AckWait] = {}
        self._gets: dict[int, _StateWait] = {}
        # What was sent but not answered yet, with when it was (last) sent, for resending.
        # A submission is kept as a plain tuple of its wire fields (what Submission.to_wire
        # lists): a tuple of str, numbers, bytes and None is untracked by the garbage
        # collector at its first collection, a list (or a NamedTuple) never is, and a burst
        # of submits keeps thousands of them until their acknowledgements.
        self._unacked: dict[str, tuple[tuple[Any, ...], float]] = {}
        self._unanswered: dict[int, tuple[list[bytes], float]] = {}
        self._admin: dict[int, asyncio.Future[Any]] = {}
        # Futures of wait(), by task id: dropped when the record arrives, at the timeout (one
        # timer for all, over _deadlines), or when cancelled, at the next quiet check.
        self._waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._deadlines: list[tuple[float, int, asyncio.Future[dict[str, Any]], str, float]] = []
        self._deadline_ids = itertools.count()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadlines_cleanup_at = _MIN_DEADLINES_CLEANUP
        self._watchers: dict[str, list[asyncio.Queue[dict[str, Any]]]] = {}
        # Submits that returned before their acknowledgement, and tasks the broker refused
        # after such a submit returned (their waiters get the error).
        self._deferred: set[asyncio.Future[None]] = set()
        self._refused: dict[str, SubmitRejected] = {}
        # Awaited task ids: when to ask the broker about each if nothing arrives, and the
        # interval after that (QUIET_REQUERY_S), the earliest of those times, and the query
        # asking, while unanswered.
        # task id -> (when it is due for a quiet check, the interval, its wait order)
        self._quiet: dict[str, tuple[float, float, int]] = {}
        self._wait_order = 0  # given to each awaited task, in the order waits began
        self._delivered_order = -1  # the latest wait order whose result has arrived
        self._last_delivered = -_NEVER  # time.monotonic() when a result last arrived
        self._next_quiet = _NEVER
        self._requery: asyncio.Future[Any] | None = None
        self._results: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._unresolved: dict[str, int] = {}
        self._outgoing: list[tuple[Any, ...]] = []
        self._flush_scheduled = False
        # The acknowledgements awaited for the deferred submits batched for the next flush.
        self._batch_wait: _AckWait | None = None
        self._in_process = False  # the link hands messages over unencoded (flowrra.inproc)
        self._burst = 0
        self._closed = False
        # Set by connect: the loop this client runs on (asked once, not per submit and
        # wait), and the largest payload a submit may carry under the broker's bound.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._payload_limit = _payload_limit(protocol.MAX_MESSAGE_BYTES)

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        """Handshake with the broker and make the result subscription live."""
        loop = self._loop = asyncio.get_running_loop()
        self._link = self._connector.link(self._wakeup)
        # In-process: replies handled as they are sent, the hot ones never encoded.
        self._link.push_to(self._on_reply)
        self._in_process = self._link.push_bodies_to(self._on_body)
        self._welcome = loop.create_future()
        self._reader = loop.create_task(self._read_loop(), name="flowrra-client-reader")
        hello: dict[str, Any] = {"role": "client", "id": self.client_id}
        if self.late_acks:
            hello["late_acks"] = True
        self._link.send(protocol.encode(Command.HELLO, hello))
        try:
            self.welcome = await asyncio.wait_for(self._welcome, self.connect_timeout_s)
            self._payload_limit = _payload_limit(self.welcome.max_message_bytes)
            self._subscriber = self._connector.subscriber(
                self.welcome.publish_endpoint, self._wakeup
            )
            self._subscriber.push_to(self._on_publication)
            self._subscriber.push_bodies_to(self._on_published_body)
            self._subscriber.subscribe(self._prefix)
            try:
                await asyncio.wait_for(self._live.wait(), self.connect_timeout_s)
            except TimeoutError:
                raise BrokerUnavailable(
                    f"the broker answered, but its result endpoint "
                    f"{self.welcome.publish_endpoint} did not confirm our subscription within "
                    f"{self.connect_timeout_s}s (is it reachable from here? see the broker's "
                    "--advertise-publish)"
                ) from None
        except TimeoutError:
            await self.close()
            raise BrokerUnavailable(
                f"no answer from the broker within {self.connect_timeout_s}s: check that it "
                "runs at the URL given, and whether it requires CURVE (then pass its public "
                "key as curve_server_key, with a client key it knows); a CURVE broker does not "
                "answer peers without the right keys, and a broker without CURVE does not "
                "answer peers that use it"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for closable in (self._subscriber, self._link):
            if closable is not None:
                closable.close()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        error = BrokerUnavailable("the client was closed")
        for wait in self._acks.values():
            if not wait.done:
                wait.done = True
                if wait.future is not None and not wait.future.done():
                    wait.future.set_exception(error)
        for pending in (*(s.future for s in self._gets.values()), *self._admin.values()):
            if not pending.done():
                pending.set_exception(error)
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(error)

    # ------------------------------------------------------------------ requests

    def new_task_id(self) -> str:
        """This session's prefix (public: it is the result topic) and 64 random bits, so
        that nobody who sees the prefix can guess an id and complete or claim the task."""
        if not self._random_ids:
            # One getrandom() call per 512 ids instead of one per id (a fifth of a submit).
            pool = os.urandom(8 * 512).hex()
            self._random_ids = [pool[i : i + 16] for i in range(0, len(pool), 16)]
        return self.client_id + self._random_ids.pop()

    @property
    def max_message_bytes(self) -> int:
        return self.welcome.max_message_bytes if self.welcome else protocol.MAX_MESSAGE_BYTES

    async def submit(self, submissions: Sequence[Submission], *, confirm: bool = True) -> None:
        """Send tasks and return once the broker has acknowledged (stored) all of them.

        With ``confirm=False`` it returns as soon as they are queued in this client, which
        keeps each one (and sends it again after a broker restart) until the broker has
        stored it: a refusal then fails the task's waiters with SubmitRejected, and
        :meth:`confirmed` waits for every outstanding acknowledgement.
        """
        if not confirm and self._burst >= _IN_PROCESS_BURST:
            # In-process, a long burst lets the loop run (see _IN_PROCESS_BURST): before
            # anything of this call is queued, so that a cancellation here submits nothing.
            self._burst = 0
            await asyncio.sleep(0)
        self._check_open()
        if not submissions:
            return
        limit = self._payload_limit
        for sub in submissions:
            if len(sub.payload) > limit:
                raise MessageTooLargeError(
                    f"task {sub.name} arguments encode to {len(sub.payload)} bytes; "
                    f"the broker accepts messages up to {self.max_message_bytes} bytes"
                )
        loop = self._loop
        assert loop is not None  # (connected: _check_open)
        batched = self._flush_scheduled or not self._in_process
        shared = self._batch_wait if batched and not confirm else None
        if shared is not None:
            # Another deferred submit of this loop iteration's batch: one wait for all of
            # them (nobody awaits it but confirmed(), and a refusal goes to the task's
            # waiters), instead of a future and two callbacks per submit.
            wait = shared
            wait.remaining += len(submissions)
        else:
            wait = _AckWait(len(submissions))
            wait.deferred = not confirm  # before sending: in-process, the ACK comes during it
            if batched and not confirm:
                self._batch_wait = wait
        epoch = self._epoch
        now = loop.time()
        wires = []
        for sub in submissions:
            # (Slicing a NamedTuple gives a plain tuple; the 8-field item without times.)
            wire = sub[:8] if sub.eta is None and sub.deadline is None else sub[:]
            self._acks[sub.task_id] = wait
            self._unacked[sub.task_id] = (wire, now)
            self._unresolved[sub.task_id] = epoch
            wires.append(wire)
        if self._flush_scheduled or not self._in_process:
            self._outgoing.extend(wires)  # batched with the others of this loop iteration
            if not self._flush_scheduled:  # (usually it is: no call for nothing)
                self._schedule_flush()
        else:
            # In-process with nothing else queued: send now rather than after a call_soon
            # (the broker's accept, tick and commit run, and the ACK arrives, before this
            # returns), and batch what the rest of this loop iteration submits. Over a
            # socket the first submit waits for the flush too: sent at once, a submit can
            # reach a broker that then dies before its commit while the node already runs
            # it, and the client's resend after the restart runs it a second time
            # (tests/durability/test_deferred_confirm.py found it).
            self._schedule_flush()
            if len(wires) <= SUBMIT_BATCH:
                assert self._link is not None  # (a link that takes bodies, in-process)
                self._link.send_body(_SUBMIT, wires)
            else:
                self._send_batches(wires)
        if not confirm:
            if shared is None and not wait.done:  # (in-process it usually is)
                future = wait.pending()
                self._deferred.add(future)
                future.add_done_callback(self._deferred.discard)
                future.add_done_callback(_consume)  # its errors reach the waiters
            if self._in_process:
                self._burst += len(submissions)
            return
        if not wait.done:
            try:
                await self._bounded(wait.pending(), "acknowledge the submit")
            except BaseException:
                for sub in submissions:
                    self._acks.pop(sub.task_id, None)
                    self._unacked.pop(sub.task_id, None)
                raise
        if wait.error is not None:
            raise (TaskIdConflict if wait.conflict else SubmitRejected)(wait.error)

    def _refuse(self, task_id: str, error: str, code: str | None) -> None:
        exc = (TaskIdConflict if code == protocol.ACK_CONFLICT else SubmitRejected)(error)
        log.error("the broker refused a submitted task: %s", error)
        self._refused[task_id] = exc
        if len(self._refused) > RESULT_CACHE_SIZE:
            self._refused.pop(next(iter(self._refused)))
        for future in self._drop_waiters(task_id):
            if not future.done():
                future.set_exception(exc)

    async def confirmed(self, timeout_s: float) -> None:
        """Wait until the broker has acknowledged every submit made with confirm=False;
        BrokerUnavailable after ``timeout_s`` (the submissions are kept and re-sent)."""
        pending = list(self._deferred)
        if not pending:
            return
        _, not_done = await asyncio.wait(pending, timeout=timeout_s)
        if not_done:
            count = sum(
                1
                for wait in self._acks.values()
                if wait.future is not None and wait.future in not_done
            )
            raise BrokerUnavailable(
                f"the broker did not confirm {count} submitted tasks within {timeout_s}s: "
                "they may not be stored"
            )

    async def settled(self, task_ids: Iterable[str]) -> None:
        """Wait (bounded by the request timeout) until the broker has answered the submits of
        ``task_ids`` that returned without waiting, so that a query or a cancel sent right
        after such a submit finds the task; a no-op for every other id."""
        pending = {
            wait.pending()
            for task_id in task_ids
            if (wait := self._acks.get(task_id)) is not None and not wait.done
        }
        if pending:
            await asyncio.wait(pending, timeout=self.request_timeout_s)

    async def get(self, task_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """The broker's stored records for ``task_ids`` (None for unknown ids)."""
        self._check_open()
        await self.settled(task_ids)
        future = self._request_state(task_ids)
        try:
            found: dict[str, dict[str, Any]] = await self._bounded(future, "answer a state query")
        finally:
            for request_id, pending in list(self._gets.items()):
                if pending.future is future:
                    del self._gets[request_id]
                    self._unanswered.pop(request_id, None)
        return [found.get(task_id) for task_id in task_ids]

    async def admin(self, verb: str, **args: Any) -> Any:
        """Run an operator command on the broker (``status``, ``inspect``, ``purge``, ...).

        Not re-sent on silence (``purge`` is not idempotent): BrokerUnavailable after the
        request timeout instead.
        """
        self._check_open()
        if isinstance(args.get("task_id"), str):
            await self.settled([args["task_id"]])  # a cancel or inspect right after submit
        assert self._link is not None
        request_id = next(self._request_ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._admin[request_id] = future
        self._link.send(protocol.encode(Command.ADMIN, [request_id, verb, args]))
        try:
            result = await self._bounded(future, f"answer {verb!r}")
        finally:
            self._admin.pop(request_id, None)
        if verb == "dead_retry" and isinstance(result, str):
            self._forget(result)  # it runs again: its old final result is no longer final
        return result

    def _forget(self, task_id: str) -> None:
        self._results.pop(task_id, None)
        self._unresolved.pop(task_id, None)

    def finished(self, task_id: str) -> dict[str, Any] | None:
        """The final record of ``task_id`` if this client holds it already: what :meth:`wait`
        would complete with at once, without a future (a burst's results often arrive
        before anyone waits for them)."""
        self._check_open()
        return self._results.get(task_id)

    def wait(self, task_id: str, timeout_s: float | None) -> asyncio.Future[dict[str, Any]]:
        """A future of the final record of ``task_id``, pushed by the broker when the task
        completes (TimeoutError after ``timeout_s``). A future rather than a coroutine: one
        object and one frame less per waiting task."""
        self._check_open()
        loop = self._loop
        assert loop is not None  # (connected: _check_open)
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        cached = self._results.get(task_id)
        if cached is not None:
            future.set_result(cached)
            return future
        refused = self._refused.get(task_id)
        if refused is not None:
            future.set_exception(refused)
            return future
        own = task_id.startswith(self.client_id)
        waiters = self._waiters.get(task_id)
        if waiters is None:
            self._waiters[task_id] = [future]
            due = loop.time() + QUIET_REQUERY_S
            self._wait_order += 1
            self._quiet[task_id] = (due, QUIET_REQUERY_S, self._wait_order)
            if due < self._next_quiet:
                self._next_quiet = due
                self._wakeup.set()  # the reader may be asleep until later: wake it sooner
            if not own and self._subscriber is not None:
                self._subscriber.subscribe(task_id.encode())  # until its waiters are gone
        else:
            waiters.append(future)
        if not own or self._unresolved.get(task_id) != self._epoch:
            # Its result may have been published while we could not hear it: ask.
            self._refresh([task_id])
        if timeout_s is not None:
            self._add_deadline(loop, future, task_id, timeout_s)
        return future

    def _add_deadline(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[dict[str, Any]],
        task_id: str,
        timeout_s: float,
    ) -> None:
        deadlines = self._deadlines
        if len(deadlines) >= self._deadlines_cleanup_at:
            deadlines[:] = [entry for entry in deadlines if not entry[2].done()]
            heapq.heapify(deadlines)
            self._deadlines_cleanup_at = max(_MIN_DEADLINES_CLEANUP, 2 * len(deadlines))
        at = loop.time() + timeout_s
        heapq.heappush(deadlines, (at, next(self._deadline_ids), future, task_id, timeout_s))
        if deadlines[0][2] is future:  # the earliest now: the timer goes off sooner
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._deadline_timer = loop.call_at(at, self._time_out)

    def _time_out(self) -> None:
        """Fail the waits whose timeout has passed, and set the timer for the next one."""
        self._deadline_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadlines = self._deadlines
        while deadlines and (deadlines[0][0] <= now or deadlines[0][2].done()):
            _, _, future, task_id, timeout_s = heapq.heappop(deadlines)
            if not future.done():
                future.set_exception(
                    TimeoutError(f"task {task_id} did not finish within {timeout_s}s")
                )
                self._unwait(task_id, future)
        if deadlines:
            self._deadline_timer = loop.call_at(deadlines[0][0], self._time_out)

    def _unwait(self, task_id: str, future: asyncio.Future[dict[str, Any]]) -> None:
        """Forget one ended (timed out, cancelled) waiter of ``task_id``."""
        waiters = self._waiters.get(task_id)
        if waiters is not None:
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._drop_waiters(task_id)

    def _drop_waiters(self, task_id: str) -> list[asyncio.Future[dict[str, Any]]]:
        """Stop waiting for ``task_id``: its waiters (returned), its quiet check and, for a
        task of another client, its subscription."""
        self._quiet.pop(task_id, None)
        waiters = self._waiters.pop(task_id, None)
        if waiters is None:
            return []
        if (
            not task_id.startswith(self.client_id)
            and self._subscriber is not None
            and not self._closed
        ):
            self._subscriber.unsubscribe(task_id.encode())
        return waiters

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed or self._link is None:
            raise FlowrraError("the client is not connected (use 'async with app:')")

    async def _bounded(self, future: asyncio.Future[Any], what: str) -> Any:
        loop = asyncio.get_running_loop()
        handle = loop.call_later(self.request_timeout_s, _unavailable, future, what, self)
        try:
            return await future
        finally:
            handle.cancel()

    def _request_state(self, task_ids: Sequence[str]) -> asyncio.Future[dict[str, Any]]:
        """Ask for stored records (found ones, by task id); the reply also resolves any
        waiters on those ids."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._send_get(_StateWait(future), task_ids)
        return future

    def _send_get(self, wait: _StateWait, task_ids: Sequence[str]) -> None:
        for start in range(0, len(task_ids), protocol.MAX_ITEMS_PER_MESSAGE):
            request_id = next(self._request_ids)
            chunk = list(task_ids[start : start + protocol.MAX_ITEMS_PER_MESSAGE])
            frames = protocol.encode(Command.GET, [request_id, chunk])
            self._gets[request_id] = wait
            wait.pending += 1
            self._unanswered[request_id] = (frames, asyncio.get_running_loop().time())
            assert self._link is not None
            self._link.send(frames)

    def _refresh(self, task_ids: Sequence[str]) -> None:
        """Ask for stored records only to resolve waiters (nobody awaits the reply)."""
        self._request_state(task_ids).add_done_callback(_consume)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._burst = 0
        self._batch_wait = None  # later deferred submits wait on a batch of their own
        outgoing, self._outgoing = self._outgoing, []
        self._send_batches(outgoing)

    def _send_batches(self, wires: list[tuple[Any, ...]]) -> None:
        if self._link is None or self._closed:
            return
        for start in range(0, len(wires), SUBMIT_BATCH):
            self._send_submit(wires[start : start + SUBMIT_BATCH])

    def _send_submit(self, batch: list[tuple[Any, ...]]) -> None:
        assert self._link is not None
        if self._link.send_body(_SUBMIT, batch):
            return  # in-process: handed over unencoded
        frames = protocol.encode(Command.SUBMIT, batch)
        if len(frames[2]) > self.max_message_bytes and len(batch) > 1:
            half = len(batch) // 2
            self._send_submit(batch[:half])
            self._send_submit(batch[half:])
            return
        assert self._link is not None
        self._link.send(frames)

    async def _read_loop(self) -> None:
        wakeup = self._wakeup
        loop = asyncio.get_running_loop()
        next_resend = loop.time() + RESEND_INTERVAL_S
        while True:
            link, subscriber = self._link, self._subscriber
            replies = link.drain(1000) if link is not None else []
            publications = subscriber.drain(1000) if subscriber is not None else []
            for frames in replies:
                self._on_reply(frames)
            for frames in publications:
                self._on_publication(frames)
            now = loop.time()
            if now >= next_resend:
                next_resend = self._resend(now)
            if now >= self._next_quiet:
                self._requery_quiet(now)
            if not replies and not publications:
                # A resend is due by then even with nothing unanswered now: a submit or GET
                # made while this loop sleeps does not wake it (no wake-up per request), and
                # an answer that never comes (a lost publication standing for a late ACK, a
                # reply refused behind a full pipe) must not leave it asleep for ever.
                await wakeup.wait(min(next_resend, self._next_quiet) - now)

    def _requery_quiet(self, now: float) -> None:
        """Ask, in one query, about the awaited tasks nothing has arrived for in a while."""
        if self._requery is not None and not self._requery.done():
            # The last one is still unanswered (and re-sent): no pile-up of queries.
            self._next_quiet = now + QUIET_REQUERY_S
            return
        due = []
        next_quiet = _NEVER
        quiet = self._quiet
        waiters = self._waiters
        abandoned = []
        silent = time.monotonic() - self._last_delivered >= QUIET_REQUERY_S
        overtaken = self._delivered_order
        for task_id, (at, interval, order) in quiet.items():
            if at <= now + _QUIET_SLACK_S:
                if all(future.done() for future in waiters.get(task_id, ())):
                    abandoned.append(task_id)  # every wait was cancelled: forget the task
                    continue
                if silent or order < overtaken:
                    interval = min(interval * 2, QUIET_REQUERY_MAX_S)
                    at = now + interval
                    due.append(task_id)
                else:  # results still arrive in order: it waits behind them
                    at = now + interval
                quiet[task_id] = (at, interval, order)
            next_quiet = min(next_quiet, at)
        self._next_quiet = next_quiet
        for task_id in abandoned:
            self._drop_waiters(task_id)
        if due:
            log.debug("nothing heard for %d awaited tasks; asking the broker", len(due))
            self._requery = self._request_state(due)
            self._requery.add_done_callback(_consume)

    def _resend(self, now: float) -> float:
        """Send again what the broker has not answered for a resend interval; returns when
        the next resend is due (what was sent since then is a resend interval old, and a
        quarter interval from now at the soonest)."""
        cutoff = now - RESEND_INTERVAL_S
        stale = []
        earliest = now  # the oldest send of what is not stale yet (now: nothing, or re-sent)
        for wire, sent in self._unacked.values():
            if sent <= cutoff:
                stale.append(wire)
            elif sent < earliest:
                earliest = sent
        if stale:
            log.info("re-sending %d unacknowledged submissions", len(stale))
            for wire in stale:
                self._unacked[wire[0]] = (wire, now)
            for start in range(0, len(stale), SUBMIT_BATCH):
                self._send_submit(stale[start : start + SUBMIT_BATCH])
        assert self._link is not None
        for request_id, (frames, sent) in list(self._unanswered.items()):
            if sent <= cutoff:
                self._unanswered[request_id] = (frames, now)
                self._link.send(frames)
            elif sent < earliest:
                earliest = sent
        # At most a few scans per interval: with sends of every age unanswered (a slow or
        # absent broker), the oldest reaches the interval every few microseconds, and a scan
        # per arrival would go over all of them each time.
        return max(earliest + RESEND_INTERVAL_S, now + RESEND_INTERVAL_S / 4)

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            message = protocol.decode(frames)
        except ProtocolError as exc:
            log.warning("ignored a malformed reply from the broker: %s", exc)
            return
        self._on_message(message.command, message.body)

    def _on_body(self, command: Command, body: Any) -> None:
        """A reply the in-process broker handed over unencoded (not validated again)."""
        if command is _ACK:  # its own [task_id, error(, code)] items
            self._on_acks(body)
        else:
            self._on_message(command, body, check=False)

    def _on_message(self, command: Command, body: Any, *, check: bool = True) -> None:
        """One reply from the broker (decoded from the wire, or handed over in-process)."""
        try:
            if command is _ACK:
                if check:
                    self._on_acks([(a.task_id, a.error, a.code) for a in protocol.parse_ack(body)])
                else:
                    self._on_acks(body)
            elif command is Command.STATE:
                self._on_state(body)
            elif command is Command.ADMIN_REPLY:
                request_id, error, result = protocol.parse_admin_reply(body)
                future = self._admin.get(request_id)
                if future is not None and not future.done():
                    if error is None:
                        future.set_result(result)
                    else:
                        future.set_exception(AdminError(error))
            elif command is Command.WELCOME:
                welcome = protocol.parse_welcome(body)
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_result(welcome)
            elif command is Command.ERROR:
                code, text = protocol.parse_error(body)
                log.error("broker error (%s): %s", code, text)
                if self._welcome is not None and not self._welcome.done():
                    self._welcome.set_exception(FlowrraError(f"broker refused us: {text}"))
        except ProtocolError as exc:
            log.warning("ignored a malformed reply from the broker: %s", exc)

    def _on_acks(self, acks: Iterable[Sequence[Any]]) -> None:
        """``[task id, error(, code)]`` per acknowledged submission (the broker's ACK items,
        the code left out of most)."""
        pending = self._acks
        unacked = self._unacked
        for ack in acks:
            task_id = ack[0]
            unacked.pop(task_id, None)
            wait = pending.pop(task_id, None)
            if wait is None:
                continue  # a duplicate acknowledgement
            error = ack[1]
            if error is not None:
                code = ack[2] if len(ack) > 2 else None
                if wait.error is None:
                    wait.error = f"task {task_id}: {error}"
                    wait.conflict = code == protocol.ACK_CONFLICT
                self._unresolved.pop(task_id, None)
                if wait.deferred:  # nobody awaits the submit: tell the task's waiters
                    self._refuse(task_id, f"task {task_id}: {error}", code)
            wait.remaining -= 1
            if wait.remaining == 0 and not wait.done:
                wait.finish()

    def _on_state(self, body: object) -> None:
        request_id, raw_records, more, omitted = protocol.parse_state(body)
        records = [protocol.parse_record(r) for r in raw_records]
        for record in records:
            if record["status"] in _FINAL:
                self._deliver(record)
            if self._watchers:
                self._to_watchers(record)
        wait = self._gets.get(request_id)
        if wait is None:
            self._unanswered.pop(request_id, None)
            return
        for record in records:
            wait.found[record["task_id"]] = record
        if more:  # further pieces follow: the request is being answered, do not resend it
            entry = self._unanswered.get(request_id)
            if entry is not None:
                self._unanswered[request_id] = (entry[0], asyncio.get_running_loop().time())
            return
        del self._gets[request_id]
        self._unanswered.pop(request_id, None)
        wait.pending -= 1
        if omitted:  # the reply reached the broker's size bound: ask for the rest
            self._send_get(wait, omitted)
        elif wait.pending == 0 and not wait.future.done():
            wait.future.set_result(wait.found)

    def _on_publication(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            return
        try:
            message = protocol.decode(frames[1:])
        except ProtocolError as exc:
            log.warning("ignored a malformed publication: %s", exc)
            return
        self._on_published(frames[0], message.command, message.body)

    def _on_published_body(self, topic: bytes, command: Command, records: Any) -> None:
        """A publication the in-process broker handed over unencoded: its records are the
        broker's own public views (``TaskRecord.public``), fresh dicts not validated again."""
        self._on_published(topic, command, records, check=False)

    def _on_published(
        self, topic: bytes, command: Command, records: Any, *, check: bool = True
    ) -> None:
        """One publication (decoded from the wire, or handed over in-process)."""
        try:
            if command is _RESULT:
                if not isinstance(records, list):
                    raise ProtocolError("RESULT body must be a list of records")
                for body in records:
                    record = protocol.parse_record(body) if check else body
                    if record["status"] in _FINAL:
                        self._deliver(record)
                    elif record["status"] == _PENDING:
                        # Queued again (a dead letter retried): forget the old result.
                        self._forget(record["task_id"])
                    if self._watchers:
                        self._to_watchers(record)
            elif command is Command.SUBSCRIBED and topic == self._prefix:
                self._on_prefix_live()
        except ProtocolError as exc:
            log.warning("ignored a malformed publication: %s", exc)

    async def watch(self, task_id: str) -> AsyncIterator[dict[str, Any]]:
        """The task's record each time its status or progress changes, pushed by the broker
        (the current one first), until the final one."""
        self._check_open()
        # The subscription travels on another socket than the submit: the broker must know
        # the task when the subscription reaches it, or it keeps no watcher for its progress.
        await self.settled([task_id])
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._watchers.setdefault(task_id, []).append(queue)
        topic = task_id.encode()
        if self._subscriber is not None:
            self._subscriber.subscribe(topic)  # the broker replays the record, then pushes
        try:
            (snapshot,) = await self.get([task_id])
            if snapshot is None:
                raise FlowrraError(f"no task {task_id!r} is known to the broker")
            last: tuple[Any, ...] | None = None
            record = snapshot
            while True:
                key = (record["status"], record["progress"], record["retries"])
                if key != last:
                    last = key
                    yield record
                if record["status"] in _FINAL:
                    return
                record = await queue.get()
        finally:
            queues = self._watchers.get(task_id)
            if queues is not None:
                queues.remove(queue)
                if not queues:
                    del self._watchers[task_id]
            if self._subscriber is not None and not self._closed:
                self._subscriber.unsubscribe(topic)

    def _to_watchers(self, record: dict[str, Any]) -> None:
        for queue in self._watchers.get(record["task_id"], ()):
            queue.put_nowait(record)

    def _on_prefix_live(self) -> None:
        self._epoch += 1
        first = not self._live.is_set()
        self._live.set()
        if not first:
            # The subscription was re-established (broker restart or reconnect): results may
            # have been published while it was down, so ask for everything still awaited.
            log.info("result subscription re-established; re-checking %d tasks", len(self._waiters))
            if self._waiters:
                self._refresh(list(self._waiters))

    def _deliver(self, record: dict[str, Any]) -> None:
        task_id = record["task_id"]
        if self.late_acks and task_id in self._acks and task_id.startswith(self.client_id):
            # A final result of one of our own ids is stored state: it acknowledges the
            # submit, and the broker may leave that ACK out (late ACKs, protocol.md 4.4).
            self._on_acks(((task_id, None, None),))
        self._unresolved.pop(task_id, None)
        results = self._results
        results[task_id] = record
        if len(results) > RESULT_CACHE_SIZE:
            results.popitem(last=False)
        if task_id in self._waiters:
            quiet = self._quiet.get(task_id)
            if quiet is not None:
                self._last_delivered = time.monotonic()
                if quiet[2] > self._delivered_order:
                    self._delivered_order = quiet[2]
            for future in self._drop_waiters(task_id):
                if not future.done():
                    future.set_result(record)


def _payload_limit(max_message_bytes: int) -> int:
    """The largest payload of a submit: headroom is kept for the message envelope and the
    submission's other fields."""
    return max_message_bytes - min(4096, max_message_bytes // 8)


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: a refresh that failed needs no report


def _unavailable(future: asyncio.Future[Any], what: str, client: BrokerClient) -> None:
    if not future.done():
        future.set_exception(
            BrokerUnavailable(f"the broker did not {what} within {client.request_timeout_s}s")
        )
