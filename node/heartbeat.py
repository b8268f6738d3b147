"""A node's heartbeat thread: keeps the node alive in the broker's eyes while its event loop
is busy (a task that blocks the loop must not get every other task re-dispatched, the way
Dramatiq #692 describes).

The thread owns its own DEALER socket (sockets are not thread-safe; contexts are) and sends a
HEARTBEAT naming the node every interval; the broker answers each one, which tells the node
the broker is alive even when the main loop could not read its own socket.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import zmq

from flowrra import protocol
from flowrra.protocol import Command
from flowrra.security import ClientKeys

log = logging.getLogger("flowrra.node")


class HeartbeatThread(threading.Thread):
    """Beats every ``interval_s`` until :meth:`stop`; ``last_heard`` is a monotonic time."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        broker_url: str,
        node_id: str,
        interval_s: float,
        keys: ClientKeys | None = None,
    ) -> None:
        super().__init__(name="flowrra-heartbeat", daemon=True)
        self._context = context
        self._broker_url = broker_url
        self._message = protocol.encode(Command.HEARTBEAT, {"node_id": node_id})
        self.interval_s = interval_s
        self.last_heard = time.monotonic()
        self._stopped = threading.Event()
        self._keys = keys

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        socket = self._context.socket(zmq.DEALER)
        if self._keys is not None:
            self._keys.apply(socket)
        socket.setsockopt(zmq.LINGER, 0)
        # Never queue beats for a broker that is not there: stale beats would flood it later.
        socket.setsockopt(zmq.IMMEDIATE, 1)
        socket.setsockopt(zmq.SNDHWM, 2)
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        socket.connect(self._broker_url)
        poller = zmq.Poller()
        poller.register(socket, zmq.POLLIN)
        try:
            last_beat = 0.0
            while not self._stopped.is_set():
                now = time.monotonic()
                # Read the interval every pass: WELCOME may change it at any time.
                if now - last_beat >= self.interval_s:
                    # Not connected: drop the beat, the main loop handles reconnection.
                    with contextlib.suppress(zmq.Again):
                        socket.send_multipart(self._message, zmq.NOBLOCK)
                    last_beat = now
                remaining_ms = (last_beat + self.interval_s - time.monotonic()) * 1000
                if poller.poll(max(1, min(int(remaining_ms), 50))):
                    while True:
                        try:
                            socket.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self.last_heard = time.monotonic()
        except zmq.ContextTerminated:
            pass
        finally:
            socket.close(linger=0)
