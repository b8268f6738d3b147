"""The in-process hub: the embedded default's stand-in for the broker's sockets.

Client, broker and node of one process run their normal code over it. The hot messages
(SUBMIT, ACK, TASKS, RESULTS and RESULT publications) are handed over unencoded, as the
(command, body) pair that ``protocol.encode`` would have encoded, and handled on the sender's
stack: a submit runs the broker's accept, tick and commit before it returns, a dispatch
starts the node's execution, and a result reaches the waiting client in the same call. The
other messages travel as the same encoded frames the ZeroMQ transport carries, as Python
objects: no sockets, no copies, no syscalls.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

from flowrra.protocol import Command, encode, encode_publication
from flowrra.transport import BodyHandler, Frames, Link, PublicationHandler, Subscriber, Wakeup

# The broker's handler of an unencoded message: False when it cannot handle it now (it is
# busy on this very stack, or stopping), and the hub queues the encoded message instead.
BodyProcessor = Callable[[bytes, Command, Any], bool]


class InprocHub:
    """An in-process stand-in for the broker's sockets, used by the embedded default."""

    peers_can_vanish = False
    publish_endpoint = "inproc://flowrra-results"

    def __init__(self, broker_wakeup: Wakeup) -> None:
        self._wakeup = broker_wakeup
        # Set by a broker that handles messages on the sender's own call stack: no loop
        # round trip between a client, the broker and a node of one process.
        self.process_now: Callable[[], None] | None = None
        self.process_body: BodyProcessor | None = None
        self._inbox: deque[tuple[bytes, Frames]] = deque()
        self._new_topics: list[bytes] = []
        self._links: dict[bytes, _InprocLink] = {}
        self._all_take_bodies: bool | None = None  # every_peer_takes_bodies, while known
        self._subscribers: list[_InprocSubscriber] = []

    # broker side ---------------------------------------------------------------------

    def drain(self, limit: int) -> tuple[list[tuple[bytes, Frames]], list[bytes]]:
        inbox = self._inbox
        if not inbox and not self._new_topics:
            return [], []  # the usual case when the broker looks again after a pass
        if len(inbox) <= limit:
            messages = list(inbox)
            inbox.clear()
        else:
            messages = [inbox.popleft() for _ in range(limit)]
            self._wakeup.set()
        topics, self._new_topics = self._new_topics, []
        return messages, topics

    def has_input(self) -> bool:
        """Something waits to be drained (every arrival also sets the broker's wakeup, or
        runs :attr:`process_now`)."""
        return bool(self._inbox or self._new_topics)

    def send(self, peer: bytes, frames: Frames) -> bool:
        link = self._links.get(peer)
        if link is None:
            return False
        if link.push is not None:
            link.push(frames)
        else:
            link.inbox.append(frames)
            link.wakeup.set()
        return True

    def takes_bodies(self, peer: bytes) -> bool:
        """Whether :meth:`send_body` reaches ``peer`` unencoded."""
        link = self._links.get(peer)
        return link is not None and link.bodies is not None

    @property
    def every_peer_takes_bodies(self) -> bool:
        # Asked several times per broker tick; known until a link opens, closes or changes
        # its handler (each of which forgets it).
        known = self._all_take_bodies
        if known is None:
            known = self._all_take_bodies = all(
                link.bodies is not None for link in self._links.values()
            )
        return known

    def _links_changed(self) -> None:
        self._all_take_bodies = None

    def send_body(self, peer: bytes, command: Command, body: object) -> bool:
        """Hand ``peer`` a message unencoded (encoded if it takes frames only); False when
        that peer is gone."""
        link = self._links.get(peer)
        if link is None:
            return False
        if link.bodies is not None:
            link.bodies(command, body)
            return True
        return self.send(peer, encode(command, body))

    def publish(self, frames: Frames) -> None:
        topic = frames[0]
        for subscriber in self._subscribers:
            if subscriber.matches(topic):
                if subscriber.push is not None:
                    subscriber.push(frames)
                else:
                    subscriber.inbox.append(frames)
                    subscriber.wakeup.set()

    def publish_body(self, topic: bytes, command: Command, body: object) -> None:
        """Publish unencoded to the subscribers that take bodies, encoded to the others."""
        frames: Frames | None = None
        for subscriber in self._subscribers:
            if subscriber.matches(topic):
                if subscriber.bodies is not None:
                    subscriber.bodies(topic, command, body)
                    continue
                if frames is None:
                    frames = encode_publication(topic, command, body)
                if subscriber.push is not None:
                    subscriber.push(frames)
                else:
                    subscriber.inbox.append(frames)
                    subscriber.wakeup.set()

    def close(self) -> None:
        self._inbox.clear()

    # peer side -----------------------------------------------------------------------

    def link(self, wakeup: Wakeup) -> Link:
        identity = os.urandom(5)
        link = _InprocLink(self, identity, wakeup, lambda: self._unlink(identity))
        self._links[identity] = link
        self._links_changed()
        return link

    def _unlink(self, identity: bytes) -> None:
        self._links.pop(identity)
        self._links_changed()

    def subscriber(self, publish_endpoint: str, wakeup: Wakeup) -> Subscriber:
        subscriber = _InprocSubscriber(wakeup, self._subscribed, self._subscribers.remove)
        self._subscribers.append(subscriber)
        return subscriber

    def _deliver(self, identity: bytes, frames: Frames) -> None:
        self._inbox.append((identity, frames))
        self._arrived()

    def _subscribed(self, topic: bytes) -> None:
        self._new_topics.append(topic)
        self._arrived()

    def _arrived(self) -> None:
        if self.process_now is not None:
            self.process_now()
        else:
            self._wakeup.set()


class _InprocLink:
    def __init__(
        self,
        hub: InprocHub,
        identity: bytes,
        wakeup: Wakeup,
        on_close: Callable[[], object],
    ) -> None:
        self.identity = identity
        self.wakeup = wakeup
        self.inbox: deque[Frames] = deque()
        self.push: Callable[[Frames], None] | None = None
        self.bodies: BodyHandler | None = None
        self._hub = hub
        self._on_close = on_close
        self._closed = False

    def send(self, frames: Frames) -> None:
        if not self._closed:
            self._hub._deliver(self.identity, frames)

    def send_body(self, command: Command, body: object) -> bool:
        if not self._closed:
            hub = self._hub
            process = hub.process_body
            if process is None or not process(self.identity, command, body):
                hub._deliver(self.identity, encode(command, body))
        return True

    def drain(self, limit: int) -> list[Frames]:
        return _drain_deque(self.inbox, limit, self.wakeup)

    def push_to(self, handler: Callable[[Frames], None]) -> bool:
        self.push = handler
        return True

    def push_bodies_to(self, handler: BodyHandler) -> bool:
        self.bodies = handler
        self._hub._links_changed()
        return True

    def close(self, linger_ms: int = 0) -> None:
        if not self._closed:
            self._closed = True
            self.push = self.bodies = None
            self._on_close()  # (the hub forgets the link, and what it knew of all links)


class _InprocSubscriber:
    def __init__(
        self,
        wakeup: Wakeup,
        on_subscribe: Callable[[bytes], None],
        on_close: Callable[[_InprocSubscriber], None],
    ) -> None:
        self.wakeup = wakeup
        self.inbox: deque[Frames] = deque()
        self.push: Callable[[Frames], None] | None = None
        self.bodies: PublicationHandler | None = None
        self._topics: dict[bytes, int] = {}
        self._on_subscribe = on_subscribe
        self._on_close = on_close
        self._closed = False

    def matches(self, topic: bytes) -> bool:
        topics = self._topics
        # Results go to a client's own prefix, or to a task id someone subscribed to.
        return topic in topics or any(topic.startswith(prefix) for prefix in topics)

    def subscribe(self, topic: bytes) -> None:
        count = self._topics.get(topic, 0)
        self._topics[topic] = count + 1
        if count == 0:  # like a SUB socket: only the first subscription travels upstream
            self._on_subscribe(topic)

    def unsubscribe(self, topic: bytes) -> None:
        count = self._topics.get(topic, 0)
        if count <= 1:
            self._topics.pop(topic, None)
        else:
            self._topics[topic] = count - 1

    def drain(self, limit: int) -> list[Frames]:
        return _drain_deque(self.inbox, limit, self.wakeup)

    def push_to(self, handler: Callable[[Frames], None]) -> bool:
        self.push = handler
        return True

    def push_bodies_to(self, handler: PublicationHandler) -> bool:
        self.bodies = handler
        return True

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.push = self.bodies = None
            self._on_close(self)


def _drain_deque(inbox: deque[Frames], limit: int, wakeup: Wakeup) -> list[Frames]:
    if len(inbox) <= limit:
        out = list(inbox)
        inbox.clear()
        return out
    wakeup.set()
    return [inbox.popleft() for _ in range(limit)]
