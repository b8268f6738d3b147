"""Moving frames between a peer (client or node) and the broker over ZeroMQ.

The broker, node and client are written against small interfaces, so the embedded default
runs exactly the same broker and node code as the distributed mode:

* :class:`Link` — a peer's connection to the broker (a DEALER socket, or an in-process twin);
* :class:`Subscriber` — a client's result subscription (a SUB socket, or its twin);
* :class:`Connector` — makes both for one broker (:class:`ZmqConnector`, or the in-process
  hub of :mod:`flowrra.inproc`).

The broker's side (ROUTER + XPUB, per-peer backlogs) is :mod:`flowrra.broker.endpoint`.
Every side drains whatever is ready in one go (``drain``) and sleeps on a :class:`Wakeup`
when there is nothing left, so work is batched per event-loop tick.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import zmq

from flowrra.protocol import Command
from flowrra.security import ClientKeys

Frames = list[bytes]
T = TypeVar("T")
# Receivers of messages handed over in-process without encoding: (command, body) on a link,
# (topic, command, body) on a subscriber. The bodies are what protocol.encode would encode.
BodyHandler = Callable[[Command, Any], None]
PublicationHandler = Callable[[bytes, Command, Any], None]


# ZeroMQ send/recv flags as plain ints: pyzmq's enum arithmetic showed up in profiles.
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)
# pyzmq's Cython socket methods, called directly: the Python "sugar" layer around them
# (send_multipart, recv_multipart) cost about half of a small message's send+recv here.
raw_send = zmq.backend.Socket.send
_raw_recv = zmq.backend.Socket.recv
_raw_getsockopt = zmq.backend.Socket.get


def send_frames(socket: zmq.Socket[bytes], frames: Frames, flags: int = 0) -> None:
    """``socket.send_multipart(frames, flags)`` without the per-frame Python overhead."""
    last = len(frames) - 1
    more = flags | SNDMORE
    for i, frame in enumerate(frames):
        raw_send(socket, frame, more if i < last else flags)


def recv_frames(socket: zmq.Socket[bytes], flags: int = 0) -> Frames:
    """``socket.recv_multipart(flags)`` without the per-frame Python overhead.

    Each part is received as a ``zmq.Frame`` whose ``more`` says whether another follows:
    asking ``RCVMORE`` instead goes through pyzmq's option lookup (an enum call) per part,
    2.3 against 3.4 us for a 4-part message here."""
    frame = _raw_recv(socket, flags, False)
    frames: Frames = [frame.bytes]
    while frame.more:
        frame = _raw_recv(socket, flags, False)
        frames.append(frame.bytes)
    return frames


def readable(socket: zmq.Socket[bytes]) -> bool:
    """A message is waiting: one ``EVENTS`` check (a poll of the socket's mailbox, about
    1 us), where a receive that fails with zmq.Again costs 3.3-3.7 us (the exception)."""
    return bool(_raw_getsockopt(socket, _EVENTS) & _POLLIN)  # type: ignore[operator]


class Wakeup:
    """A level-triggered flag that one coroutine can sleep on, with a timeout.

    :meth:`wait` may return before its timeout without :meth:`set` (its callers loop and
    look again): the timer of an earlier wait is kept while it is due no later than the new
    one, instead of a timer made and cancelled per wait (2.3 us of each wait under asyncio's
    own loop, 0.7 us under uvloop). A timeout is rounded up to whole milliseconds, the
    resolution of both loops' timers (see :meth:`wait`), so it may also return up to 1 ms
    after it.
    """

    __slots__ = ("_flag", "_timer", "_timer_due", "_timer_loop", "_waiter")

    def __init__(self) -> None:
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def set(self) -> None:
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_s: float | None) -> None:
        """Return when :meth:`set` was called (now or earlier), when the timeout passed, or
        (rarely) sooner: a timer left by an earlier, shorter wait."""
        if self._flag:
            self._flag = False
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._waiter = waiter
        if timeout_s is not None:
            # Whole milliseconds, rounded up: uvloop rounds a timer's delay to the nearest
            # one, so a 0.4 ms timer fires at once, and a caller waiting for a deadline less
            # than 0.5 ms away spun until it passed (20 broker ticks per full-durability W2
            # round, in its linger). asyncio's epoll rounds a timeout up to them anyway.
            delay_s = math.ceil(max(timeout_s, 0.0) * 1000.0) / 1000.0
            due = loop.time() + delay_s
            timer = self._timer
            if timer is None or due < self._timer_due or self._timer_loop is not loop:
                if timer is not None:
                    timer.cancel()
                # call_later, not call_at: uvloop would take the delay back from `due` by a
                # subtraction, which can land below the half millisecond.
                self._timer = loop.call_later(delay_s, self._expired)
                self._timer_due, self._timer_loop = due, loop
        try:
            await waiter
        finally:
            self._waiter = None
            self._flag = False

    def _expired(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Link(Protocol):
    """A peer's (client's or node's) connection to the broker."""

    def send(self, frames: Frames) -> None: ...
    def drain(self, limit: int) -> list[Frames]: ...
    def close(self, linger_ms: int = 0) -> None:
        """Close; with ``linger_ms``, pending messages get that long to leave."""
        ...

    def push_to(self, handler: Callable[[Frames], None]) -> bool:
        """Hand arriving messages to ``handler`` at once instead of queueing them for
        :meth:`drain` (in-process only: True if this link can)."""
        ...

    def send_body(self, command: Command, body: object) -> bool:
        """Hand one message over without encoding it (in-process only): True if taken;
        False if this link carries frames only (then encode it and :meth:`send`)."""
        ...

    def push_bodies_to(self, handler: BodyHandler) -> bool:
        """Hand arriving messages that were never encoded to ``handler`` as (command, body)
        (in-process only: True if this link can; others still arrive as frames)."""
        ...


class Subscriber(Protocol):
    """A client's subscription to the broker's result publications."""

    def subscribe(self, topic: bytes) -> None: ...
    def unsubscribe(self, topic: bytes) -> None: ...
    def drain(self, limit: int) -> list[Frames]: ...
    def close(self) -> None: ...

    def push_to(self, handler: Callable[[Frames], None]) -> bool:
        """Like :meth:`Link.push_to`, for publications."""
        ...

    def push_bodies_to(self, handler: PublicationHandler) -> bool:
        """Like :meth:`Link.push_bodies_to`, for publications: (topic, command, body)."""
        ...


class Connector(Protocol):
    """Makes links and subscribers to one broker; the client and node take one of these."""

    def link(self, wakeup: Wakeup) -> Link: ...
    def subscriber(self, publish_endpoint: str, wakeup: Wakeup) -> Subscriber: ...


# --------------------------------------------------------------------------- ZeroMQ


class WatchedSocket:
    """Wakes a :class:`Wakeup` when a zmq socket becomes readable.

    The zmq FD is edge-triggered, and any call that lets libzmq process its commands (a
    send, an ``EVENTS`` check, a failed receive) can consume the edge. Once ``EVENTS`` has
    said "nothing waits", the FD signals the next arrival; so every drain ends on such a
    check, and whoever sends checks again (:meth:`check`, or :meth:`has_input` once after a
    batch of sends) before sleeping.
    """

    def __init__(self, socket: zmq.Socket[bytes], wakeup: Wakeup) -> None:
        self.socket = socket
        self.wakeup = wakeup
        self._loop = asyncio.get_running_loop()
        self._fd: int = socket.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._loop.add_reader(self._fd, self.check)
        self._closed = False
        # The last EVENTS check said a message waits, and nothing was received since: the
        # next drain need not ask again.
        self._ready = False
        # The last EVENTS check said nothing waits, and no call on the socket came since:
        # until the FD's callback says otherwise nothing has arrived, so a drain need not
        # ask. (The FD stays readable until a call on the socket processes libzmq's
        # commands, so an arrival the drain skips still wakes the callback.)
        self._empty = False
        self._unchecked = False  # a send came after the last check (see sent)

    def check(self) -> None:
        """Wake the loop if a message waits (the FD's callback; also after a send)."""
        if self._closed:
            return
        self._unchecked = False
        if readable(self.socket):
            self._ready = True
            self._empty = False
            self.wakeup.set()
        else:
            self._empty = not self._ready

    def sent(self) -> None:
        """A send happened and was not followed by :meth:`check`: the next
        :meth:`has_input` asks ZeroMQ (one check after a batch of sends, not one per send)."""
        self._unchecked = True

    def has_input(self) -> bool:
        """A message waits: known from the last check and the FD's callbacks, asked again
        only if a send came since (:meth:`sent`). Call it after a batch of sends, before
        the loop sleeps."""
        if self._unchecked:
            self._unchecked = False
            if not self._ready and not self._closed:
                self._ready = readable(self.socket)
                self._empty = not self._ready
        return self._ready

    def drain(self, limit: int) -> list[Frames]:
        """Up to ``limit`` messages, stopping when ``EVENTS`` says none is left, so an empty
        socket costs one check and no failed receive. Wakes the loop again if it stopped at
        the limit."""
        return self.drain_with(limit, recv_frames)

    def drain_with(self, limit: int, receive: Callable[[zmq.Socket[bytes], int], T]) -> list[T]:
        """Like :meth:`drain`, each message read by ``receive(socket, NOBLOCK)``."""
        out: list[T] = []
        if self._empty and not self._unchecked:
            return out  # known empty: no EVENTS check (a poll of libzmq's mailbox) needed
        socket = self.socket
        ready, self._ready, self._unchecked = self._ready, False, False
        try:
            while len(out) < limit and (ready or readable(socket)):
                ready = False
                out.append(receive(socket, NOBLOCK))
            self._empty = len(out) < limit  # the loop ended on EVENTS saying none is left
        except zmq.Again:
            self._empty = False  # EVENTS said a message waits, so this is not expected
        if len(out) >= limit:
            self.wakeup.set()
        return out

    def close(self, linger_ms: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self.socket.close(linger=linger_ms)


def _connected_socket(
    context: zmq.Context[zmq.Socket[bytes]],
    kind: int,
    url: str,
    keys: ClientKeys | None,
) -> zmq.Socket[bytes]:
    """A client-side socket connected to ``url``: unbounded pipes, quick reconnects."""
    socket = context.socket(kind)
    if keys is not None:
        keys.apply(socket)
    socket.setsockopt(zmq.LINGER, 0)
    # Messages wait in the socket while the broker is away (the client re-sends anything
    # unanswered anyway), and results are never dropped on the way in.
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    socket.setsockopt(zmq.RECONNECT_IVL, 100)
    socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    socket.connect(url)
    return socket


class _ClientSocket(WatchedSocket):
    """A socket of type ``KIND`` connected to the broker (with CURVE ``keys`` if given)."""

    KIND: int

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        url: str,
        wakeup: Wakeup,
        keys: ClientKeys | None = None,
    ) -> None:
        super().__init__(_connected_socket(context, self.KIND, url, keys), wakeup)

    def push_to(self, handler: Callable[[Frames], None]) -> bool:
        return False  # messages arrive on a socket: read them with drain()

    def push_bodies_to(self, handler: Any) -> bool:
        return False  # everything on a socket is encoded

    def send_body(self, command: Command, body: object) -> bool:
        return False


class ZmqLink(_ClientSocket):
    """A DEALER connected to the broker."""

    KIND = zmq.DEALER

    def send(self, frames: Frames) -> None:
        send_frames(self.socket, frames)
        self.check()


class ZmqSubscriber(_ClientSocket):
    """A SUB connected to the broker's publish endpoint."""

    KIND = zmq.SUB

    def subscribe(self, topic: bytes) -> None:
        self.socket.setsockopt(zmq.SUBSCRIBE, topic)
        self.check()

    def unsubscribe(self, topic: bytes) -> None:
        self.socket.setsockopt(zmq.UNSUBSCRIBE, topic)
        self.check()


class ZmqConnector:
    """Connects links and subscribers over ZeroMQ to ``broker_url``."""

    def __init__(
        self,
        broker_url: str,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        keys: ClientKeys | None = None,
    ):
        self.broker_url = broker_url
        self.context: zmq.Context[zmq.Socket[bytes]] = context or zmq.Context.instance()
        self.keys = keys

    def link(self, wakeup: Wakeup) -> Link:
        return ZmqLink(self.context, self.broker_url, wakeup, self.keys)

    def subscriber(self, publish_endpoint: str, wakeup: Wakeup) -> Subscriber:
        return ZmqSubscriber(self.context, publish_endpoint, wakeup, self.keys)
