"""The wire protocol: frames, bodies and values, encoded and decoded without sockets."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowrra import protocol
from flowrra.errors import FlowrraError, ProtocolError, SerializationError
from flowrra.protocol import (
    HEADER,
    MAGIC,
    RECORD_FIELDS,
    VERSION,
    Ack,
    Command,
    Dispatch,
    ErrorInfo,
    Message,
    NodeReady,
    Outcome,
    SlotKind,
    Submission,
    TaskStatus,
    VersionMismatch,
    Welcome,
    decode,
    encode,
    encode_publication,
    pack_args,
    pack_value,
    unpack_args,
    unpack_value,
)
from tests.flowrra.strategies import EXAMPLES, msgpack_values, mutated


def roundtrip(command: Command, body: object) -> Message:
    """Encode then decode, as two peers would."""
    return decode(encode(command, body))


# --------------------------------------------------------------------------- samples


def submission(**overrides: Any) -> Submission:
    fields: dict[str, Any] = {
        "task_id": "t-1",
        "name": "mod.fn",
        "priority": 5,
        "payload": pack_args((1, "a"), {"k": [1, 2]}),
        "max_retries": 3,
        "retry_delay_s": 1.5,
        "timeout_s": 10.0,
        "submitted_at": 1700000000.25,
    }
    fields.update(overrides)
    return Submission(**fields)


def ready(**overrides: Any) -> NodeReady:
    fields: dict[str, Any] = {
        "node_id": "node-1",
        "hostname": "host",
        "pid": 1234,
        "async_slots": 10,
        "cpu_slots": 2,
        "tasks": {"mod.io": SlotKind.ASYNC, "mod.cpu": SlotKind.CPU},
        "running": [("t-9", 2)],
    }
    fields.update(overrides)
    return NodeReady(**fields)


def record(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "task_id": "t-1",
        "task_name": "mod.fn",
        "status": "success",
        "result": pack_value(42),
        "error": None,
        "traceback": None,
        "retries": 0,
        "submitted_at": 1.0,
        "started_at": 2.0,
        "finished_at": 3.0,
        "eta": None,
        "progress": None,
    }
    fields.update(overrides)
    return fields


# --------------------------------------------------------------------------- frames


def test_header_is_magic_plus_version() -> None:
    assert MAGIC + bytes([VERSION]) == HEADER
    assert encode(Command.HELLO) == [HEADER, bytes([Command.HELLO])]


@pytest.mark.parametrize("command", list(Command))
def test_every_command_round_trips_without_a_body(command: Command) -> None:
    frames = encode(command)
    assert len(frames) == 2
    assert decode(frames) == Message(command, None)


@pytest.mark.parametrize("command", list(Command))
def test_every_command_round_trips_with_a_body(command: Command) -> None:
    body = [1, "two", b"three", {"four": 4.0}, None, True]
    assert roundtrip(command, body) == Message(command, body)


def test_encode_publication_puts_the_topic_first() -> None:
    frames = encode_publication(b"t-1", Command.RESULT, record())
    assert frames[0] == b"t-1"
    message = decode(frames[1:])
    assert message.command is Command.RESULT
    assert protocol.parse_record(message.body) == record()


# --------------------------------------------------------------------------- bodies


def test_submission_round_trip() -> None:
    subs = [submission(), submission(task_id="t-2", timeout_s=None, priority=-(2**31))]
    message = roundtrip(Command.SUBMIT, [s.to_wire() for s in subs])
    assert message.command is Command.SUBMIT
    assert protocol.parse_submit(message.body) == subs


def test_submission_numbers_become_floats() -> None:
    wire = submission().to_wire()
    wire[5], wire[6], wire[7] = 2, 3, 4  # ints where floats are expected
    (parsed,) = protocol.parse_submit(roundtrip(Command.SUBMIT, [wire]).body)
    assert (parsed.retry_delay_s, parsed.timeout_s, parsed.submitted_at) == (2.0, 3.0, 4.0)
    assert all(isinstance(v, float) for v in (parsed.retry_delay_s, parsed.timeout_s))


def test_submission_payload_unpacks_to_the_call() -> None:
    (parsed,) = protocol.parse_submit(roundtrip(Command.SUBMIT, [submission().to_wire()]).body)
    assert unpack_args(parsed.payload) == ((1, "a"), {"k": [1, 2]})


def test_dispatch_round_trip() -> None:
    items = [Dispatch("t-1", 1, "mod.fn", b"\x92\x90\x80", None), Dispatch("t-2", 7, "x", b"", 2.5)]
    message = roundtrip(Command.TASKS, [d.to_wire() for d in items])
    assert protocol.parse_tasks(message.body) == items


def test_outcome_round_trip() -> None:
    ok = Outcome("t-1", 1, pack_value({"a": 1}), None, 1.0, 2.0)
    failed = Outcome("t-2", 3, None, ErrorInfo("ValueError", "boom", "Traceback..."), 1.0, 2.0)
    no_tb = Outcome("t-3", 1, None, ErrorInfo("KeyError", "'k'", None), 1.0, 2.0)
    message = roundtrip(Command.RESULTS, [o.to_wire() for o in (ok, failed, no_tb)])
    parsed = protocol.parse_results(message.body)
    assert parsed == [ok, failed, no_tb]
    assert [o.ok for o in parsed] == [True, False, False]
    assert unpack_value(parsed[0].value) == {"a": 1}


def test_error_info_from_exception() -> None:
    info = ErrorInfo.from_exception(ValueError("bad"), "tb")
    assert info == ErrorInfo("ValueError", "bad", "tb")


def test_node_ready_round_trip() -> None:
    node = ready()
    message = roundtrip(Command.READY, node.to_wire())
    parsed = protocol.parse_ready(message.body)
    assert parsed == node
    assert all(isinstance(kind, SlotKind) for kind in parsed.tasks.values())


def test_node_ready_with_no_tasks_or_running() -> None:
    node = ready(tasks={}, running=[], async_slots=0, cpu_slots=0)
    assert protocol.parse_ready(roundtrip(Command.READY, node.to_wire()).body) == node


def test_welcome_round_trip() -> None:
    welcome = Welcome("b-1", "tcp://127.0.0.1:5556", 1000, 3, 1 << 24)
    assert protocol.parse_welcome(roundtrip(Command.WELCOME, welcome.to_wire()).body) == welcome


def test_ack_round_trip() -> None:
    body = [["t-1", None], ["t-2", "rejected: too large"]]
    parsed = protocol.parse_ack(roundtrip(Command.ACK, body).body)
    assert parsed == [Ack("t-1", None), Ack("t-2", "rejected: too large")]


def test_error_round_trip() -> None:
    body = {"code": "version", "message": "nope"}
    assert protocol.parse_error(roundtrip(Command.ERROR, body).body) == ("version", "nope")


def test_task_ids_round_trip() -> None:
    assert protocol.parse_task_ids(roundtrip(Command.GET, ["a", "b"]).body, "GET") == ["a", "b"]


@pytest.mark.parametrize("status", list(TaskStatus))
def test_record_round_trip(status: TaskStatus) -> None:
    rec = record(status=status.value)
    assert protocol.parse_record(roundtrip(Command.STATE, rec).body) == rec
    assert set(rec) == set(RECORD_FIELDS)


def test_task_status_finality() -> None:
    assert {s for s in TaskStatus if s.is_final} == {
        TaskStatus.SUCCESS,
        TaskStatus.FAILED,
        TaskStatus.EXPIRED,
        TaskStatus.CANCELLED,
    }


# --------------------------------------------------------------------------- malformed frames


@pytest.mark.parametrize("count", [0, 1, 4, 5])
def test_decode_rejects_wrong_frame_count(count: int) -> None:
    frames = [HEADER, bytes([Command.HELLO]), b"\xc0", b"", b""][:count]
    with pytest.raises(ProtocolError, match="frames"):
        decode(frames)


@pytest.mark.parametrize(
    "header",
    [b"", b"FLW", b"FLWR", b"XXXX\x01", b"flwr\x01", HEADER + b"\x00", b"HTTP/1.1", b"FLWX\x01"],
)
def test_decode_rejects_bad_header(header: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        decode([header, bytes([Command.HELLO])])
    assert not isinstance(info.value, VersionMismatch)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_decode_reports_another_version(version: int) -> None:
    with pytest.raises(VersionMismatch) as info:
        decode([MAGIC + bytes([version]), bytes([Command.HELLO])])
    assert info.value.version == version
    assert isinstance(info.value, ProtocolError)
    assert str(version) in str(info.value)


@pytest.mark.parametrize("command_frame", [b"", b"\x01\x01", b"\x00", b"\x7f", b"\xff"])
def test_decode_rejects_bad_or_unknown_command(command_frame: bytes) -> None:
    with pytest.raises(ProtocolError, match="command"):
        decode([HEADER, command_frame])


@pytest.mark.parametrize(
    "body",
    [
        b"",  # empty
        b"\xc1",  # never-used byte
        b"\x92\x01",  # truncated array
        b"\x01\x02",  # extra data
        b"\xa2\xff\xfe",  # invalid utf-8 string
        b"\x81\x91\x01\x02",  # map with an unhashable (list) key
    ],
)
def test_decode_rejects_undecodable_body(body: bytes) -> None:
    with pytest.raises(ProtocolError, match="undecodable body"):
        decode([HEADER, bytes([Command.SUBMIT]), body])


# --------------------------------------------------------------------------- malformed bodies


def _bad_submit_items() -> list[Any]:
    good = submission().to_wire()

    def with_field(index: int, value: Any) -> list[Any]:
        item = list(good)
        item[index] = value
        return item

    return [
        "not a list",
        good[:7],  # 7 fields
        [*good, None],  # 9 fields
        with_field(0, 1),  # task id not a str
        with_field(0, ""),  # empty task id
        with_field(0, "x" * 201),  # task id too long
        with_field(1, b"mod.fn"),  # name not a str
        with_field(1, ""),
        with_field(1, "n" * 501),
        with_field(2, 1.5),  # priority not an int
        with_field(2, True),  # bool is not an int
        with_field(2, 2**31),  # out of range
        with_field(2, -(2**31) - 1),
        with_field(3, "payload"),  # payload not bytes
        with_field(4, -1),  # max_retries out of range
        with_field(4, 1001),
        with_field(4, 1.0),
        with_field(5, -0.1),  # negative retry delay
        with_field(5, "1"),
        with_field(5, float("nan")),
        with_field(6, 0),  # timeout must be > 0
        with_field(6, -1.0),
        with_field(6, "10"),
        with_field(7, None),  # submitted_at required
        with_field(7, False),
    ]


@pytest.mark.parametrize("item", _bad_submit_items())
def test_parse_submit_rejects_bad_items(item: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_submit([submission().to_wire(), item])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("submitted_at", float("nan")),
        ("submitted_at", float("inf")),
        ("timeout_s", float("inf")),
        ("retry_delay_s", float("inf")),
    ],
)
def test_parse_submit_rejects_non_finite_numbers(field: str, value: float) -> None:
    # The client never sends these (make_spec requires finite numbers), and a NaN
    # submitted_at would make TaskResult.from_record raise for every reader of the task.
    with pytest.raises(ProtocolError):
        protocol.parse_submit([submission(**{field: value}).to_wire()])


def test_task_ids_are_limited_in_utf8_bytes() -> None:
    # Task ids are LMDB keys: 200 characters of "€" would be 600 bytes.
    assert protocol.parse_submit([submission(task_id="x" * 200).to_wire()])
    assert protocol.parse_submit([submission(task_id="€" * 66).to_wire()])  # 198 bytes
    with pytest.raises(ProtocolError):
        protocol.parse_submit([submission(task_id="€" * 67).to_wire()])  # 201 bytes


def test_split_submit_separates_valid_and_refused_items() -> None:
    good = submission(task_id="good").to_wire()
    bad = submission(task_id="bad", priority=1.5).to_wire()
    long_id = submission(task_id="€" * 100).to_wire()
    valid, rejected = protocol.split_submit([good, bad, long_id])
    assert [s.task_id for s in valid] == ["good"]
    assert [task_id for task_id, _ in rejected] == ["bad", "€" * 100]
    assert all(isinstance(reason, str) and reason for _, reason in rejected)


@pytest.mark.parametrize("item", [[1, *submission().to_wire()[1:]], ["t"], "t", None])
def test_split_submit_rejects_items_without_a_task_id(item: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.split_submit([submission().to_wire(), item])


@pytest.mark.parametrize("body", [None, {}, "x", 3, b"list"])
def test_parse_submit_rejects_non_lists(body: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_submit(body)


def test_parse_submit_accepts_priority_bounds_and_no_timeout() -> None:
    items = [
        submission(priority=2**31 - 1).to_wire(),
        submission(priority=-(2**31), timeout_s=None, max_retries=1000, retry_delay_s=0).to_wire(),
    ]
    assert [s.priority for s in protocol.parse_submit(items)] == [2**31 - 1, -(2**31)]


@pytest.mark.parametrize(
    "item",
    [
        ["t", 1, "n", b""],  # 4 fields
        [1, 1, "n", b"", None],
        ["t", "1", "n", b"", None],
        ["t", True, "n", b"", None],
        ["t", 1, 2, b"", None],
        ["t", 1, "n", "payload", None],
        ["t", 1, "n", b"", "5"],
        "t",
    ],
)
def test_parse_tasks_rejects_bad_items(item: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_tasks([item])


@pytest.mark.parametrize(
    "item",
    [
        ["t", 1, b"v", None, 1.0],  # 5 fields
        [1, 1, b"v", None, 1.0, 2.0],
        ["t", 1.0, b"v", None, 1.0, 2.0],
        ["t", 1, "v", None, 1.0, 2.0],  # value not bytes
        ["t", 1, b"v", None, "1", 2.0],
        ["t", 1, b"v", None, 1.0, None],
        ["t", 1, None, None, 1.0, 2.0],  # neither value nor error
        ["t", 1, b"v", ["E", "m", None], 1.0, 2.0],  # both value and error
        ["t", 1, None, ["E", "m"], 1.0, 2.0],  # error with 2 fields
        ["t", 1, None, [1, "m", None], 1.0, 2.0],
        ["t", 1, None, ["E", None, None], 1.0, 2.0],
        ["t", 1, None, ["E", "m", 3], 1.0, 2.0],
        ["t", 1, None, "E: m", 1.0, 2.0],
    ],
)
def test_parse_results_rejects_bad_items(item: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_results([item])


def _bad_ready_bodies() -> list[Any]:
    good = ready().to_wire()
    bodies: list[Any] = [None, [], "ready"]
    for key in good:
        if key == "limits":
            continue  # optional: nodes of limited tasks send it
        missing = dict(good)
        del missing[key]
        bodies.append(missing)
    for key, value in [
        ("node_id", ""),
        ("node_id", "n" * 201),
        ("node_id", 5),
        ("hostname", None),
        ("pid", "1"),
        ("pid", True),
        ("async_slots", -1),
        ("async_slots", 1_000_001),
        ("async_slots", 1.0),
        ("cpu_slots", -1),
        ("cpu_slots", 10_001),
        ("tasks", ["mod.fn"]),
        ("tasks", {"mod.fn": "gpu"}),
        ("tasks", {"mod.fn": None}),
        ("tasks", {1: "async"}),
        ("running", {}),
        ("running", [["t"]]),
        ("running", [["t", "1"]]),
        ("running", [[1, 1]]),
        ("running", ["t"]),
        ("limits", []),
        ("limits", {"t": [0, 1.0, None]}),
        ("limits", {"t": [5, None, None]}),
        ("limits", {"t": [5, 0, None]}),
        ("limits", {"t": [None, None, 0]}),
        ("limits", {"t": [1, 1.0]}),
    ]:
        bodies.append({**good, key: value})
    return bodies


@pytest.mark.parametrize("body", _bad_ready_bodies())
def test_parse_ready_rejects_bad_bodies(body: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_ready(body)


def _bad_welcome_bodies() -> list[Any]:
    good = Welcome("b", "tcp://x:1", 1000, 3, 100).to_wire()
    bodies: list[Any] = [None, ["b"]]
    for key in good:
        if key == "limits":
            continue  # optional: nodes of limited tasks send it
        missing = dict(good)
        del missing[key]
        bodies.append(missing)
    for key, value in [
        ("publish", None),
        ("heartbeat_ms", 0),
        ("heartbeat_ms", -5),
        ("heartbeat_ms", 1.5),
        ("liveness", 0),
        ("liveness", "3"),
        ("max_message_bytes", None),
    ]:
        bodies.append({**good, key: value})
    return bodies


@pytest.mark.parametrize("body", _bad_welcome_bodies())
def test_parse_welcome_rejects_bad_bodies(body: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_welcome(body)


@pytest.mark.parametrize("item", [["t"], ["t", None, 1], [1, None], ["t", 5], "t", None])
def test_parse_ack_rejects_bad_items(item: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_ack([item])


@pytest.mark.parametrize(
    "body", [None, [], {}, {"code": "x"}, {"message": "x"}, {"code": 1, "message": "x"}]
)
def test_parse_error_rejects_bad_bodies(body: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_error(body)


@pytest.mark.parametrize("body", [None, "a", ["a", 1], ["a", None], {"a": 1}])
def test_parse_task_ids_rejects_bad_bodies(body: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_task_ids(body, "GET")


def _bad_records() -> list[Any]:
    bodies: list[Any] = [None, [], "record"]
    for field in RECORD_FIELDS:
        missing = record()
        del missing[field]
        bodies.append(missing)
    for key, value in [
        ("task_id", 1),
        ("task_name", None),
        ("status", "done"),
        ("status", None),
        ("result", "42"),
        ("retries", "0"),
        ("retries", None),
        ("retries", True),
    ]:
        bodies.append(record(**{key: value}))
    return bodies


@pytest.mark.parametrize("body", _bad_records())
def test_parse_record_rejects_bad_records(body: Any) -> None:
    with pytest.raises(ProtocolError):
        protocol.parse_record(body)


def test_parse_record_rejects_an_unhashable_status() -> None:
    # ``m["status"] in TaskStatus._value2member_map_`` hashes the status: a list or a map
    # from the network must be a ProtocolError, not a TypeError.
    for status in ([1], {"a": 1}):
        with pytest.raises(ProtocolError):
            protocol.parse_record(record(status=status))


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        1.5,
        float("inf"),
        "",
        "héllo ✓",
        b"",
        b"\x00\xff",
        [],
        [1, [2, [3]]],
        {},
        {"a": {"b": [1, None, b"x"]}},
        {1: "int keys", 2.5: "float keys"},
    ],
)
def test_pack_value_round_trips_msgpack_values(value: object) -> None:
    assert unpack_value(pack_value(value)) == value


def test_tuples_come_back_as_lists() -> None:
    assert unpack_value(pack_value((1, (2, 3)))) == [1, [2, 3]]


def test_bytes_stay_bytes_and_str_stays_str() -> None:
    out = unpack_value(pack_value([b"abc", "abc"]))
    assert type(out[0]) is bytes and type(out[1]) is str


@pytest.mark.parametrize(
    "value",
    [
        dt.datetime(2024, 2, 29, 12, 30, 45, 123456),
        dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        dt.datetime(2024, 1, 1, 8, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
        dt.datetime(1, 1, 1),
        dt.datetime.max,
    ],
)
def test_pack_value_round_trips_datetimes(value: dt.datetime) -> None:
    out = unpack_value(pack_value({"when": value, "list": [value]}))
    assert out == {"when": value, "list": [value]}
    assert out["when"].tzinfo == value.tzinfo
    assert out["when"].utcoffset() == value.utcoffset()


class _Custom:
    pass


@pytest.mark.parametrize(
    "value",
    [
        object(),
        {1, 2},
        frozenset(),
        _Custom(),
        [1, {"nested": _Custom()}],
        dt.date(2024, 1, 1),
        dt.timedelta(seconds=1),
        2**64,  # too large for msgpack
        -(2**63) - 1,
        1j,
    ],
)
def test_pack_value_rejects_other_types(value: object) -> None:
    with pytest.raises(SerializationError) as info:
        pack_value(value)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, FlowrraError)


def test_serialization_error_names_the_type() -> None:
    with pytest.raises(SerializationError, match="_Custom"):
        pack_value({"x": _Custom()})


def test_pack_args_rejects_bad_arguments() -> None:
    with pytest.raises(SerializationError):
        pack_args((object(),), {})
    with pytest.raises(SerializationError):
        pack_args((), {"k": {1}})


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01", b"\x01\x02", msgpack.packb(msgpack.ExtType(99, b"x"))],
)
def test_unpack_value_rejects_garbage(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        unpack_value(data)


def test_unpack_value_rejects_a_bad_datetime() -> None:
    with pytest.raises(ProtocolError):
        unpack_value(msgpack.packb(msgpack.ExtType(1, b"not a date")))


def test_args_round_trip() -> None:
    when = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)
    args, kwargs = unpack_args(pack_args([1, "x", when], {"b": b"\x00", "n": None}))
    assert args == (1, "x", when)
    assert kwargs == {"b": b"\x00", "n": None}


@pytest.mark.parametrize(
    "decoded",
    [
        None,
        1,
        "x",
        [],
        [[]],
        [[], {}, "headers"],
        [[], {}, {}, {}],
        [{}, []],
        [(), "kwargs"],
        [[1], None],
        {"a": 1},
    ],
)
def test_unpack_args_rejects_non_args_kwargs(decoded: object) -> None:
    with pytest.raises(ProtocolError, match=r"\[args, kwargs\]"):
        unpack_args(msgpack.packb(decoded))


def test_unpack_args_rejects_garbage_bytes() -> None:
    with pytest.raises(ProtocolError):
        unpack_args(b"\xc1")


# --------------------------------------------------------------------------- properties

_frames = st.lists(st.binary(max_size=40), max_size=5)
_structured_frames = st.tuples(
    st.sampled_from([HEADER, MAGIC + b"\x02", b"FLWR", b"junk\x01"]),
    st.binary(min_size=0, max_size=2),
    st.lists(st.binary(max_size=40), max_size=2),
).map(lambda t: [t[0], t[1], *t[2]])


def _check_decode(frames: list[bytes]) -> None:
    try:
        message = decode(frames)
    except ProtocolError:
        return
    assert isinstance(message, Message)
    assert isinstance(message.command, Command)


@settings(max_examples=EXAMPLES, deadline=None)
@given(_frames)
def test_decode_never_raises_anything_else_on_random_frames(frames: list[bytes]) -> None:
    _check_decode(frames)


@settings(max_examples=EXAMPLES, deadline=None)
@given(_structured_frames)
def test_decode_never_raises_anything_else_on_near_valid_frames(frames: list[bytes]) -> None:
    _check_decode(frames)


def _near_valid_bodies() -> st.SearchStrategy[Any]:
    return mutated(
        [
            [submission().to_wire()],
            [Dispatch("t", 1, "n", b"", None).to_wire()],
            [Outcome("t", 1, None, ErrorInfo("E", "m", None), 1.0, 2.0).to_wire()],
            [Outcome("t", 1, b"v", None, 1.0, 2.0).to_wire()],
            ready().to_wire(),
            Welcome("b", "e", 1, 1, 1).to_wire(),
            [["t", None]],
            {"code": "c", "message": "m"},
            record(),
            [1, "inspect", {"task_id": "t"}],
            [1, None, {"any": "result"}],
        ]
    )


PARSERS: dict[str, Callable[[Any], object]] = {
    "parse_submit": protocol.parse_submit,
    "split_submit": protocol.split_submit,
    "parse_tasks": protocol.parse_tasks,
    "parse_results": protocol.parse_results,
    "parse_ready": protocol.parse_ready,
    "parse_welcome": protocol.parse_welcome,
    "parse_ack": protocol.parse_ack,
    "parse_error": protocol.parse_error,
    "parse_record": protocol.parse_record,
    "parse_task_ids": lambda body: protocol.parse_task_ids(body, "GET"),
    "parse_admin": protocol.parse_admin,
    "parse_admin_reply": protocol.parse_admin_reply,
}


def _check_parsers(body: Any) -> None:
    """Every parser either accepts ``body`` or raises ProtocolError, never anything else."""
    escaped = {}
    for name, parser in PARSERS.items():
        try:
            parser(body)
        except ProtocolError:
            pass
        except Exception as exc:
            escaped[name] = repr(exc)
    assert not escaped, f"non-ProtocolError escaped: {escaped}"


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(msgpack_values, st.lists(msgpack_values, max_size=3)))
def test_parsers_only_raise_protocol_error_on_random_bodies(body: Any) -> None:
    _check_parsers(body)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_near_valid_bodies())
def test_parsers_only_raise_protocol_error_on_near_valid_bodies(body: Any) -> None:
    _check_parsers(body)


# --------------------------------------------------------------------------- hostile input


def test_an_integer_out_of_range_says_so() -> None:
    with pytest.raises(
        SerializationError, match=r"integer 1267650600228229401496703205376 is out of range"
    ):
        protocol.pack_value([2**100])
    with pytest.raises(SerializationError, match="out of range"):
        protocol.pack_args([], {"n": -(2**64)})


def test_error_info_survives_a_broken_str_and_lone_surrogates() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    info = protocol.ErrorInfo.from_exception(Unprintable(), "tb \ud800")
    assert info.message.startswith("<unprintable ") and info.message.endswith("Unprintable object>")
    surrogate = protocol.ErrorInfo.from_exception(ValueError("x\ud800y"))
    assert surrogate.message == "x\\ud800y" and info.traceback == "tb \\ud800"
    encode(Command.RESULTS, [["t", 1, None, list(info), 0.0, 0.0]])  # encodes


def test_error_texts_are_bounded() -> None:
    limit = protocol.MAX_ERROR_TEXT_CHARS
    info = protocol.ErrorInfo.safe("E", "m" * (limit + 10), "line\n" * limit)
    assert len(info.message) <= limit + 20 and info.message.endswith("[truncated]")
    assert info.traceback is not None and info.traceback.startswith("[truncated]")
    assert len(info.traceback) <= limit + 20


def test_ack_items_may_carry_a_code() -> None:
    acks = protocol.parse_ack([["a", None], ["b", "taken", protocol.ACK_CONFLICT]])
    assert [(a.task_id, a.error, a.code) for a in acks] == [
        ("a", None, None),
        ("b", "taken", "conflict"),
    ]
    with pytest.raises(ProtocolError):
        protocol.parse_ack([["b", "taken", 7]])


def test_state_pieces() -> None:
    assert protocol.parse_state([1, [], False, ["x"]]) == (1, [], False, ["x"])
    for bad in ([1, []], [1, [], "no", []], ["1", [], False, []], [1, {}, False, []]):
        with pytest.raises(ProtocolError):
            protocol.parse_state(bad)


def test_get_and_submit_carry_a_bounded_number_of_items() -> None:
    with pytest.raises(ProtocolError, match="more than"):
        protocol.parse_task_ids(["t"] * (protocol.MAX_ITEMS_PER_MESSAGE + 1), "GET")
