"""Peers that never read what the broker sends them: a DEALER asking for a large result again
and again, a SUB subscribed to a client's results. The broker holds a bounded amount for each
(flowrra/broker/endpoint.py), keeps serving everybody else, and a client whose publications were
sent still gets its results: a waiter that hears nothing asks the broker (flowrra/client.py).

The nodes of these tests serve this module's ``app`` (a task with a large result from a small
submit, so that only the replies are large).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from types import TracebackType

import pytest
import zmq

from flowrra import Flowrra, TaskStatus
from flowrra import client as client_module
from flowrra.broker import endpoint as endpoint_module
from flowrra.broker.endpoint import (
    PEER_BACKLOG_MESSAGES,
    ROUTER_SNDHWM,
    ZmqBrokerEndpoint,
    peer_backlog_bytes,
    peer_pipe_bytes,
    publish_byte_limit,
)
from flowrra.inproc import InprocHub
from flowrra.protocol import Command, Submission, decode, encode, pack_args
from flowrra.transport import Frames, Wakeup
from tests.conftest import BrokerProcess, Launcher, embedded_twin, free_port, remote_twin

APP = "tests.failures.test_slow_readers:app"
MB = 1024 * 1024
# What the broker may grow by while a peer does not read: what it holds for that peer
# (flowrra/broker/endpoint.py: 32 MiB in its pipe, 64 MiB in its backlog), a tick's replies
# (broker/core.py: 64 MiB), and room for the allocator. Without the limits the GET flood below
# costs it about 1 GB.
GROWTH_LIMIT_MB = 250
# Beyond the broker's working size with every subscriber reading: the large publications it
# lets libzmq hold (64 MiB here), and room for the allocator.
SUBSCRIBER_GROWTH_LIMIT_MB = 150

app = Flowrra.from_urls()


@app.task(name="slow_readers.blob", max_retries=0)
async def blob(size: int, tag: int = 0) -> bytes:
    """``size`` bytes, the first 8 of them ``tag``."""
    return tag.to_bytes(8, "big") + b"x" * (size - 8)


def tag_of(result: bytes) -> int:
    return int.from_bytes(result[:8], "big")


# --------------------------------------------------------------------------- helpers


def rss_mb(pid: int) -> float:
    """The process's anonymous resident memory (its heap: what a flood could exhaust). The
    LMDB map's pages are file-backed (page cache) and not counted: they grow with the data
    stored, not with what is held for peers."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


class PeakRss:
    """The highest :func:`rss_mb` of a process, sampled every 10 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss", daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            try:
                self.peak_mb = max(self.peak_mb, rss_mb(self.pid))
            except OSError:
                return  # the process is gone: the test says so

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(5)


def never_reads(context: zmq.Context[zmq.Socket[bytes]], kind: int, url: str) -> zmq.Socket[bytes]:
    """A socket that takes one message at a time and whose kernel buffer is tiny: once it
    stops reading, what is sent to it stays with the sender."""
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)  # its own sends never block
    socket.setsockopt(zmq.RCVHWM, 1)
    socket.setsockopt(zmq.RCVBUF, 4096)
    socket.connect(url)
    return socket


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def raw_submission(task_id: str, size: int, tag: int) -> list[object]:
    return Submission(
        task_id=task_id,
        name="slow_readers.blob",
        priority=0,
        payload=pack_args([size, tag], {}),
        max_retries=0,
        retry_delay_s=0.0,
        timeout_s=None,
        submitted_at=time.time(),
    ).to_wire()


async def served(client: Flowrra, count: int, size: int = 100) -> float:
    """Run ``count`` small tasks through ``client``; the seconds that took."""
    started = time.monotonic()
    ids = await client.submit_many(blob, [(size, i) for i in range(count)])
    results = await asyncio.gather(*(client.wait_for_result(t, timeout=10) for t in ids))
    assert [tag_of(r.result) for r in results] == list(range(count))
    return time.monotonic() - started


# --------------------------------------------------------------------------- processes


async def test_a_dealer_that_never_reads_its_replies_costs_the_broker_a_bounded_amount(
    launcher: Launcher, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    broker: BrokerProcess = launcher.broker()
    launcher.node(broker, APP, concurrency=20)
    pid = broker.process.pid
    async with remote_twin(app, broker) as client:
        big = await client.submit(blob, MB, 1)
        assert len((await client.wait_for_result(big, timeout=10)).result) == MB
        await served(client, 20)  # the broker's working size, before the flood
        dealer = never_reads(context, zmq.DEALER, broker.url)
        # Another client's task, submitted by the flooder after its GETs: the broker handles
        # one peer's messages in order, so once it has run, every GET was answered.
        last = "f" * 16 + os.urandom(8).hex()
        before_mb = rss_mb(pid)
        with PeakRss(pid) as rss:
            for request_id in range(1, 1001):  # 1000 replies of 1 MB
                dealer.send_multipart(encode(Command.GET, [request_id, [big]]))
            dealer.send_multipart(encode(Command.SUBMIT, [raw_submission(last, 100, 7)]))
            # A normal client is served meanwhile, and the flooder's last message is handled.
            served_s = await served(client, 20)
            flood_end = await client.wait_for_result(last, timeout=30)
        after_mb = rss_mb(pid)
    assert flood_end.status is TaskStatus.SUCCESS and tag_of(flood_end.result) == 7
    assert served_s < 5, f"a normal client waited {served_s:.1f}s for 20 small tasks"
    assert broker.process.running
    grown_mb = rss.peak_mb - before_mb
    assert grown_mb < GROWTH_LIMIT_MB, (
        f"the broker grew by {grown_mb:.0f} MB for a peer that never reads "
        f"({before_mb:.0f} -> peak {rss.peak_mb:.0f}, now {after_mb:.0f} MB)"
    )
    # Warned about once, however often its messages were refused; its backlog is dropped
    # when it has not moved for PEER_STALL_S.
    await broker.process.await_line(r"does not read what the broker sends: dropped", timeout=10)
    log = broker.process.log()
    assert log.count("does not read fast enough: refusing") == 1, log


async def test_a_subscriber_that_never_reads_does_not_hold_up_results(
    launcher: Launcher, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    # Batches of 50 MB of results make ticks slow: heartbeats of 200 ms could have the node
    # reconnect (and report all its outcomes again), which is not the subject here.
    broker: BrokerProcess = launcher.broker(heartbeat_ms=1000)
    launcher.node(broker, APP, concurrency=50)
    pid = broker.process.pid
    tags = iter(range(1_000_000))

    size = MB // 2

    async def batches(client: Flowrra, count: int) -> None:
        for _ in range(count):  # 100 results of 512 KiB each
            batch = [(size, next(tags)) for _ in range(100)]
            ids = await client.submit_many(blob, batch)
            results = await asyncio.gather(*(client.wait_for_result(t, timeout=10) for t in ids))
            assert [tag_of(r.result) for r in results] == [tag for _, tag in batch]
            assert all(len(r.result) == size for r in results)

    async with remote_twin(app, broker) as client:
        # The broker's working size for this load, with every publication read.
        with PeakRss(pid) as warm:
            await batches(client, 2)
        assert client._client is not None
        # It subscribes to the client's own results (the prefix of the client's task ids) and
        # reads only the broker's confirmation of that subscription.
        sub = never_reads(context, zmq.SUB, broker.publish_url)
        sub.setsockopt(zmq.SUBSCRIBE, client._client.client_id.encode())
        assert sub.poll(10_000), "the subscription was never confirmed"
        sub.recv_multipart()
        with PeakRss(pid) as stalled:
            await batches(client, 5)  # without the limits, all 250 MB would stay queued
        served_s = await served(client, 20)
        log = broker.process.log()
    grown_mb = stalled.peak_mb - warm.peak_mb
    assert grown_mb < SUBSCRIBER_GROWTH_LIMIT_MB, (
        f"the broker grew by {grown_mb:.0f} MB for a subscriber that never reads "
        f"(peak {warm.peak_mb:.0f} MB with readers, {stalled.peak_mb:.0f} MB with it)"
    )
    # The limit was what kept it small: large publications were held back at some point.
    assert "not publishing more until it frees some" in log
    assert served_s < 5, f"20 small tasks took {served_s:.1f}s"


# --------------------------------------------------------------------------- client


async def test_a_waiter_whose_result_publication_was_lost_asks_the_broker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every RESULT publication is lost: waiters still get their results, by GET, and one
    GET asks for all of them."""
    publish = InprocHub.publish
    publish_body = InprocHub.publish_body
    deliver = InprocHub._deliver
    lost: list[bytes] = []
    gets: list[int] = []

    def lossy(hub: InprocHub, frames: Frames) -> None:
        if decode(frames[1:]).command is Command.RESULT:
            lost.append(frames[0])
            return
        publish(hub, frames)

    def lossy_body(hub: InprocHub, topic: bytes, command: Command, body: object) -> None:
        if command is Command.RESULT:  # results are handed over unencoded in-process
            lost.append(topic)
            return
        publish_body(hub, topic, command, body)

    def counting(hub: InprocHub, identity: bytes, frames: Frames) -> None:
        message = decode(frames)
        if message.command is Command.GET:
            assert isinstance(message.body, list)
            gets.append(len(message.body[1]))
        deliver(hub, identity, frames)

    monkeypatch.setattr(InprocHub, "publish", lossy)
    monkeypatch.setattr(InprocHub, "publish_body", lossy_body)
    monkeypatch.setattr(InprocHub, "_deliver", counting)
    async with embedded_twin(app) as embedded:
        started = time.monotonic()
        ids = await embedded.submit_many(blob, [(100, i) for i in range(50)])
        results = await asyncio.gather(*(embedded.wait_for_result(t, timeout=10) for t in ids))
        took = time.monotonic() - started
    assert [tag_of(r.result) for r in results] == list(range(50))
    assert lost, "no publication was lost: the test tests nothing"
    assert took < client_module.QUIET_REQUERY_S + 3
    assert sum(gets) >= 50 and len(gets) <= 3, f"GETs of {gets} ids: not batched"


# --------------------------------------------------------------------------- endpoint


def _endpoint(max_message_bytes: int = 16 * MB) -> tuple[ZmqBrokerEndpoint, Wakeup]:
    """An endpoint on loopback ports (call it with the event loop running)."""
    wakeup = Wakeup()
    endpoint = ZmqBrokerEndpoint(
        f"tcp://127.0.0.1:{free_port()}",
        f"tcp://127.0.0.1:{free_port()}",
        wakeup,
        max_message_bytes=max_message_bytes,
    )
    return endpoint, wakeup


async def _peer_of(endpoint: ZmqBrokerEndpoint, socket: zmq.Socket[bytes]) -> bytes:
    """The routing id the endpoint knows ``socket`` by (it says hello first)."""
    socket.send(b"hello")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        messages, _ = endpoint.drain(10)
        if messages:
            return messages[0][0]
        await asyncio.sleep(0.005)
    raise AssertionError("the endpoint never heard from the peer")


@pytest.mark.parametrize("size", [MB, 1000], ids=["large", "small"])
async def test_the_endpoint_refuses_then_drops_a_peer_that_never_reads(
    context: zmq.Context[zmq.Socket[bytes]],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    size: int,
) -> None:
    monkeypatch.setattr(endpoint_module, "PEER_STALL_S", 0.2)
    endpoint, _ = _endpoint()
    try:
        dealer = never_reads(context, zmq.DEALER, endpoint.bind_url)
        peer = await _peer_of(endpoint, dealer)
        message = [b"header", b"x" * size]
        # What its pipe takes (ROUTER_SNDHWM messages, of which peer_pipe_bytes in large
        # frames), its backlog (PEER_BACKLOG_MESSAGES, peer_backlog_bytes) and the kernel's
        # buffers: then messages to it are refused.
        if size >= MB:
            bound = (peer_pipe_bytes(16 * MB) + peer_backlog_bytes(16 * MB)) // size + 16
        else:
            bound = ROUTER_SNDHWM + PEER_BACKLOG_MESSAGES + 8 * MB // size

        def fill() -> int:
            sent = 0
            while endpoint.send(peer, message):
                sent += 1
                assert sent <= bound, f"{sent} messages held for a peer that never reads"
            return sent

        with caplog.at_level(logging.WARNING, "flowrra.broker.endpoint"):
            assert fill() > 0
            assert endpoint.counters["messages_refused"] == 1
            assert not endpoint.send(peer, message), "refused until its backlog drains"
            assert endpoint.counters["peers_dropped"] == 0
            # Its backlog does not move: after PEER_STALL_S it is discarded, and the next
            # message refused (that tells the broker); then a new backlog begins.
            started = time.monotonic()
            while endpoint.counters["peers_dropped"] == 0:
                assert time.monotonic() - started < 5, "the backlog was never dropped"
                endpoint.drain(10)
                await asyncio.sleep(0.02)
            assert endpoint.counters["messages_dropped"] > 0
            assert not endpoint.send(peer, message)
            assert endpoint.send(peer, message)
            # A peer that still does not read is refused again, without another warning.
            fill()
        assert endpoint.counters["messages_refused"] >= 3
        warnings = [r.getMessage() for r in caplog.records]
        assert len([w for w in warnings if "refusing" in w]) == 1, warnings
        assert len([w for w in warnings if "dropped" in w]) == 1, warnings
    finally:
        endpoint.close()


async def test_the_endpoint_delivers_a_burst_in_order_to_a_peer_that_reads_slowly(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """A burst larger than the pipe waits in the backlog and is retried on the endpoint's own
    timer (nothing else wakes the broker here), in order and without a drop."""
    endpoint, wakeup = _endpoint()
    dealer = never_reads(context, zmq.DEALER, endpoint.bind_url)
    running = True

    async def broker_loop() -> None:  # what BrokerService.run does with the endpoint
        while running:
            endpoint.drain(100)
            await wakeup.wait(1.0)

    peer = await _peer_of(endpoint, dealer)
    loop_task = asyncio.create_task(broker_loop())
    try:
        count = 48  # 48 x 1 MB: more than the pipe's share, within pipe + backlog
        for i in range(count):
            assert endpoint.send(peer, [i.to_bytes(4, "big"), b"x" * MB])
        assert endpoint._backlogged, "the burst should not have fitted in the pipe"

        def read_all() -> list[int]:
            got = []
            for _ in range(count):
                assert dealer.poll(10_000), f"only {len(got)} of {count} arrived"
                frames = dealer.recv_multipart()
                got.append(int.from_bytes(frames[0], "big"))
                time.sleep(0.002)  # a slow reader
            return got

        assert await asyncio.to_thread(read_all) == list(range(count))
        assert endpoint.counters["peers_dropped"] == 0
        assert not endpoint._backlogged
    finally:
        running = False
        wakeup.set()
        await loop_task
        endpoint.close()


async def test_the_publisher_holds_back_large_publications_a_subscriber_does_not_read(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    endpoint, _ = _endpoint()
    try:
        sub = never_reads(context, zmq.SUB, endpoint.publish_endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        deadline = time.monotonic() + 5
        while b"" not in endpoint.drain(10)[1]:
            assert time.monotonic() < deadline, "the subscription never arrived"
            await asyncio.sleep(0.005)
        limit = publish_byte_limit(16 * MB)
        published = 0
        while endpoint.counters["publications_dropped"] == 0:
            endpoint.publish([b"topic", b"x" * MB])
            published += 1
            assert published <= limit // MB + 16, f"{published} MB of publications held"
        # Held back, not lost for good: small publications still go, and large ones again
        # once the subscriber is gone and libzmq lets go of what it held.
        endpoint.publish([b"topic", b"small"])
        sub.close(linger=0)
        deadline = time.monotonic() + 5
        while True:
            endpoint.drain(10)  # lets libzmq see the subscriber leave
            before = endpoint.counters["publications_dropped"]
            endpoint.publish([b"topic", b"x" * MB])
            if endpoint.counters["publications_dropped"] == before:
                break
            assert time.monotonic() < deadline, "large publications stayed held back"
            await asyncio.sleep(0.01)
    finally:
        endpoint.close()
