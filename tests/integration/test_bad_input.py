"""Bad input from the network never crashes the broker: a raw pyzmq DEALER sends garbage."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import msgpack
import pytest
import zmq

from flowrra import TaskStatus
from flowrra.protocol import HEADER, MAGIC, Command, Submission, decode, encode, pack_args
from tests.apps import fleet
from tests.conftest import BrokerProcess, Launcher, remote_twin


def frame(command: Command) -> bytes:
    return bytes([command])


def body(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def submission(task_id: str, name: str = "tests.apps.fleet.echo", payload: bytes = b"") -> list:
    return Submission(
        task_id=task_id,
        name=name,
        priority=0,
        payload=payload or pack_args([], {}),
        max_retries=0,
        retry_delay_s=0.0,
        timeout_s=None,
        submitted_at=time.time(),
    ).to_wire()


GARBAGE: list[tuple[str, list[bytes]]] = [
    ("empty frame", [b""]),
    ("two empty frames", [b"", b""]),
    ("wrong magic", [b"XXXX\x01", frame(Command.HELLO)]),
    ("short header", [MAGIC, frame(Command.HELLO)]),
    ("long header", [HEADER + b"\x00", frame(Command.HELLO)]),
    ("header only", [HEADER]),
    ("unknown command", [HEADER, b"\x7f"]),
    ("two-byte command", [HEADER, b"\x01\x01"]),
    ("empty command", [HEADER, b""]),
    ("four frames", [HEADER, frame(Command.HELLO), body(None), b"extra"]),
    ("msgpack garbage", [HEADER, frame(Command.SUBMIT), b"\xc1\xc1\xc1"]),
    ("truncated msgpack", [HEADER, frame(Command.SUBMIT), body([submission("t" * 20)])[:-5]]),
    ("msgpack with trailing data", [HEADER, frame(Command.GET), body([1, []]) + b"\x01"]),
    ("huge declared length", [HEADER, frame(Command.SUBMIT), b"\xdb\xff\xff\xff\xff"]),
    ("deep nesting", [HEADER, frame(Command.SUBMIT), b"\x91" * 5000 + b"\xc0"]),
    ("unknown ext type", [HEADER, frame(Command.SUBMIT), body(msgpack.ExtType(99, b"x"))]),
    ("SUBMIT not a list", [HEADER, frame(Command.SUBMIT), body("tasks")]),
    ("SUBMIT short item", [HEADER, frame(Command.SUBMIT), body([[1, 2, 3]])]),
    ("SUBMIT wrong types", [HEADER, frame(Command.SUBMIT), body([[1, 2, 3, 4, 5, 6, 7, 8]])]),
    ("SUBMIT empty id", [HEADER, frame(Command.SUBMIT), body([submission("")])]),
    (
        "SUBMIT bool priority",
        [
            HEADER,
            frame(Command.SUBMIT),
            body([[*submission("b" * 20)[:2], True, *submission("b" * 20)[3:]]]),
        ],
    ),
    ("GET not a list", [HEADER, frame(Command.GET), body({"a": 1})]),
    ("GET ids not a list", [HEADER, frame(Command.GET), body([1, "abc"])]),
    ("GET ids not strings", [HEADER, frame(Command.GET), body([1, [1, None, b"x"]])]),
    ("GET no request id", [HEADER, frame(Command.GET), body([None, ["abc"]])]),
    ("READY empty", [HEADER, frame(Command.READY), body({})]),
    ("READY not a map", [HEADER, frame(Command.READY), body([1, 2])]),
    ("READY int keys", [HEADER, frame(Command.READY), body({1: 2})]),
    (
        "READY bad tasks",
        [
            HEADER,
            frame(Command.READY),
            body(
                {
                    "node_id": "evil",
                    "hostname": "h",
                    "pid": 1,
                    "async_slots": 1,
                    "cpu_slots": 0,
                    "tasks": {"t": "gpu"},
                    "running": [],
                }
            ),
        ],
    ),
    (
        "READY negative slots",
        [
            HEADER,
            frame(Command.READY),
            body(
                {
                    "node_id": "evil",
                    "hostname": "h",
                    "pid": 1,
                    "async_slots": -5,
                    "cpu_slots": 0,
                    "tasks": {},
                    "running": [],
                }
            ),
        ],
    ),
    ("RESULTS garbage", [HEADER, frame(Command.RESULTS), body([["x", "y"]])]),
    (
        "RESULTS value and error",
        [HEADER, frame(Command.RESULTS), body([["x", 1, b"v", ["E", "m", None], 1.0, 2.0]])],
    ),
    (
        "RESULTS unknown task",
        [HEADER, frame(Command.RESULTS), body([["nope", 1, b"\xc0", None, 1.0, 2.0]])],
    ),
    ("HEARTBEAT from a stranger", [HEADER, frame(Command.HEARTBEAT)]),
    ("BYE from a stranger", [HEADER, frame(Command.BYE)]),
    ("WELCOME to the broker", [HEADER, frame(Command.WELCOME), body({})]),
    ("ACK to the broker", [HEADER, frame(Command.ACK), body([["x", None]])]),
    ("TASKS to the broker", [HEADER, frame(Command.TASKS), body([])]),
    ("RESULT to the broker", [HEADER, frame(Command.RESULT), body({})]),
]


# Well-formed but pointless: not counted as malformed.
WELL_FORMED = {"HEARTBEAT from a stranger", "BYE from a stranger", "RESULTS unknown task"}


@pytest.fixture
def dealer(broker: BrokerProcess) -> Iterator[zmq.Socket[bytes]]:
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVTIMEO, 5000)
    socket.connect(broker.url)
    yield socket
    socket.close(linger=0)
    context.term()


def receive(socket: zmq.Socket[bytes], broker: BrokerProcess, timeout: float = 5.0) -> list[bytes]:
    """The next reply; fails at once if the broker process ends meanwhile."""
    deadline = time.monotonic() + timeout
    while not socket.poll(20):
        assert broker.process.running, f"the broker exited with {broker.process.proc.returncode}"
        assert time.monotonic() < deadline, f"no reply within {timeout}s"
    return socket.recv_multipart()


def hello_round_trip(socket: zmq.Socket[bytes], broker: BrokerProcess) -> list[list[bytes]]:
    """Send HELLO; return every reply received up to and including the WELCOME."""
    socket.send_multipart(encode(Command.HELLO, {"role": "client", "id": "raw"}))
    replies = []
    while True:
        frames = receive(socket, broker)
        replies.append(frames)
        if decode(frames).command is Command.WELCOME:
            return replies


async def test_garbage_frames_never_crash_the_broker(
    broker: BrokerProcess, dealer: zmq.Socket[bytes], launcher: Launcher
) -> None:
    for _name, frames in GARBAGE:
        dealer.send_multipart(frames)
    # A protocol version this broker does not speak gets a clear ERROR, not silence.
    dealer.send_multipart([MAGIC + bytes([2]), frame(Command.HELLO), body({"role": "client"})])
    # Replies come in order, but those of one tick may follow its WELCOME: a second round
    # trip (a later tick) makes sure everything the garbage caused has arrived.
    replies = hello_round_trip(dealer, broker) + hello_round_trip(dealer, broker)
    assert broker.process.running
    errors = []
    for frames in replies:
        reply = decode(frames)
        if reply.command is Command.ERROR:
            errors.append(reply.body)
        elif reply.command is Command.ACK:  # a refused submission is refused, not stored
            assert all(error is not None for _, error in reply.body), reply.body
        else:  # a stranger that speaks like a node (heartbeat, results) must register first
            assert reply.command in (Command.RECONNECT, Command.WELCOME), reply
    assert len(errors) == 1, errors
    assert errors[0]["code"] == "version"
    assert "protocol version 2 is not supported" in errors[0]["message"]
    # Every malformed message was seen and dropped or refused, none lost in a crashed handler.
    log = broker.process.log()
    rejected = len(re.findall(r"dropped a malformed|refused task", log))
    assert rejected == len(GARBAGE) - len(WELL_FORMED), log

    # A task whose arguments are not msgpack fails on the node; the node lives on.
    node = launcher.node(broker, "tests.apps.fleet:app")
    bad_payload = submission("raw-bad-payload-1", payload=b"\xc1 not msgpack")
    dealer.send_multipart(encode(Command.SUBMIT, [bad_payload]))
    assert decode(receive(dealer, broker)).body == [["raw-bad-payload-1", None]]

    # And a normal client is served as usual.
    app = remote_twin(fleet.app, broker)
    async with app:
        result = await app.wait_for_result(await app.submit(fleet.echo, 1, x=2), timeout=10)
        bad = await app.wait_for_result("raw-bad-payload-1", timeout=10)
    assert result.status is TaskStatus.SUCCESS and result.result == [[1], {"x": 2}]
    assert bad.status is TaskStatus.FAILED
    assert bad.error is not None and bad.error.startswith("ProtocolError: ")
    assert broker.process.running and node.process.running


def test_oversized_message_is_refused_not_fatal(launcher: Launcher) -> None:
    broker = launcher.broker(args=["--max-message-bytes", "65536"])
    context = zmq.Context()
    big, small = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
    try:
        for socket in (big, small):
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.RCVTIMEO, 5000)
            socket.connect(broker.url)
        big.send_multipart([HEADER, frame(Command.SUBMIT), b"\x00" * 200_000])
        big.send_multipart(encode(Command.HELLO, {"role": "client", "id": "big"}))
        assert [decode(f).command for f in hello_round_trip(small, broker)] == [Command.WELCOME]
        assert broker.process.running
        assert "dropped a malformed" not in broker.process.log()  # ZeroMQ refused it first
    finally:
        big.close(linger=0)
        small.close(linger=0)
        context.term()


# Task ids reach LMDB as keys, which must be 1 to 511 bytes long: ids outside that range once
# ended the broker (lmdb.BadValsizeError out of a GET, or out of the commit after a SUBMIT).


def test_get_with_empty_task_id_is_answered(
    dealer: zmq.Socket[bytes], broker: BrokerProcess
) -> None:
    dealer.send_multipart(encode(Command.GET, [7, [""]]))
    reply = decode(receive(dealer, broker))
    assert reply.command is Command.STATE and reply.body == [7, [], False, []]
    assert broker.process.running


def test_submit_with_long_utf8_task_id_is_answered(
    dealer: zmq.Socket[bytes], broker: BrokerProcess
) -> None:
    task_id = "\U0001f600" * 200  # 200 characters, 800 bytes
    dealer.send_multipart(encode(Command.SUBMIT, [submission(task_id)]))
    reply = decode(receive(dealer, broker))
    assert reply.command is Command.ACK and reply.body[0][0] == task_id
    assert broker.process.running


async def test_client_task_id_too_long_for_the_store(broker: BrokerProcess) -> None:
    """``submit(task_id=...)`` refuses ids the broker's store cannot key (UTF-8 bytes count)."""
    app = remote_twin(fleet.app, broker)
    async with app:
        with pytest.raises(ValueError, match="task_id"):
            await app.submit(fleet.echo, task_id="\U0001f600" * 200)  # 200 characters
        fine = await app.submit(fleet.echo, task_id="\u00e9" * 100)  # 200 bytes
        assert (await app.get_result(fine)) is not None
    assert broker.process.running
