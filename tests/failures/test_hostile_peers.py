"""Hostile and broken peers on the broker's ROUTER socket: fuzzed frames while real tasks flow,
oversized messages, and peers speaking another protocol version."""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from flowrra import TaskStatus
from flowrra.errors import MessageTooLargeError
from flowrra.protocol import (
    HEADER,
    MAGIC,
    VERSION,
    Command,
    Submission,
    decode,
    encode,
    pack_args,
    parse_error,
)
from tests.apps import failures
from tests.conftest import BrokerProcess, Launcher, remote_twin, wait_until
from tests.flowrra.strategies import msgpack_values, mutated

APP = "tests.apps.failures:app"
Frames = list[bytes]


# --------------------------------------------------------------------------- raw peers


def raw_dealer(context: zmq.Context[zmq.Socket[bytes]], url: str) -> zmq.Socket[bytes]:
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 0)  # never make the broker hold replies for us
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.connect(url)
    return socket


def wrong_version_header(frames: Frames) -> bool:
    """The first frame has Flowrra's magic and another version byte."""
    header = frames[0] if frames else b""
    return header != HEADER and len(header) == len(HEADER) and header[:4] == MAGIC


def is_version_mismatch(frames: Frames) -> bool:
    """What the broker answers with an ERROR of code "version" today: v1's frame count."""
    return len(frames) in (2, 3) and wrong_version_header(frames)


def version_error(frames: Frames) -> str | None:
    """The message of a version ERROR reply, else None."""
    try:
        reply = decode(frames)
    except Exception:
        return None
    if reply.command is not Command.ERROR:
        return None
    code, message = parse_error(reply.body)
    return message if code == "version" else None


@dataclass
class Peer:
    """One raw DEALER that counts what it sent and the version errors it got back."""

    context: zmq.Context[zmq.Socket[bytes]]
    url: str
    reconnect_every: int | None = None  # a new socket (new routing id) every N messages
    sent: int = 0
    expected_version_errors: int = 0  # with 2 or 3 frames: must be answered
    other_version_messages: int = 0  # any frame count: may be answered
    version_errors: int = 0
    socket: zmq.Socket[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.socket = raw_dealer(self.context, self.url)

    def send(self, frames: Frames) -> None:
        if b"purge" in b"".join(frames):
            return  # a valid purge would legitimately drop the test's real tasks
        self.socket.send_multipart(frames)
        self.sent += 1
        if is_version_mismatch(frames):
            self.expected_version_errors += 1
        if wrong_version_header(frames):
            self.other_version_messages += 1
        if self.sent % 64 == 0:
            self.drain()
        if self.reconnect_every and self.sent % self.reconnect_every == 0:
            self.socket.close(linger=0)
            self.socket = raw_dealer(self.context, self.url)
            # Replies to the old socket are lost with it.
            self.expected_version_errors = self.other_version_messages = self.version_errors = 0

    def drain(self) -> list[Frames]:
        replies = []
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return replies
            replies.append(frames)
            if version_error(frames) is not None:
                self.version_errors += 1

    def caught_up(self) -> bool:
        self.drain()
        return self.version_errors >= self.expected_version_errors

    def sync(self, broker: BrokerProcess, timeout: float = 20.0) -> None:
        """HELLO and wait for the WELCOME: the broker has handled all we sent before."""
        self.socket.send_multipart(encode(Command.HELLO, {"role": "client", "id": "fuzz"}))
        deadline = time.monotonic() + timeout
        while True:
            assert broker.process.running, "the broker died"
            assert time.monotonic() < deadline, "no WELCOME from the broker"
            if not self.socket.poll(20):
                continue
            for frames in self.drain():
                try:
                    if decode(frames).command is Command.WELCOME:
                        return
                except Exception:
                    pass

    def close(self) -> None:
        self.socket.close(linger=0)


# --------------------------------------------------------------------------- message shapes


def _submission(task_id: str = "fuzz-task-1", name: str = "fuzz.unknown") -> list[Any]:
    return Submission(
        task_id=task_id,
        name=name,
        priority=0,
        payload=pack_args([1, "two"], {"three": 3.0}),
        max_retries=1,
        retry_delay_s=0.5,
        timeout_s=None,
        submitted_at=1_700_000_000.0,
    ).to_wire()


_READY = {
    "node_id": "fuzz-node",
    "hostname": "fuzz",
    "pid": 1,
    "async_slots": 2,
    "cpu_slots": 0,
    "tasks": {"fuzz.task": "async"},
    "running": [["fuzz-task-1", 1]],
}
# Valid bodies of every command a broker accepts; fuzzing garbles one field at a time.
SAMPLES: list[tuple[Command, Any]] = [
    (Command.HELLO, {"role": "client", "id": "fuzz"}),
    (Command.SUBMIT, [_submission()]),
    (Command.GET, [7, ["fuzz-task-1", "fuzz-task-2"]]),
    (Command.ADMIN, [8, "status", {}]),
    (Command.ADMIN, [9, "inspect", {"task_id": "fuzz-task-1"}]),
    (Command.ADMIN, [10, "dead_list", {"limit": 3}]),
    (Command.ADMIN, [11, "dead_retry", {"task_id": "fuzz-task-1"}]),
    (Command.ADMIN, [12, "tasks", {}]),
    (Command.READY, _READY),
    (Command.RESULTS, [["fuzz-task-1", 1, msgpack.packb(None), None, 1.0, 2.0]]),
    (Command.RESULTS, [["fuzz-task-1", 1, None, ["E", "boom", None], 1.0, 2.0]]),
    (Command.HEARTBEAT, {"node_id": "fuzz-node"}),
]
VALID_BODIES = [msgpack.packb(body, use_bin_type=True) for _, body in SAMPLES]
# msgpack headers announcing gigantic strings, binaries, arrays and maps, plus deep nesting.
HUGE = [
    b"\xdb\xff\xff\xff\xff",  # str32
    b"\xc6\xff\xff\xff\xff",  # bin32
    b"\xdd\xff\xff\xff\xff",  # array32
    b"\xdf\xff\xff\xff\xff",  # map32
    b"\xdc\xff\xff",  # array16
    b"\xc9\xff\xff\xff\xff\x01",  # ext32
    b"\x91" * 20_000,  # nesting far beyond any stack
]
BODYLESS = (Command.HEARTBEAT, Command.BYE, Command.PAUSE, Command.HELLO)


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _wrong_version(version: int) -> bytes:
    return MAGIC + bytes([version])


_other_versions = st.integers(0, 255).filter(lambda v: v != VERSION)
headers = st.one_of(
    st.just(HEADER),
    st.just(HEADER),
    st.just(HEADER),
    _other_versions.map(_wrong_version),
    st.sampled_from([b"", MAGIC, HEADER + b"\x00", b"FLWX\x01", b"flwr\x01"]),
    st.binary(max_size=8),
)
command_frames = st.one_of(
    st.sampled_from([bytes([c]) for c in Command]),
    st.integers(0, 255).map(lambda b: bytes([b])),
    st.binary(max_size=3),
)
body_frames = st.one_of(
    st.builds(_pack, msgpack_values),
    st.binary(max_size=64),
    st.tuples(st.sampled_from(VALID_BODIES), st.integers(0, 200)).map(lambda t: t[0][: t[1]]),
    st.tuples(st.sampled_from(HUGE), st.binary(max_size=16)).map(lambda t: t[0] + t[1]),
)
# A message of any shape: missing frames, extra frames, garbage everywhere.
loose_messages = st.tuples(
    headers, command_frames, st.none() | body_frames, st.lists(st.binary(max_size=16), max_size=2)
).map(lambda t: [t[0], t[1], *([] if t[2] is None else [t[2]]), *t[3]])
# A well-formed envelope around a valid body with one field replaced by garbage.
garbled_messages = st.sampled_from(SAMPLES).flatmap(
    lambda sample: st.tuples(headers, mutated([sample[1]]).map(_pack)).map(
        lambda t: [t[0], bytes([sample[0]]), t[1]]
    )
)
messages = st.one_of(garbled_messages, garbled_messages, loose_messages)


class Bulk:
    """Seeded random garbage in bulk (hypothesis covers the structure, this the volume)."""

    JUNK: tuple[Any, ...] = (
        None,
        True,
        -1,
        0,
        2**64 - 1,
        -(2**63),
        1.5,
        float("nan"),
        float("inf"),
        "",
        "x" * 300,
        "\u2603",
        b"\xc1",
        [],
        {},
        {"a": 1},
        [[[]]],
        msgpack.ExtType(42, b"?"),
    )

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def junk(self) -> Any:
        rng = self.rng
        if rng.random() < 0.7:
            return rng.choice(self.JUNK)
        return rng.randbytes(rng.randint(0, 24))

    def garble(self, value: Any) -> Any:
        """``value`` with one field (at any depth) swapped for junk."""
        rng = self.rng
        if isinstance(value, list) and value and rng.random() < 0.8:
            index = rng.randrange(len(value))
            return [*value[:index], self.garble(value[index]), *value[index + 1 :]]
        if isinstance(value, dict) and value and rng.random() < 0.8:
            key = rng.choice(sorted(value))
            if rng.random() < 0.2:
                return {k: v for k, v in value.items() if k != key}  # a missing field
            return {**value, key: self.garble(value[key])}
        return self.junk()

    def message(self) -> Frames:
        rng = self.rng
        command, body = rng.choice(SAMPLES)
        kind = rng.randrange(10)
        if kind == 0:  # wrong protocol version: must get an ERROR back
            version = rng.choice([v for v in range(256) if v != VERSION])
            frames = [_wrong_version(version), bytes([command])]
            return frames if rng.random() < 0.3 else [*frames, _pack(self.garble(body))]
        if kind == 1:  # wrong magic or a broken header
            return [rng.randbytes(rng.randint(0, 7)), bytes([command]), _pack(body)]
        if kind == 2:  # unknown or broker-to-peer commands
            unknown = rng.choice([0x00, 0x05, 0x15, 0x20, 0x23, 0x26, 0x30, 0x7F, 0xFF])
            return [HEADER, bytes([unknown]), _pack(self.garble(body))]
        if kind == 3:  # truncated body
            data = _pack(body)
            return [HEADER, bytes([command]), data[: rng.randrange(len(data))]]
        if kind == 4:  # huge declared counts
            return [HEADER, bytes([command]), rng.choice(HUGE) + rng.randbytes(8)]
        if kind == 5:  # wrong number of frames
            count = rng.choice([0, 1, 4, 5])
            return [rng.randbytes(rng.randint(0, 12)) for _ in range(count)] or [b""]
        if kind == 6:  # raw bytes as a body
            return [HEADER, bytes([command]), rng.randbytes(rng.randint(0, 40))]
        if kind == 7 and command in BODYLESS:  # a bodyless command from a stranger
            return [HEADER, bytes([command])]
        # valid-looking envelope, valid-looking body, garbage fields
        return [HEADER, bytes([command]), _pack(self.garble(body))]


@dataclass
class Fuzz:
    """Runs the senders in threads; the counts are read by the test."""

    broker: BrokerProcess
    context: zmq.Context[zmq.Socket[bytes]] = field(default_factory=zmq.Context)
    peers: list[Peer] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def peer(self, reconnect_every: int | None = None) -> Peer:
        peer = Peer(self.context, self.broker.url, reconnect_every)
        self.peers.append(peer)
        return peer

    @property
    def sent(self) -> int:
        return sum(p.sent for p in self.peers)

    def bulk(self, peers: list[Peer], count: int, seed: int) -> None:
        generator = Bulk(seed)
        for i in range(count):
            peers[i % len(peers)].send(generator.message())

    def hypothesis(self, peer: Peer, examples: int) -> None:
        """Send every message of every example hypothesis generates."""

        @settings(
            max_examples=examples,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(st.lists(messages, min_size=1, max_size=12))
        def send_example(batch: list[Frames]) -> None:
            for frames in batch:
                peer.send(frames)

        send_example()

    def run(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        def guarded() -> None:
            try:
                target(*args)
            except BaseException as exc:
                self.errors.append(exc)

        thread = threading.Thread(target=guarded, name=f"fuzz-{target.__name__}", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.context.term()


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def fuzz_broker(launcher: Launcher) -> BrokerProcess:
    # Warnings about dropped messages are the point; the log stays as it is.
    return launcher.broker()


async def test_fuzzed_frames_while_real_tasks_flow(
    fuzz_broker: BrokerProcess, launcher: Launcher
) -> None:
    broker = fuzz_broker
    launcher.node(broker, APP, concurrency=20, node_id=f"real-{uuid.uuid4().hex}")
    fuzz = Fuzz(broker)
    try:
        stable = fuzz.peer()
        churning = [fuzz.peer(reconnect_every=250), fuzz.peer(reconnect_every=400)]
        poet = fuzz.peer()  # sends what hypothesis generates
        # Warm-up round: the broker's allocator and caches reach their working size.
        await asyncio.to_thread(fuzz.bulk, [stable, *churning], 2000, 1)
        for peer in (stable, poet):
            await asyncio.to_thread(peer.sync, broker)
        warm_kb = rss_kb(broker.process.pid)
        warm_sent = fuzz.sent

        async with remote_twin(failures.app, broker) as client:
            bulk = fuzz.run(fuzz.bulk, [stable, *churning], 10_000, 2)
            poetry = fuzz.run(fuzz.hypothesis, poet, 150)
            task_ids: list[str] = []
            for batch in range(10):  # real work, submitted while the fuzz goes on
                await wait_until(
                    lambda b=batch: fuzz.sent >= warm_sent + 800 * b or not bulk.is_alive(),
                    timeout=30,
                    what="fuzz progress",
                )
                task_ids += await client.submit_many(
                    failures.ping, [(batch * 20 + i,) for i in range(20)]
                )
            results = await asyncio.gather(
                *(client.wait_for_result(t, timeout=30) for t in task_ids)
            )
            await wait_until(lambda: not bulk.is_alive() and not poetry.is_alive(), timeout=30)
            assert not fuzz.errors, fuzz.errors
            for peer in (stable, poet):
                await asyncio.to_thread(peer.sync, broker)
            final_kb = rss_kb(broker.process.pid)
            status = await client.admin("status")
            # Every wrong version got its ERROR reply (the peers that kept their socket).
            for peer in (stable, poet):
                assert peer.expected_version_errors > 0
                await wait_until(lambda p=peer: p.caught_up(), timeout=10, what="version errors")
                assert (
                    peer.expected_version_errors
                    <= peer.version_errors
                    <= peer.other_version_messages
                )
    finally:
        fuzz.close()
    assert fuzz.sent - warm_sent >= 10_000
    assert broker.process.running
    assert [r.status for r in results] == [TaskStatus.SUCCESS] * 200
    assert [r.result for r in results] == list(range(200))
    assert status["counters"]["malformed"] > 5000
    grown_mb = (final_kb - warm_kb) / 1024
    assert grown_mb <= 30, f"the broker grew by {grown_mb:.1f} MB ({warm_kb} -> {final_kb} kB)"


# --------------------------------------------------------------------------- size limits


async def test_a_submit_over_the_size_limit_is_refused_at_the_client(
    launcher: Launcher,
) -> None:
    broker = launcher.broker(args=["--max-message-bytes", "65536"])
    launcher.node(broker, APP)
    async with remote_twin(failures.app, broker) as client:
        with pytest.raises(MessageTooLargeError, match="65536"):
            await client.submit(failures.sink, b"x" * 70_000)
        with pytest.raises(MessageTooLargeError):
            await client.submit_many(failures.sink, [(b"small",), (b"x" * 70_000,)])
        # Refused at the client: nothing of either call reached the broker.
        status = await client.admin("status")
        assert status["counters"].get("submitted", 0) == 0
        assert status["queued"] == 0
        # Under the limit a task travels and runs as usual.
        fits = await client.submit(failures.sink, b"x" * 50_000)
        result = await client.wait_for_result(fits, timeout=10)
    assert result.error is None
    assert result.status is TaskStatus.SUCCESS
    assert result.result == 50_000


async def test_a_raw_peer_sending_an_oversized_frame_is_disconnected(
    launcher: Launcher,
) -> None:
    broker = launcher.broker(args=["--max-message-bytes", "65536"])
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        dealer = raw_dealer(context, broker.url)
        monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        assert _next_event(monitor) == zmq.EVENT_HANDSHAKE_SUCCEEDED
        dealer.send_multipart(encode(Command.HELLO, {"role": "client", "id": "big"}))
        assert decode(_reply(dealer, broker)).command is Command.WELCOME
        dealer.send_multipart([HEADER, bytes([Command.SUBMIT]), b"\x00" * 200_000])
        assert _next_event(monitor) == zmq.EVENT_DISCONNECTED  # ZMQ_MAXMSGSIZE
        dealer.disable_monitor()
        monitor.close(linger=0)
        dealer.close(linger=0)
        # Another raw peer is served as before.
        other = raw_dealer(context, broker.url)
        other.send_multipart(encode(Command.HELLO, {"role": "client", "id": "small"}))
        assert decode(_reply(other, broker)).command is Command.WELCOME
        other.close(linger=0)
    finally:
        context.term()
    # And so is a client: its submit is stored and acknowledged, its queries answered.
    async with remote_twin(failures.app, broker) as client:
        task_id = await client.submit(failures.ping, 42)
        pending = await client.get_result(task_id)
        status = await client.admin("status")
    assert pending is not None and pending.status is TaskStatus.PENDING
    assert status["queued"] == 1
    assert "submitted" in status["counters"]
    assert broker.process.running


def _next_event(monitor: zmq.Socket[bytes], timeout_ms: int = 5000) -> int:
    assert monitor.poll(timeout_ms), "no socket event"
    return int(recv_monitor_message(monitor)["event"])


# --------------------------------------------------------------------------- versions


@pytest.fixture(scope="module")
def version_broker(module_launcher: Launcher) -> BrokerProcess:
    """One broker for the version tests; each test talks to it from a socket of its own."""
    return module_launcher.broker()


@pytest.fixture
def version_peer(
    version_broker: BrokerProcess,
) -> Iterator[tuple[BrokerProcess, zmq.Socket[bytes]]]:
    broker = version_broker
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socket = raw_dealer(context, broker.url)
    yield broker, socket
    socket.close(linger=0)
    context.term()


def _reply(socket: zmq.Socket[bytes], broker: BrokerProcess) -> Frames:
    deadline = time.monotonic() + 5
    while not socket.poll(20):
        assert broker.process.running, "the broker died"
        assert time.monotonic() < deadline, "silence instead of an answer"
    return socket.recv_multipart()


def test_another_protocol_version_gets_a_version_error(
    version_peer: tuple[BrokerProcess, zmq.Socket[bytes]],
) -> None:
    broker, socket = version_peer
    for frames in (
        [_wrong_version(2), bytes([Command.HELLO]), _pack({"role": "client", "id": "v2"})],
        [_wrong_version(0), bytes([Command.SUBMIT]), _pack([_submission()])],
        [_wrong_version(255), bytes([Command.GET])],
    ):
        socket.send_multipart(frames)
        message = version_error(_reply(socket, broker))
        assert message is not None
        assert f"protocol version {frames[0][4]} is not supported" in message
    # The same peer, speaking the right version now, is served.
    socket.send_multipart(encode(Command.HELLO, {"role": "client", "id": "v1"}))
    assert decode(_reply(socket, broker)).command is Command.WELCOME


def test_another_version_is_answered_whatever_its_frame_count(
    version_peer: tuple[BrokerProcess, zmq.Socket[bytes]],
) -> None:
    """Another protocol version may frame its messages differently: the header alone says
    it is not version 1 (``protocol.decode`` promises a VersionMismatch for it)."""
    broker, socket = version_peer
    for frames in (
        [_wrong_version(2)],
        [_wrong_version(2), bytes([Command.HELLO]), _pack({"role": "client"}), b"extra"],
        [_wrong_version(3), b"", b"", b"", b""],
    ):
        socket.send_multipart(frames)
        socket.send_multipart(encode(Command.HELLO, {"role": "client", "id": "v1"}))
        first = _reply(socket, broker)
        assert version_error(first) is not None, (
            f"{len(frames)} frames of version {frames[0][4]}: no version error, got {first}"
        )
        assert decode(_reply(socket, broker)).command is Command.WELCOME


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    version=_other_versions,
    command=st.integers(0, 255),
    body=st.none() | st.binary(max_size=32) | st.builds(_pack, msgpack_values),
)
def test_any_other_version_is_answered_not_ignored(
    version_peer: tuple[BrokerProcess, zmq.Socket[bytes]],
    version: int,
    command: int,
    body: bytes | None,
) -> None:
    broker, socket = version_peer
    frames = [_wrong_version(version), bytes([command])]
    socket.send_multipart(frames if body is None else [*frames, body])
    message = version_error(_reply(socket, broker))
    assert message is not None and f"protocol version {version} " in message
