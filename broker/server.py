"""The broker's event loop: drain, handle, tick, commit once, then send.

The same :class:`BrokerService` runs in the ``flowrra-broker`` process over ZeroMQ sockets
and inside an app's own event loop over the in-process hub (the embedded default).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flowrra.broker.config import BrokerConfig
from flowrra.broker.core import Broker
from flowrra.broker.endpoint import BrokerEndpoint
from flowrra.broker.stats import TaskStats
from flowrra.broker.store import Durability, LmdbStore, MemoryStore, Store, StoreError
from flowrra.errors import ProtocolError
from flowrra.inproc import InprocHub
from flowrra.protocol import FINAL_STATUS_VALUES, Command, decode
from flowrra.transport import Wakeup

log = logging.getLogger("flowrra.broker")

# Most messages handled per tick: bounds the latency of a tick while still batching.
DRAIN_LIMIT = 2000
# How often the broker lets go of the store pages its reads mapped in (LmdbStore).
RELEASE_PAGES_INTERVAL_S = 2.0
# While commits keep failing (a full disk), the error is logged again at most this often.
FAILURE_LOG_INTERVAL_S = 30.0
# Longest an fsync'd commit waits for the outcomes of the tasks its tick dispatched.
LINGER_MAX_S = 0.001
# Longest the ACK to a client that allows late acknowledgements (HELLO ``late_acks``) waits
# for the outcomes of the tasks it acknowledges, so that it reaches the client with their
# results: one wake-up of the client per quick task instead of two (protocol.md §4.4).
ACK_HOLD_MAX_S = 0.001
# Clients remembered as allowing late acknowledgements (the oldest forgotten first: a
# forgotten one is acknowledged at once, as any client that did not ask).
LATE_ACK_PEERS_MAX = 10_000
# Shortest result TTL with which a published final result stands for a held ACK. A client
# that missed the publication resends after about a second (RESEND_INTERVAL_S) and is
# answered from the stored result; were the result gone by then, the resend would be a new
# submit and the task would run twice. Far above any resend delay a live client has.
LATE_ACK_MIN_RESULT_TTL_S = 60.0
_HELLO_FRAME = bytes([Command.HELLO])


def open_store(config: BrokerConfig) -> Store:
    """The LMDB store under ``data_dir``, or the in-memory twin when there is none."""
    if config.data_dir is None:
        return MemoryStore()
    return LmdbStore(config.data_dir, config.durability)


class BrokerService:
    """Runs a :class:`Broker` over a transport endpoint until :meth:`stop` is called.

    ``clock`` is where the loop reads the time (Unix seconds) it hands the broker: due
    retries, countdowns, deadlines, leases and heartbeats all follow it. Tests give a clock
    they advance (:class:`flowrra.testing.Clock`) and then set :attr:`wakeup`, so that what
    became due runs at once instead of after a real wait.
    """

    def __init__(
        self,
        broker: Broker,
        endpoint: BrokerEndpoint,
        wakeup: Wakeup,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.broker = broker
        if not any(isinstance(o, TaskStats) for o in broker.observers):
            broker.observers.append(TaskStats())  # for the task_stats and task_list verbs
        self.endpoint = endpoint
        # The in-process hub takes replies, dispatches and results unencoded.
        self._hub = endpoint if isinstance(endpoint, InprocHub) else None
        self.wakeup = wakeup
        self.store = store
        self.clock = clock
        self._stopping = False
        # An fsync'd commit takes hundreds of microseconds. Embedded, it runs off the event
        # loop so that the app (and the node sharing this loop) keeps running meanwhile. The
        # broker's own process has nothing else to run then (the loop awaits the commit
        # anyway), and handing it to a thread and back cost ~0.12 ms per commit: inline.
        self._durable = isinstance(store, LmdbStore) and store.durability is Durability.FULL
        self._writer = (
            ThreadPoolExecutor(1, "flowrra-commit")
            if self._durable and self._hub is not None
            else None
        )
        self.ready = asyncio.Event()
        # Since when commits fail (None while they succeed), how many did, and when to say so
        # again in the log.
        self._failing_since: float | None = None
        self._failed_commits = 0
        self._next_failure_log = 0.0
        self._processing = False  # inside process_now
        self._sleeping_until = math.inf  # when the loop, asleep, wakes by itself
        self._next_release = 0.0  # when to let go of mapped store pages next
        # A commit waits for more input until then (time.monotonic(); 0.0: it does not;
        # see _linger), at most about as long as a commit takes (_commit_s, measured).
        self._linger_until = 0.0
        self._commit_s = LINGER_MAX_S / 2
        # Clients whose HELLO allowed late acknowledgements (peer -> its client id, the
        # prefix its own results are published on), their held ACK items, and until when
        # (time.monotonic()) the oldest of those may wait (see _hold_acks).
        self._late_ack_peers: dict[bytes, bytes] = {}
        self._held_acks: dict[bytes, list[list[Any]]] = {}
        self._held_until = 0.0
        # Whether a published final result may stand for a held ACK (_release_acks).
        self._results_outlive_resends = broker.config.result_ttl_s >= LATE_ACK_MIN_RESULT_TTL_S

    def stop(self) -> None:
        self._stopping = True
        self.wakeup.set()

    async def run(self) -> None:
        broker, endpoint = self.broker, self.endpoint
        broker.enforce_liveness = endpoint.peers_can_vanish
        broker.recover(self.clock())
        if broker.store.dirty:
            await self._commit()
        self.store.release_pages()  # what the recovery scan mapped in (a deep queue's index)
        self.ready.set()
        # Drained messages a full tick left for the next one (handled first, in order).
        deferred: deque[tuple[bytes, list[bytes]]] = deque()
        # Whether a drain now would return anything, for endpoints that can tell cheaply.
        has_input: Callable[[], bool] | None = getattr(endpoint, "has_input", None)
        # Over ZeroMQ the linger polls a loop iteration at a time rather than sleep: waking a
        # sleeping loop for the outcome cost ~0.1 ms of each full W2 round here (1.29 against
        # 1.19 ms, 4 interleaved pairs), and the linger is short (about one commit) and
        # bounded. Embedded, the loop is the app's: it sleeps.
        poll_input = has_input if self._hub is None else None
        try:
            while not self._stopping:
                if deferred:
                    messages, topics = list(deferred), list[bytes]()
                    deferred.clear()
                else:
                    messages, topics = endpoint.drain(DRAIN_LIMIT)
                now = self.clock()
                handle = broker.handle
                self._processing = True  # what a send of this tick brings waits for the next
                for index, (peer, frames) in enumerate(messages):
                    if broker.tick_is_full:
                        deferred.extend(messages[index:])
                        break
                    if len(frames) == 3 and frames[1] == _HELLO_FRAME:
                        self._note_hello(peer, frames)
                    handle(peer, frames, now)
                for topic in topics:
                    broker.handle_subscription(topic)
                broker.tick(now)
                fresh = False
                if self.store.dirty:
                    if self._durable or self._late_ack_peers:
                        fresh = self._fresh_dispatch()
                    # Dispatches need not wait for the disk: a crash before this commit only
                    # means the attempt runs again under the same number, and attempts are
                    # fenced, so the task still gets exactly one final result. Nodes start
                    # working while the fsync runs; acknowledgements and results wait for it.
                    if self._failing_since is None:  # else they would be resent every tick
                        self._send_dispatches(now)
                    if self._durable and self._linger(fresh, bool(deferred)):
                        # Wait (briefly) for the outcomes of what was just dispatched, and
                        # commit them with it: one fsync instead of two. Nothing waiting
                        # on this commit has been sent, so no promise is made early.
                        self._processing = False
                        if poll_input is not None:
                            while not poll_input() and time.monotonic() < self._linger_until:
                                await asyncio.sleep(0)
                        elif not (has_input is not None and has_input()):
                            await self.wakeup.wait(self._linger_until - time.monotonic())
                        continue
                    self._linger_until = 0.0
                    await self._commit()
                if self._late_ack_peers or self._held_acks:  # (held ones go out in any case)
                    self._hold_acks(fresh)
                if broker.outbox:
                    self._flush(now)
                self._processing = False
                if now >= self._next_release:
                    # Pages of the store that lookups mapped in (a deep queue's dedup reads
                    # touch the whole task table): they count in RSS until let go.
                    self._next_release = now + RELEASE_PAGES_INTERVAL_S
                    self.store.release_pages()
                if deferred or (bool(messages or topics) if has_input is None else has_input()):
                    await asyncio.sleep(0)  # let the other coroutines of this loop run
                    continue
                # Nothing waits (a ZeroMQ endpoint says so, asking once after this tick's
                # sends): sleep until something arrives or is due, with no empty drain and
                # tick first.
                now = self.clock()
                sleep_s = broker.seconds_until_due(now)
                if self._held_acks:  # they go out by _held_until at the latest
                    sleep_s = min(sleep_s, max(self._held_until - time.monotonic(), 0.0))
                self._sleeping_until = now + sleep_s
                await self.wakeup.wait(sleep_s)
                self._sleeping_until = math.inf
        finally:
            if self.store.dirty:
                await self._commit()
            self._release_acks()
            if broker.outbox:
                self._flush(self.clock())
            if self._writer is not None:
                self._writer.shutdown(wait=True)

    def _linger(self, fresh: bool, deferred: bool) -> bool:
        """Whether this tick's commit should wait for more input first.

        Only with an fsync'd commit, after a tick that dispatched only tasks it accepted
        itself (see :meth:`_fresh_dispatch`) and has nothing to send after its commit but
        acknowledgements (no result, no reply to a request): the outcomes of quick tasks
        then arrive before the commit and share its fsync, instead of waiting for it and
        needing one of their own. The wait lasts at most about one commit (the recent
        commit time, at most ``LINGER_MAX_S``) from the first such tick, so an
        acknowledgement waits at most that much longer when no outcome comes. Over ZeroMQ
        the loop polls meanwhile instead of sleeping (it keeps one CPU busy for that long).
        (Real time, not :attr:`clock`: a test's clock may stand still.)
        """
        now = time.monotonic()
        if self._linger_until:
            return now < self._linger_until and not self._publishes_or_replies()
        if (
            not fresh
            or deferred
            or self._stopping
            or self._failing_since is not None
            or self._publishes_or_replies()
        ):
            return False
        self._linger_until = now + min(self._commit_s, LINGER_MAX_S)
        return True

    def _fresh_dispatch(self) -> bool:
        """This tick dispatches tasks, all of them accepted in this tick.

        A broker killed before the commit loses such a task whole (acceptance and
        dispatch): its client sends it again and it may run twice, which a dispatch that
        leaves before its commit allows anyway (docs/operations.md). A task stored by an
        earlier commit and dispatched now is different: after a kill before the commit its
        node must claim the attempt at re-registration, so the window before the commit is
        kept short for it (no lingering)."""
        return bool(self.broker.outbox.acks) and self.broker.dispatches_only_accepted

    def _note_hello(self, peer: bytes, frames: list[bytes]) -> None:
        """Remember whether this client allows late acknowledgements (its HELLO says
        ``late_acks: true``); the broker's core answers the HELLO itself."""
        try:
            body = decode(frames).body
        except ProtocolError:
            return  # the core drops it too
        late = self._late_ack_peers
        late.pop(peer, None)
        if isinstance(body, dict) and body.get("late_acks") is True:
            client_id = body.get("id")
            late[peer] = client_id.encode() if isinstance(client_id, str) else b""
            if len(late) > LATE_ACK_PEERS_MAX:
                del late[next(iter(late))]

    def _hold_acks(self, fresh: bool) -> None:
        """Hold back, after their commit, the ACKs to late-ack clients of a tick that
        dispatched what it accepted, until the tick that publishes results (theirs, as a
        rule) or for ``ACK_HOLD_MAX_S`` at most; then they leave with that tick's output.

        Nothing is promised early: an ACK leaves only later than it could have. A client
        whose submit waits for its ACK (``confirm_submits``) does not ask for this."""
        outbox = self.broker.outbox
        held = self._held_acks
        if held and (
            outbox.results
            or outbox.publications
            or self._stopping
            or time.monotonic() >= self._held_until
        ):
            self._release_acks()
            return
        if not fresh or not outbox.acks or self._failing_since is not None:
            return
        late = self._late_ack_peers
        for peer in [peer for peer in outbox.acks if peer in late]:
            held.setdefault(peer, []).extend(outbox.acks.pop(peer))
        if held and not self._held_until:
            self._held_until = time.monotonic() + ACK_HOLD_MAX_S

    def _release_acks(self) -> None:
        """Put the held ACK items back in the outbox, ahead of this tick's (in order),
        except those whose task's final result this tick publishes on the client's own
        prefix: a late-ack client takes that result as the acknowledgement (one message
        less each way). Only while results outlive a resend (``LATE_ACK_MIN_RESULT_TTL_S``)."""
        if not self._held_acks:
            return
        outbox = self.broker.outbox
        acks, results, late = outbox.acks, outbox.results, self._late_ack_peers
        results_outlive_resends = self._results_outlive_resends
        for peer, items in self._held_acks.items():
            prefix = late.get(peer) if results_outlive_resends else None
            records = results.get(prefix) if prefix else None
            if records:
                final = {r["task_id"] for r in records if r["status"] in FINAL_STATUS_VALUES}
                items = [item for item in items if item[1] is not None or item[0] not in final]
            if items:
                acks[peer][:0] = items
        self._held_acks = {}
        self._held_until = 0.0

    def _publishes_or_replies(self) -> bool:
        outbox = self.broker.outbox
        return bool(outbox.results or outbox.publications or outbox.messages)

    def process_now(self) -> None:
        """Handle what arrived, a tick, commit and send, all on the caller's stack.

        The embedded default runs this whenever a client or node of the same process sends
        (see :class:`flowrra.inproc.InprocHub`): the same broker logic, without a trip
        around the event loop per hop. Only with a store whose commit does not wait for the
        disk (in memory, or ``fast``); a full-durability commit runs off the loop instead.
        Sends made while it runs are handled by the same call, in order.
        """
        if self._processing or self._stopping:
            self.wakeup.set()  # whoever is processing (or the loop) picks it up
            return
        self._process(None)

    def process_body(self, peer: bytes, command: Command, body: Any) -> bool:
        """Like :meth:`process_now`, for one message an in-process peer handed over
        unencoded (after whatever arrived before it). False when it cannot run now (this
        stack is processing already, or the broker is stopping): the hub then queues the
        message encoded, for the tick that is under way."""
        if self._processing or self._stopping:
            return False
        self._process((peer, command, body))
        return True

    def _process(self, first: tuple[bytes, Command, Any] | None) -> None:
        self._processing = True
        broker, hub = self.broker, self._hub
        assert hub is not None  # (only the in-process hub calls process_now/process_body)
        pending = hub.has_input()
        try:
            while True:
                if pending:
                    messages, topics = hub.drain(DRAIN_LIMIT)
                elif first is None and not broker.holds_released:
                    return
                else:
                    messages, topics = [], []
                now = self.clock()
                for peer, frames in messages:
                    broker.handle(peer, frames, now)
                if first is not None:
                    broker.handle_message(first[0], first[1], first[2], now)
                    first = None
                for topic in topics:
                    broker.handle_subscription(topic)
                broker.tick(now)
                if self.store.dirty:
                    if self._failing_since is None:
                        self._send_dispatches(now)
                    self._commit_now()
                self._flush(now)
                if now + broker.seconds_until_due(now) < self._sleeping_until:
                    self.wakeup.set()  # something is due before the loop would wake
                # Another pass only for what this one's sends brought (a nested send is
                # queued while this stack processes) or for released workflow steps.
                pending = hub.has_input()
                if not pending and not broker.holds_released:
                    return
        finally:
            self._processing = False

    @property
    def commits_inline(self) -> bool:
        """True when a commit does not wait for the disk (it may run on the caller's stack)."""
        return not self._durable

    async def _commit(self) -> None:
        if not self._durable:
            self._commit_now()
            return
        started = time.monotonic()
        try:
            if self._writer is None:
                self.store.commit()
            else:
                await asyncio.get_running_loop().run_in_executor(self._writer, self.store.commit)
        except (StoreError, OSError) as exc:
            self._commit_failed(exc)
            return
        # How long a commit takes (fsync and the hand-off), smoothed: the linger's bound.
        self._commit_s += (time.monotonic() - started - self._commit_s) / 8
        self.broker.committed()
        if self._failing_since is not None:
            self._recovered()

    def _commit_now(self) -> None:
        try:
            self.store.commit()
        except (StoreError, OSError) as exc:
            self._commit_failed(exc)
            return
        self.broker.committed()
        if self._failing_since is not None:
            self._recovered()

    def _recovered(self) -> None:
        """The first good commit after failed ones (the callers test _failing_since: no
        call per good commit)."""
        assert self._failing_since is not None
        log.warning(
            "the store accepts writes again, after %d failed commits in %.1fs",
            self._failed_commits,
            self.clock() - self._failing_since,
        )
        self._failing_since = None

    def _commit_failed(self, exc: Exception) -> None:
        """Nothing of this tick reached the disk (a full or failing disk, see
        docs/operations.md): refuse its submissions instead of acknowledging tasks the store
        does not hold, roll the broker back to what the store holds, and keep serving."""
        now = self.clock()
        self.broker.counters["failed_commits"] += 1
        if self._failing_since is None:
            self._failing_since, self._failed_commits = now, 0
            self._next_failure_log = now + FAILURE_LOG_INTERVAL_S
            log.error("commit failed, refusing this tick's submissions: %s", exc)
        elif now >= self._next_failure_log:
            self._next_failure_log = now + FAILURE_LOG_INTERVAL_S
            log.error(
                "commits still failing (%d in %.0fs), submissions refused: %s",
                self._failed_commits + 1,
                now - self._failing_since,
                exc,
            )
        self._failed_commits += 1
        self.store.discard()
        self.broker.abandon_tick(str(exc), now)

    def _send_dispatches(self, now: float) -> None:
        outbox = self.broker.outbox
        if not outbox.tasks and not outbox.messages:
            return
        direct = self._take_direct(outbox.tasks) if outbox.tasks else None
        if outbox.tasks or outbox.messages:
            send = self.endpoint.send
            for peer, frames in outbox.take_dispatches():
                if not send(peer, frames):
                    self.broker.peer_unreachable(peer, now)
                    self.wakeup.set()
        if direct:
            self._send_bodies(Command.TASKS, direct, now)

    def _flush(self, now: float) -> None:
        """Send what the tick's outbox holds (after its commit), in order: replies and
        other messages, ACKs, TASKS, publications, RESULT records."""
        outbox = self.broker.outbox
        acks = tasks = None
        results: dict[bytes, list[dict[str, Any]]] | None = None
        if self._hub is not None:  # in-process peers take their bodies unencoded
            if outbox.acks:
                acks = self._take_direct(outbox.acks)
            if outbox.tasks:
                tasks = self._take_direct(outbox.tasks)
            if outbox.results:
                results, outbox.results = outbox.results, defaultdict(list)
        # (bool(outbox), inline: after the hand-outs above its tables are usually empty)
        if outbox.messages or outbox.publications or outbox.acks or outbox.tasks or outbox.results:
            messages, publications = outbox.take()
            send = self.endpoint.send
            for peer, frames in messages:
                if not send(peer, frames):
                    self.broker.peer_unreachable(peer, now)
                    self.wakeup.set()  # its tasks were re-queued: dispatch them next tick
        else:
            publications = []
        if acks:
            self._send_bodies(Command.ACK, acks, now)
        if tasks:
            self._send_bodies(Command.TASKS, tasks, now)
        if publications:
            publish = self.endpoint.publish
            for frames in publications:
                publish(frames)
        if results:
            assert self._hub is not None
            publish_body = self._hub.publish_body
            for topic, records in results.items():
                publish_body(topic, Command.RESULT, records)

    def _take_direct(self, table: dict[bytes, list[list[Any]]]) -> list[tuple[bytes, Any]]:
        """Take the items bound for in-process peers that take them unencoded."""
        hub = self._hub
        if hub is None:
            return []
        if hub.every_peer_takes_bodies:
            direct = list(table.items())
            table.clear()
            return direct
        takes_bodies = hub.takes_bodies
        direct = [(peer, items) for peer, items in table.items() if takes_bodies(peer)]
        for peer, _ in direct:
            del table[peer]
        return direct

    def _send_bodies(self, command: Command, entries: list[tuple[bytes, Any]], now: float) -> None:
        assert self._hub is not None
        send_body = self._hub.send_body
        for peer, body in entries:
            if not send_body(peer, command, body):
                self.broker.peer_unreachable(peer, now)
                self.wakeup.set()
