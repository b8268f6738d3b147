"""The broker's side of the transport: the ROUTER (requests) and XPUB (results) sockets.

:class:`ZmqBrokerEndpoint` keeps per-peer send bookkeeping (a bounded backlog behind a full
pipe, the large frames libzmq still holds) and, with CURVE, applies the role policy of
:mod:`flowrra.broker.security` to every message before the broker sees it. The embedded
default uses :class:`flowrra.inproc.InprocHub` in its place (the :class:`BrokerEndpoint`
interface).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from typing import Any, Protocol

import zmq

from flowrra.broker.security import node_command_allowed
from flowrra.protocol import MAX_MESSAGE_BYTES
from flowrra.transport import (
    NOBLOCK,
    SNDMORE,
    Frames,
    Wakeup,
    WatchedSocket,
    raw_send,
    send_frames,
)

log = logging.getLogger("flowrra.broker.endpoint")

# What the broker holds for a peer that does not read. Nodes bound what is in flight to them
# with credit and clients read everything at once (their sockets have no high-water mark), so
# a healthy peer never gets near these; they bound what a stalled or hostile peer costs (a
# DEALER asking for a large result again and again, never reading the replies, or a SUB that
# never reads its publications).
#
# * ROUTER_SNDHWM: messages libzmq queues per peer before a send fails with EAGAIN.
# * LARGE_FRAME_BYTES: frames at least this big (pyzmq's zero-copy threshold) go to libzmq
#   without a copy and are tracked until libzmq lets go of them, so the bytes of large frames
#   a pipe holds are counted, not only its messages: at most ``peer_pipe_bytes`` per peer, and
#   ``publish_byte_limit`` for the publications of all subscribers. Small messages cost at
#   most ROUTER_SNDHWM (PUB_SNDHWM) x LARGE_FRAME_BYTES per peer (subscriber).
# * Behind a full pipe, a peer's messages wait in order in a backlog of at most
#   PEER_BACKLOG_MESSAGES messages and ``peer_backlog_bytes``. A message beyond that is
#   refused (``send`` says False, and the broker treats the peer as unreachable: a node's
#   tasks are queued again, a client asks again for what went unanswered), and so is every
#   later one until the backlog has drained, so that no reply reaches a peer with a gap in it.
# * A backlog that has not moved for PEER_STALL_S belongs to a peer that does not read: it is
#   discarded, and the next message to that peer refused.
# * PUB_SNDHWM: publications libzmq queues per subscriber; beyond it, it drops them for that
#   subscriber. A large publication that would pass ``publish_byte_limit`` is not sent.
#   Results are stored, and a waiting client that hears nothing asks for them.
ROUTER_SNDHWM = 1_000
PUB_SNDHWM = 10_000
LARGE_FRAME_BYTES = zmq.COPY_THRESHOLD  # 64 KiB
PEER_BACKLOG_MESSAGES = 10_000
PEER_STALL_S = 3.0  # the default liveness window (3 heartbeats of 1 s)
MIN_PIPE_BYTES = 32 * 1024 * 1024
MIN_BACKLOG_BYTES = 64 * 1024 * 1024
MIN_PUBLISH_BYTES = 64 * 1024 * 1024


def peer_pipe_bytes(max_message_bytes: int) -> int:
    """Bytes of large frames one peer's pipe may hold: twice the largest message, 32 MiB at
    least."""
    return max(MIN_PIPE_BYTES, 2 * max_message_bytes)


def peer_backlog_bytes(max_message_bytes: int) -> int:
    """Bytes one peer's backlog may hold: four times the largest message, 64 MiB at least.
    With the pipe's share that is more than the largest reply the broker builds for one
    request (a GET's reply: four pieces), so such a reply is never refused whole."""
    return max(MIN_BACKLOG_BYTES, 4 * max_message_bytes)


def publish_byte_limit(max_message_bytes: int) -> int:
    """Bytes of large publications libzmq may hold for all subscribers: four times the
    largest message, 64 MiB at least."""
    return max(MIN_PUBLISH_BYTES, 4 * max_message_bytes)


# A backlog is retried this soon (doubling, up to the maximum, while no peer makes progress).
BACKLOG_RETRY_S = 0.005
BACKLOG_RETRY_MAX_S = 0.5
# Peers remembered as warned about, so that each is warned about once.
WARNED_PEERS_REMEMBERED = 1024


class BrokerEndpoint(Protocol):
    """The broker's side of the transport."""

    #: False when peers live in the broker's own process and cannot vanish on their own.
    peers_can_vanish: bool
    publish_endpoint: str

    def drain(self, limit: int) -> tuple[list[tuple[bytes, Frames]], list[bytes]]:
        """Return up to ``limit`` messages as (peer, frames) and any new subscription topics."""
        ...

    def send(self, peer: bytes, frames: Frames) -> bool:
        """Send to one peer; False when that peer is no longer connected."""
        ...

    def publish(self, frames: Frames) -> None: ...
    def close(self) -> None: ...


class ServerSecurity(Protocol):
    """CURVE on the broker's sockets (implemented by ``flowrra.broker.security.BrokerAccess``)."""

    def apply(self, socket: zmq.Socket[bytes]) -> None: ...
    def start(self, context: zmq.Context[Any]) -> None: ...
    def stop(self) -> None: ...


def _recv_parts(socket: zmq.Socket[bytes], flags: int) -> list[zmq.Frame]:
    """One message as frames that carry their metadata (the CURVE user id)."""
    return socket.recv_multipart(flags, copy=False)


def default_publish_endpoint(bind_url: str) -> str:
    """The PUB endpoint next to a ROUTER bind URL: same host, port + 1."""
    scheme, sep, rest = bind_url.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not port.isdigit():
        raise ValueError(f"cannot derive a publish endpoint from {bind_url!r}; pass one")
    return f"tcp://{host}:{int(port) + 1}"


def connectable(endpoint: str) -> str:
    """Turn a bind address such as ``tcp://0.0.0.0:5556`` into one peers can connect to."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:"):
        if endpoint.startswith(wildcard):
            return "tcp://127.0.0.1:" + endpoint[len(wildcard) :]
    return endpoint


def _large_bytes(frames: Frames) -> int:
    """How many bytes of ``frames`` are in frames sent without a copy (and tracked)."""
    return sum(n for n in map(len, frames) if n >= LARGE_FRAME_BYTES)


def _send_tracked(socket: zmq.Socket[bytes], frames: Frames, flags: int) -> zmq.MessageTracker:
    """Like :func:`send_frames`, large frames without a copy; tracks when libzmq frees them."""
    last = len(frames) - 1
    events: list[zmq.MessageTracker] = []
    for i, frame in enumerate(frames):
        frame_flags = flags | SNDMORE if i < last else flags
        if len(frame) >= LARGE_FRAME_BYTES:
            message = zmq.Frame(frame, track=True, copy=False)
            raw_send(socket, message, frame_flags, False)
            assert message.tracker is not None
            events.append(message.tracker)
        else:
            raw_send(socket, frame, frame_flags)
    return events[0] if len(events) == 1 else zmq.MessageTracker(*events)


class _InFlight:
    """Large frames libzmq still holds (queued, not yet written to the connection)."""

    __slots__ = ("bytes", "trackers")

    def __init__(self) -> None:
        self.trackers: deque[tuple[zmq.MessageTracker, int]] = deque()
        self.bytes = 0

    def add(self, tracker: zmq.MessageTracker, size: int) -> None:
        self.trackers.append((tracker, size))
        self.bytes += size

    def reap(self, *, in_order: bool = True) -> None:
        """Forget what libzmq has let go of: from the front for one peer's pipe (FIFO), or
        everywhere (``in_order=False``) for publications that several pipes hold."""
        trackers = self.trackers
        if in_order:
            while trackers and trackers[0][0].done:
                self.bytes -= trackers.popleft()[1]
        elif trackers:
            kept = [(t, n) for t, n in trackers if not t.done]
            self.trackers = deque(kept)
            self.bytes = sum(n for _, n in kept)

    def room_for(self, size: int, limit: int) -> bool:
        """Whether ``size`` more bytes stay within ``limit`` (always, when nothing is held)."""
        return not self.trackers or self.bytes + size <= limit


class _Peer:
    """What the endpoint keeps for one peer: messages its full pipe refused, in order, and
    the large frames its pipe holds."""

    __slots__ = ("backlog", "backlog_bytes", "in_flight", "moved_at", "refusing")

    def __init__(self) -> None:
        self.backlog: deque[tuple[Frames, int]] = deque()
        self.backlog_bytes = 0
        self.in_flight = _InFlight()
        self.moved_at = 0.0  # when the backlog began or last moved
        self.refusing = False  # refuse messages until the backlog has drained


# _try_send outcomes.
_SENT, _FULL, _GONE = 0, 1, 2


class ZmqBrokerEndpoint:
    """The broker's ROUTER (requests from clients and nodes) and XPUB (results) sockets.

    A peer that stops reading costs at most its pipe (``ROUTER_SNDHWM`` messages, of which
    ``pipe_bytes`` in large frames) and its backlog (``PEER_BACKLOG_MESSAGES`` messages,
    ``backlog_bytes``); see ``ROUTER_SNDHWM``. ``counters`` counts what was refused or dropped.
    """

    peers_can_vanish = True

    def __init__(
        self,
        bind_url: str,
        publish_url: str | None,
        wakeup: Wakeup,
        *,
        advertised_publish: str | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        security: ServerSecurity | None = None,
    ) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context.instance()
        self.security = security
        if security is not None:
            security.start(self.context)
        router = self.context.socket(zmq.ROUTER)
        if security is not None:
            security.apply(router)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, ROUTER_SNDHWM)
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        router.bind(bind_url)
        publisher = self.context.socket(zmq.XPUB)
        if security is not None:
            security.apply(publisher)
        publisher.setsockopt(zmq.LINGER, 0)
        publisher.setsockopt(zmq.SNDHWM, PUB_SNDHWM)
        # Every subscription reaches the broker, so it can replay stored state to a late
        # subscriber (the slow-joiner fix: zguide ch. 5, last-value cache).
        publisher.setsockopt(zmq.XPUB_VERBOSE, 1)
        publish_url = publish_url or default_publish_endpoint(bind_url)
        try:
            publisher.bind(publish_url)
        except zmq.ZMQError:
            router.close(linger=0)
            publisher.close(linger=0)
            raise
        self.bind_url = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.publish_endpoint = advertised_publish or connectable(
            publisher.getsockopt_string(zmq.LAST_ENDPOINT)
        )
        self._router = WatchedSocket(router, wakeup)
        self._publisher = WatchedSocket(publisher, wakeup)
        self._loop = asyncio.get_running_loop()
        self.pipe_bytes = peer_pipe_bytes(max_message_bytes)
        self.backlog_bytes = peer_backlog_bytes(max_message_bytes)
        self.publish_bytes = publish_byte_limit(max_message_bytes)
        # Peers with a backlog or with large frames in their pipe, and those with a backlog:
        # messages a full pipe refused, retried in order on later ticks.
        self._peers: dict[bytes, _Peer] = {}
        self._backlogged: dict[bytes, _Peer] = {}
        self._retry: asyncio.TimerHandle | None = None
        self._retry_delay = BACKLOG_RETRY_S
        self._next_sweep = 0.0
        self._published = _InFlight()
        self._skipping_publications = False
        self._warned: OrderedDict[tuple[bytes, str], None] = OrderedDict()
        self.counters = {
            "messages_refused": 0,  # beyond a backlog's limits
            "peers_dropped": 0,  # backlogs that did not move for PEER_STALL_S
            "messages_dropped": 0,  # the messages of those backlogs
            "publications_dropped": 0,  # large publications beyond publish_byte_limit
        }

    def drain(self, limit: int) -> tuple[list[tuple[bytes, Frames]], list[bytes]]:
        if self._backlogged:
            self._retry_backlog()
        if self._peers and self._loop.time() >= self._next_sweep:
            self._sweep()
        messages: list[tuple[bytes, Frames]] = []
        if self.security is not None:
            messages = self._drain_authenticated(limit)
        else:
            for frames in self._router.drain(limit):
                if len(frames) < 2:
                    continue  # no routing id or empty: nothing to answer
                messages.append((frames[0], frames[1:]))
        # XPUB delivers b"\x01" + topic for a subscription, b"\x00" + topic for its end.
        topics = [
            frames[0][1:]
            for frames in self._publisher.drain(limit)
            if frames and frames[0][:1] == b"\x01"
        ]
        return messages, topics

    def has_input(self) -> bool:
        """Something waits to be drained. Call it after a tick's sends, before the loop
        sleeps: ZeroMQ's descriptor is edge-triggered and a send can consume its edge, so
        a socket sent on since its last drain is asked (once, not after every send); for
        the others the descriptor signals what arrives."""
        return self._router.has_input() or self._publisher.has_input()

    def _drain_authenticated(self, limit: int) -> list[tuple[bytes, Frames]]:
        """Like drain, reading each message's CURVE user id: node commands from a client
        key are dropped here, before the broker sees them."""
        out: list[tuple[bytes, Frames]] = []
        for parts in self._router.drain_with(limit, _recv_parts):
            if len(parts) < 2:
                continue
            user = parts[0].get("User-Id")
            frames = [part.bytes for part in parts]
            if not node_command_allowed(str(user), frames[1:]):
                # Logged every time: refusals are security events worth auditing.
                log.warning("refused a node command from a non-node key (%s)", user)
                continue
            out.append((frames[0], frames[1:]))
        return out

    def send(self, peer: bytes, frames: Frames) -> bool:
        state = self._peers.get(peer)
        if state is not None and (state.backlog or state.refusing):
            return self._hold(peer, state, frames)  # behind what is already waiting
        outcome = self._try_send(peer, state, frames)
        if outcome == _SENT:
            return True
        if outcome == _GONE:
            self._forget(peer)
            return False
        return self._hold(peer, self._peers.get(peer) or self._peer(peer), frames)

    def _peer(self, peer: bytes) -> _Peer:
        state = self._peers[peer] = _Peer()
        return state

    def _forget(self, peer: bytes) -> None:
        self._peers.pop(peer, None)
        self._backlogged.pop(peer, None)

    def _try_send(self, peer: bytes, state: _Peer | None, frames: Frames) -> int:
        large = _large_bytes(frames)
        if large:
            if state is None:
                state = self._peer(peer)
            state.in_flight.reap()
            if not state.in_flight.room_for(large, self.pipe_bytes):
                return _FULL  # its pipe holds enough already: as good as full
        socket = self._router.socket
        try:
            raw_send(socket, peer, NOBLOCK | SNDMORE)
            if state is not None and large:
                state.in_flight.add(_send_tracked(socket, frames, NOBLOCK), large)
            else:
                send_frames(socket, frames, NOBLOCK)
        except zmq.Again:
            return _FULL
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return _GONE
            raise
        finally:
            self._router.sent()  # has_input asks once, after the tick's sends
        return _SENT

    def _hold(self, peer: bytes, state: _Peer, frames: Frames) -> bool:
        """Keep a message the peer's pipe refused, in order; False when it is refused."""
        backlog = state.backlog
        if state.refusing:
            if not backlog:  # its backlog was dropped: this refusal tells the broker
                state.refusing = False
            self.counters["messages_refused"] += 1
            return False
        now = self._loop.time()
        if backlog and now - state.moved_at > PEER_STALL_S:
            self._drop(peer, state)
            state.refusing = False  # refused right here
            self.counters["messages_refused"] += 1
            return False
        size = sum(map(len, frames))
        if backlog and (
            len(backlog) >= PEER_BACKLOG_MESSAGES or state.backlog_bytes + size > self.backlog_bytes
        ):
            state.refusing = True
            self.counters["messages_refused"] += 1
            self._warn_once(
                peer,
                "refusing",
                "peer %s does not read fast enough: refusing what does not fit in its "
                "backlog (%d messages, %d bytes) until it catches up",
                len(backlog),
                state.backlog_bytes,
            )
            return False
        if not backlog:
            log.debug("peer %s is not reading fast enough; holding its messages", peer.hex())
            state.moved_at = now
            self._backlogged[peer] = state
            self._schedule_retry(BACKLOG_RETRY_S)
        backlog.append((frames, size))
        state.backlog_bytes += size
        return True

    def _drop(self, peer: bytes, state: _Peer) -> None:
        """Discard a backlog that has not moved for PEER_STALL_S; the peer does not read."""
        count, size = len(state.backlog), state.backlog_bytes
        self.counters["peers_dropped"] += 1
        self.counters["messages_dropped"] += count
        state.backlog.clear()
        state.backlog_bytes = 0
        state.refusing = True  # until the next message, refused to tell the broker
        self._backlogged.pop(peer, None)
        self._warn_once(
            peer,
            "dropped",
            "peer %s does not read what the broker sends: dropped the %d messages (%d bytes) "
            "held for it for %.0fs",
            count,
            size,
            PEER_STALL_S,
        )

    def _warn_once(self, peer: bytes, what: str, message: str, *args: object) -> None:
        warned, key = self._warned, (peer, what)
        if key in warned:
            warned.move_to_end(key)
            log.debug(message, peer.hex(), *args)
            return
        warned[key] = None
        if len(warned) > WARNED_PEERS_REMEMBERED:
            warned.popitem(last=False)
        log.warning(message, peer.hex(), *args)

    def _retry_backlog(self) -> None:
        progress = False
        now = self._loop.time()
        for peer, state in list(self._backlogged.items()):
            backlog = state.backlog
            while backlog:
                frames, size = backlog[0]
                outcome = self._try_send(peer, state, frames)
                if outcome == _FULL:
                    if now - state.moved_at > PEER_STALL_S:
                        self._drop(peer, state)
                    break  # refused again: keep the rest in order behind it
                progress = True
                state.moved_at = now
                if outcome == _GONE:
                    self._forget(peer)
                    break
                backlog.popleft()
                state.backlog_bytes -= size
            else:
                del self._backlogged[peer]
                state.refusing = False  # it caught up
                if not state.in_flight.trackers:
                    self._peers.pop(peer, None)
        if self._backlogged:
            # Nothing tells the broker when a pipe has room again: look again soon, less
            # often while nobody makes progress.
            delay = BACKLOG_RETRY_S if progress else self._retry_delay * 2
            self._schedule_retry(min(delay, BACKLOG_RETRY_MAX_S))

    def _schedule_retry(self, delay: float) -> None:
        if self._retry is not None:
            if delay >= self._retry_delay:
                return  # one is due sooner already
            self._retry.cancel()
        self._retry_delay = delay
        self._retry = self._loop.call_later(delay, self._retry_due)

    def _retry_due(self) -> None:
        self._retry = None
        self._router.wakeup.set()  # drain retries the backlogs

    def _sweep(self) -> None:
        """Forget peers whose large frames libzmq has let go of (or that went away)."""
        self._next_sweep = self._loop.time() + 1.0
        for peer, state in list(self._peers.items()):
            if not state.backlog:
                state.in_flight.reap()
                if not state.in_flight.trackers:
                    del self._peers[peer]

    def publish(self, frames: Frames) -> None:
        socket = self._publisher.socket
        large = _large_bytes(frames)
        if not large:
            send_frames(socket, frames)
        elif self._room_to_publish(large):
            self._published.add(_send_tracked(socket, frames, 0), large)
        else:
            # A subscriber that does not read holds the large publications libzmq queued
            # for it. Results are stored: whoever waits for this one asks for it instead.
            self.counters["publications_dropped"] += 1
        self._publisher.sent()

    def _room_to_publish(self, size: int) -> bool:
        published, limit = self._published, self.publish_bytes
        published.reap()
        if not published.room_for(size, limit):
            published.reap(in_order=False)  # several pipes: they let go in any order
        room = published.room_for(size, limit)
        if room == self._skipping_publications:
            self._skipping_publications = not room
            if room:
                log.info("publishing large results again")
            else:
                log.warning(
                    "subscribers do not read: libzmq holds %d bytes of large publications; "
                    "not publishing more until it frees some (clients fetch those results)",
                    published.bytes,
                )
        return room

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        self._router.close()
        self._publisher.close()
        if self.security is not None:
            self.security.stop()
