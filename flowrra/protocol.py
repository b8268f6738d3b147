"""The Flowrra wire protocol: frames, commands, values, limits, and a parser per body.

This module is the whole wire contract shared by the broker, the node and the client (the
bottom layer: it imports msgpack and :mod:`flowrra.errors`, never zmq, so every rule here is
tested without sockets). ``docs/protocol.md`` describes the same format frame by frame.

Every message is a list of frames (a ROUTER socket prepends the peer's routing id, and a
publication its topic, :func:`encode_publication`)::

    [HEADER, COMMAND, BODY?]

``HEADER`` is ``b"FLWR"`` followed by one version byte (:data:`VERSION`; another version
raises :class:`VersionMismatch`), ``COMMAND`` one byte (:class:`Command`) and ``BODY`` one
msgpack document whose shape depends on the command. :func:`encode` and :func:`decode` handle
the frames; a ``parse_*`` function per command checks a body and returns typed values
(:class:`Submission`, :class:`Dispatch`, :class:`Outcome`, :class:`NodeReady`,
:class:`Welcome`, :class:`Ack`, ...), raising :class:`~flowrra.errors.ProtocolError` for
anything else.

Values: arguments (:func:`pack_args`) and results (:func:`pack_value`) are msgpack, with one
extension type for datetimes, and travel inside bodies as opaque ``bin`` blobs. The broker
stores and forwards them without decoding them; for a workflow it splices the packed result
of one step in front of the next step's arguments (:func:`prepend_arg`,
:func:`pack_packed_list`), still without decoding. Nothing received from the network is ever
unpickled or evaluated.

Limits and defaults are defined here once and used by the client (``make_spec``,
``check_priority``), the queues and the broker: priorities (:data:`MIN_PRIORITY` ..
:data:`MAX_PRIORITY`), :data:`MAX_RETRIES`, :data:`MAX_TASK_NAME_CHARS`, task id length,
:data:`MAX_MESSAGE_BYTES`, :data:`MAX_ITEMS_PER_MESSAGE`, the heartbeat interval and
liveness, and :data:`DEFAULT_BROKER_URL`.
"""

from __future__ import annotations

import datetime as _dt
import enum
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import msgpack

from flowrra.errors import ProtocolError, SerializationError

MAGIC: Final = b"FLWR"
VERSION: Final = 1
HEADER: Final = MAGIC + bytes([VERSION])

# Timing defaults, built from each other (7/MDP style): a peer is declared dead after
# HEARTBEAT_LIVENESS intervals without hearing anything from it.
HEARTBEAT_INTERVAL_MS: Final = 1000
HEARTBEAT_LIVENESS: Final = 3

# Where a broker listens, and clients and nodes look for it, unless told otherwise.
DEFAULT_BROKER_URL: Final = "tcp://127.0.0.1:5555"

# Largest message a broker accepts by default (ZMQ_MAXMSGSIZE); announced in WELCOME.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024

# Task ids a client creates start with its 16-character session id; the broker publishes
# results batched per such prefix, and each client subscribes to its own.
CLIENT_PREFIX_CHARS: Final = 16

# Task ids are LMDB keys (max 511 bytes, and index keys prefix 8 bytes to them).
MAX_TASK_ID_CHARS: Final = 200
MAX_TASK_ID_BYTES: Final = 200

# Limits of a task's options, checked at decoration, at submit and by the broker (one place).
MIN_PRIORITY: Final = -(2**31)
MAX_PRIORITY: Final = 2**31 - 1
MAX_RETRIES: Final = 1000
MAX_TASK_NAME_CHARS: Final = 500

# Longest error message and traceback an outcome carries (longer ones are cut).
MAX_ERROR_TEXT_CHARS: Final = 32 * 1024

# Most items one SUBMIT or GET may carry: bounds the work of one message, so that no peer
# can stall a broker tick (clients send at most 1,000 per message).
MAX_ITEMS_PER_MESSAGE: Final = 5000

# msgpack extension type code for the one non-native value Flowrra carries.
_EXT_DATETIME: Final = 1


class Command(enum.IntEnum):
    """The one-byte command frame."""

    # client -> broker
    HELLO = 0x01
    SUBMIT = 0x02
    GET = 0x03
    ADMIN = 0x04  # operator commands: status, inspect, tasks, purge, dead letters
    # node -> broker
    READY = 0x10
    RESULTS = 0x11
    HEARTBEAT = 0x12
    BYE = 0x13
    PAUSE = 0x14  # the node is shutting down: send it no more tasks
    PROGRESS = 0x15  # the latest progress of running attempts
    # broker -> client / node
    WELCOME = 0x20
    ACK = 0x21
    STATE = 0x22
    TASKS = 0x23
    ERROR = 0x24
    RECONNECT = 0x25
    ADMIN_REPLY = 0x26
    CANCEL = 0x27  # broker -> node: stop these running attempts (a user cancelled them)
    # broker PUB socket (first frame is the topic: the task id)
    RESULT = 0x30
    SUBSCRIBED = 0x31


_COMMAND_FRAMES: Final = {c: bytes([c]) for c in Command}
# The command of a command frame's byte (a dict lookup: calling the enum costs 0.6 us).
_COMMANDS: Final[dict[int, Command]] = {c.value: c for c in Command}

# Commands only a node may send (a CURVE-authenticated client key is refused them).
NODE_ONLY_COMMANDS: Final = frozenset(
    {
        Command.READY,
        Command.RESULTS,
        Command.HEARTBEAT,
        Command.BYE,
        Command.PAUSE,
        Command.PROGRESS,
    }
)


class TaskStatus(enum.StrEnum):
    """Where a task is in its life."""

    SCHEDULED = "scheduled"  # waiting for its eta (countdown)
    WAITING = "waiting"  # a workflow step waiting for the one before it
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCESS = "success"
    FAILED = "failed"
    EXPIRED = "expired"  # not started before its deadline; never ran
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True once the status will not change any more."""
        return self in _FINAL_STATUSES


_FINAL_STATUSES: Final = frozenset(
    (TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.EXPIRED, TaskStatus.CANCELLED)
)
FINAL_STATUS_VALUES: Final = frozenset(status.value for status in _FINAL_STATUSES)


class SlotKind(enum.StrEnum):
    """The kind of node capacity a task needs."""

    ASYNC = "async"  # coroutines and plain functions run in threads
    CPU = "cpu"  # functions run in the node's process pool


# --------------------------------------------------------------------------- values


def _default(obj: object) -> msgpack.ExtType:
    if isinstance(obj, _dt.datetime):
        return msgpack.ExtType(_EXT_DATETIME, obj.isoformat().encode())
    if isinstance(obj, int):  # msgpack hands over only the integers it cannot hold
        raise SerializationError(
            f"integer {obj} is out of range: msgpack carries integers from -2**63 to 2**64 - 1 "
            "(send larger ones as a str)"
        )
    raise SerializationError(
        f"cannot send a value of type {type(obj).__qualname__!r}: Flowrra carries msgpack "
        "values only (None, bool, int, float, str, bytes, list, tuple, dict, datetime)"
    )


def _ext_hook(code: int, data: bytes) -> object:
    if code == _EXT_DATETIME:
        return _dt.datetime.fromisoformat(data.decode())
    raise ProtocolError(f"unknown msgpack extension type {code}")


class _Packers(threading.local):
    """This thread's msgpack packers: ``msgpack.packb`` builds a packer at every call (about
    1 µs, most of a small value's encoding), and one packer must not serve two threads."""

    def __init__(self) -> None:
        self.value = msgpack.Packer(default=_default, use_bin_type=True)
        self.plain = msgpack.Packer(use_bin_type=True)


_packers: Final = _Packers()


def packb(obj: object) -> bytes:
    """``msgpack.packb(obj)`` on this thread's packer: for bodies and stored structures,
    which hold msgpack types only (TypeError otherwise)."""
    return _packers.plain.pack(obj)  # type: ignore[no-any-return]


def pack_value(value: object) -> bytes:
    """Encode one task argument tree or result; raises SerializationError for other types."""
    try:
        return _packers.value.pack(value)  # type: ignore[no-any-return]
    except SerializationError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise SerializationError(f"cannot encode value as msgpack: {exc}") from exc


def unpack_value(data: bytes) -> Any:
    """Decode what :func:`pack_value` produced."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except TypeError:
        # A map key that was a tuple arrives as a list, which cannot be a dict key: decode
        # again, turning such keys back into tuples (rare, so the fast path stays fast).
        try:
            return msgpack.unpackb(
                data,
                ext_hook=_ext_hook,
                raw=False,
                strict_map_key=False,
                object_pairs_hook=_hashable_keys,
            )
        except Exception as exc:
            raise ProtocolError(f"undecodable value: {exc}") from exc
    except Exception as exc:
        raise ProtocolError(f"undecodable value: {exc}") from exc


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def _hashable_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    return {_freeze(key): value for key, value in pairs}


def pack_args(args: Sequence[object], kwargs: dict[str, object]) -> bytes:
    """Encode a call's positional and keyword arguments as one blob."""
    return pack_value([list(args), kwargs])


def unpack_args(payload: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Decode a blob from :func:`pack_args` (a payload with headers, see :func:`with_headers`,
    decodes to the same arguments: the headers are left out)."""
    decoded = unpack_value(payload)
    if (
        not isinstance(decoded, list)
        or not 2 <= len(decoded) <= 3
        or not isinstance(decoded[0], list)
        or not isinstance(decoded[1], dict)
        or (len(decoded) == 3 and not isinstance(decoded[2], dict))
    ):
        raise ProtocolError("task payload is not [args, kwargs] or [args, kwargs, headers]")
    return tuple(decoded[0]), decoded[1]


# A payload's first byte: a msgpack array of 2, [args, kwargs], or of 3, [args, kwargs, headers].
_CALL: Final = b"\x92"
_CALL_WITH_HEADERS: Final = b"\x93"


def with_headers(payload: bytes, headers: dict[str, str]) -> bytes:
    """``payload`` (of :func:`pack_args`) with ``headers`` as its third element: a map of
    strings the node reads and everything else ignores (a trace context, docs/tracing.md).
    The arguments are not decoded; headers it had already are replaced."""
    if payload[:1] not in (_CALL, _CALL_WITH_HEADERS):
        raise ProtocolError("task payload is not [args, kwargs]")
    call = split_headers(payload)[0]
    return _CALL_WITH_HEADERS + call[1:] + pack_value(headers)


def split_headers(payload: bytes) -> tuple[bytes, dict[str, str] | None]:
    """``(the payload as [args, kwargs], its headers or None)``. Headers are decoded; the
    arguments only skipped over."""
    if payload[:1] != _CALL_WITH_HEADERS:
        return payload, None
    unpacker = msgpack.Unpacker(ext_hook=_ext_hook, raw=False, strict_map_key=False)
    try:
        unpacker.feed(payload)
        unpacker.read_array_header()
        unpacker.skip()
        unpacker.skip()
        end = unpacker.tell()
        headers = unpacker.unpack()
    except Exception as exc:
        raise ProtocolError(f"undecodable task payload: {exc}") from exc
    if unpacker.tell() != len(payload) or not isinstance(headers, dict):
        raise ProtocolError("task payload's headers are not a map")
    return _CALL + payload[1:end], headers


def same_call(payload: bytes, other: bytes) -> bool:
    """True when two payloads carry the same arguments, whatever their headers (a resubmit
    under a known task id from another trace is still the same call)."""
    if payload == other:
        return True
    if payload[:1] != _CALL_WITH_HEADERS and other[:1] != _CALL_WITH_HEADERS:
        return False
    try:
        return split_headers(payload)[0] == split_headers(other)[0]
    except ProtocolError:
        return False


def prepend_arg(payload: bytes, value: bytes) -> bytes:
    """The packed ``[args, kwargs]`` of :func:`pack_args` with the packed ``value`` put
    before the first positional argument (a workflow hands a result on). Works on the
    msgpack framing alone: neither the arguments nor the value are decoded, and headers
    (:func:`with_headers`) are kept."""
    if len(payload) < 2 or payload[:1] not in (_CALL, _CALL_WITH_HEADERS):
        raise ProtocolError("task payload is not [args, kwargs]")
    header = payload[1]
    if 0x90 <= header <= 0x9F:
        count, rest = header & 0x0F, payload[2:]
    elif header == 0xDC:
        count, rest = int.from_bytes(payload[2:4], "big"), payload[4:]
    elif header == 0xDD:
        count, rest = int.from_bytes(payload[2:6], "big"), payload[6:]
    else:
        raise ProtocolError("task payload's args are not an array")
    return payload[:1] + _array_header(count + 1) + value + rest


def pack_packed_list(values: Sequence[bytes]) -> bytes:
    """A msgpack array of already packed values (a group's results, in order)."""
    return _array_header(len(values)) + b"".join(values)


def _array_header(count: int) -> bytes:
    if count < 16:
        return bytes([0x90 | count])
    if count < 1 << 16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


# --------------------------------------------------------------------------- frames


def encode(command: Command, body: object = None) -> list[bytes]:
    """Build the frames of one message (without any routing id)."""
    if body is None:
        return [HEADER, _COMMAND_FRAMES[command]]
    return [HEADER, _COMMAND_FRAMES[command], packb(body)]


def encode_publication(topic: bytes, command: Command, body: object = None) -> list[bytes]:
    """Frames for the broker's PUB socket: the topic first, then a normal message."""
    return [topic, *encode(command, body)]


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded message: its command and its (still untyped) msgpack body."""

    command: Command
    body: Any


def decode(frames: Sequence[bytes]) -> Message:
    """Parse frames into a :class:`Message`; raises ProtocolError for anything malformed.

    A header with the right magic but another version raises :class:`VersionMismatch`, so the
    receiver can answer with a clear error instead of silence.
    """
    if not frames:
        raise ProtocolError("expected 2 or 3 frames, got 0")
    header = frames[0]
    if header != HEADER:
        if len(header) == len(HEADER) and header[:4] == MAGIC:
            raise VersionMismatch(header[4])  # whatever the rest looks like
        raise ProtocolError("bad header frame (not a Flowrra peer)")
    if len(frames) not in (2, 3):
        raise ProtocolError(f"expected 2 or 3 frames, got {len(frames)}")
    command_frame = frames[1]
    if len(command_frame) != 1:
        raise ProtocolError("command frame must be one byte")
    command = _COMMANDS.get(command_frame[0])
    if command is None:
        raise ProtocolError(f"unknown command 0x{command_frame[0]:02x}")
    body: Any = None
    if len(frames) == 3:
        try:
            body = msgpack.unpackb(frames[2], raw=False, strict_map_key=False)
        except Exception as exc:
            raise ProtocolError(f"undecodable body for {command.name}: {exc}") from exc
    return Message(command, body)


class VersionMismatch(ProtocolError):
    """The peer speaks another version of the protocol."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"protocol version {version} is not supported (this peer speaks version {VERSION})"
        )
        self.version = version


# --------------------------------------------------------------------------- bodies
#
# Each body has a frozen dataclass, an ``encode_*`` helper and a ``parse_*`` function that
# validates types and raises ProtocolError, so garbage never gets past the decoder.


# A msgpack array as a body holds it: a list off the wire, or a tuple handed over in-process.
_ARRAYS: Final = (list, tuple)


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise ProtocolError(what)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float (NaN and infinities never make sense on this wire)."""
    kind = type(value)
    if kind is int:
        return True
    if kind is float or (isinstance(value, float) and not isinstance(value, bool)):
        return math.isfinite(value)  # type: ignore[arg-type]
    return isinstance(value, int) and not isinstance(value, bool)


def _optional_number(value: object) -> bool:
    return value is None or _is_number(value)


def _list_body(body: object, command: str) -> list[Any]:
    _expect(isinstance(body, list), f"{command} body must be a list")
    return body  # type: ignore[return-value]


def _map_body(body: object, command: str) -> dict[str, Any]:
    _expect(isinstance(body, dict), f"{command} body must be a map")
    return body  # type: ignore[return-value]


class Submission(NamedTuple):
    """One task as the client submits it (SUBMIT carries a list of these)."""

    task_id: str
    name: str
    priority: int
    payload: bytes
    max_retries: int
    retry_delay_s: float
    timeout_s: float | None
    submitted_at: float
    eta: float | None = None  # Unix seconds: not to start before (countdown, eta)
    deadline: float | None = None  # Unix seconds: expire if not started by then

    def to_wire(self) -> list[Any]:
        if self.eta is None and self.deadline is None:
            return list(self[:8])  # the 8-field item of clients without time options
        return list(self)


def parse_submit(body: object) -> list[Submission]:
    """All submissions of a SUBMIT body; any invalid item raises ProtocolError."""
    valid, rejected = split_submit(body)
    if rejected:
        raise ProtocolError(f"task {rejected[0][0]!r}: {rejected[0][1]}")
    return valid


def split_submit(body: object) -> tuple[list[Submission], list[tuple[str, str]]]:
    """The valid submissions of a SUBMIT body, and ``(task_id, reason)`` for invalid ones.

    An item too broken to name its task id makes the whole message malformed.
    """
    valid: list[Submission] = []
    rejected: list[tuple[str, str]] = []
    # (A plain list, the usual body, checked here: two calls less per message.)
    items = body if type(body) is list else _list_body(body, "SUBMIT")
    if len(items) > MAX_ITEMS_PER_MESSAGE:
        raise ProtocolError(f"SUBMIT carries more than {MAX_ITEMS_PER_MESSAGE} items")
    isfinite = math.isfinite
    for item in items:
        if type(item) in _ARRAYS and len(item) == 8:
            # The usual item (no time options, the types a client sends), checked inline:
            # the same conditions as _submission's, at a third of its cost. Anything else
            # (an int where a float is usual, any failed check) takes the full path below.
            task_id, name, priority, payload, max_retries, retry_delay, timeout, sent = item
            if (
                type(task_id) is str
                and 0 < len(task_id) <= MAX_TASK_ID_CHARS
                and (task_id.isascii() or len(task_id.encode()) <= MAX_TASK_ID_BYTES)
                and type(name) is str
                and 0 < len(name) <= MAX_TASK_NAME_CHARS
                and type(priority) is int
                and MIN_PRIORITY <= priority <= MAX_PRIORITY
                and type(payload) is bytes
                and type(max_retries) is int
                and 0 <= max_retries <= MAX_RETRIES
                and type(retry_delay) is float
                and retry_delay >= 0
                and isfinite(retry_delay)
                and (
                    timeout is None
                    or (type(timeout) is float and timeout > 0 and isfinite(timeout))
                )
                and type(sent) is float
                and isfinite(sent)
            ):
                valid.append(
                    Submission(
                        task_id, name, priority, payload, max_retries, retry_delay, timeout, sent
                    )
                )
                continue
        # (A tuple only from an in-process client, which keeps its submissions as tuples:
        # msgpack decodes arrays as lists.)
        _expect(
            isinstance(item, _ARRAYS) and len(item) in (8, 10),
            "SUBMIT item must have 8 or 10 fields",
        )
        _expect(isinstance(item[0], str), "SUBMIT item must start with a task id")
        try:
            valid.append(_submission(item))
        except ProtocolError as exc:
            rejected.append((item[0], str(exc)))
    return valid, rejected


def _submission(item: Sequence[Any]) -> Submission:
    task_id, name, priority, payload, max_retries, retry_delay, timeout, submitted_at = item[:8]
    eta = deadline = None
    if len(item) == 10:
        eta, deadline = item[8], item[9]
        _expect(eta is None or _is_number(eta), "bad eta")
        _expect(deadline is None or _is_number(deadline), "bad expires")
    # The usual 8-field item never gets here (split_submit checks it inline): this is the
    # full check, which says what was wrong.
    _expect(type(task_id) is str and 0 < len(task_id) <= MAX_TASK_ID_CHARS, "bad task id")
    _expect(len(task_id.encode()) <= MAX_TASK_ID_BYTES, "task id longer than 200 bytes")
    _expect(type(name) is str and 0 < len(name) <= MAX_TASK_NAME_CHARS, "bad task name")
    _expect(type(priority) is int and MIN_PRIORITY <= priority <= MAX_PRIORITY, "bad priority")
    _expect(type(payload) is bytes, "payload must be bytes")
    _expect(type(max_retries) is int and 0 <= max_retries <= MAX_RETRIES, "bad max_retries")
    _expect(_is_number(retry_delay) and retry_delay >= 0, "bad retry_delay")
    _expect(_optional_number(timeout) and (timeout is None or timeout > 0), "bad timeout")
    _expect(_is_number(submitted_at), "bad submitted_at")
    return Submission(
        task_id,
        name,
        priority,
        payload,
        max_retries,
        float(retry_delay),
        None if timeout is None else float(timeout),
        float(submitted_at),
        None if eta is None else float(eta),
        None if deadline is None else float(deadline),
    )


def parse_task_ids(body: object, command: str) -> list[str]:
    ids = _list_body(body, command)
    _expect(
        len(ids) <= MAX_ITEMS_PER_MESSAGE,
        f"{command} carries more than {MAX_ITEMS_PER_MESSAGE} ids",
    )
    for task_id in ids:
        _expect(isinstance(task_id, str), f"{command} items must be task ids")
    return ids


class Dispatch(NamedTuple):
    """One task attempt the broker hands to a node (TASKS carries a list of these)."""

    task_id: str
    attempt: int
    name: str
    payload: bytes
    timeout_s: float | None

    def to_wire(self) -> list[Any]:
        return list(self)


def parse_progress(body: object) -> list[tuple[str, int, list[Any]]]:
    """``[[task_id, attempt, current, total, message], ...]`` of a PROGRESS, as
    ``(task_id, attempt, [current, total, message])``."""
    out: list[tuple[str, int, list[Any]]] = []
    for item in _list_body(body, "PROGRESS"):
        _expect(type(item) is list and len(item) == 5, "PROGRESS items have 5 fields")
        task_id, attempt, current, total, message = item
        _expect(type(task_id) is str and _is_int(attempt), "bad PROGRESS task")
        _expect(_is_number(current) and _optional_number(total), "bad PROGRESS numbers")
        _expect(
            message is None or (isinstance(message, str) and len(message) <= 1000),
            "bad PROGRESS message",
        )
        out.append((task_id, attempt, [current, total, message]))
    return out


def parse_cancel(body: object) -> list[tuple[str, int]]:
    """``[[task_id, attempt], ...]`` of a CANCEL."""
    out: list[tuple[str, int]] = []
    for item in _list_body(body, "CANCEL"):
        _expect(
            type(item) is list and len(item) == 2 and type(item[0]) is str and _is_int(item[1]),
            "CANCEL items must be [task_id, attempt]",
        )
        out.append((item[0], item[1]))
    return out


def parse_tasks(body: object) -> list[Dispatch]:
    out: list[Dispatch] = []
    for item in body if type(body) is list else _list_body(body, "TASKS"):
        # (Each check inline, not through _expect: one call less per task.)
        if type(item) is not list or len(item) != 5:
            raise ProtocolError("TASKS item must have 5 fields")
        task_id, attempt, name, payload, timeout = item
        if not (
            type(task_id) is str
            and type(attempt) is int
            and type(name) is str
            and type(payload) is bytes
            and (timeout is None or _is_number(timeout))
        ):
            raise ProtocolError("bad TASKS item")
        out.append(Dispatch(task_id, attempt, name, payload, timeout))
    return out


class ErrorInfo(NamedTuple):
    """An exception as it travels: type name, message and formatted traceback."""

    exc_type: str
    message: str
    traceback: str | None

    def to_wire(self) -> list[Any]:
        return list(self)

    @classmethod
    def from_exception(cls, exc: BaseException, traceback: str | None = None) -> ErrorInfo:
        """The exception as it travels; never raises, whatever ``__str__`` does."""
        try:
            message = str(exc)
        except Exception:  # a task's exception class may have a broken __str__
            message = f"<unprintable {type(exc).__qualname__} object>"
        return cls.safe(type(exc).__qualname__, message, traceback)

    @classmethod
    def safe(cls, exc_type: object, message: object, traceback: object = None) -> ErrorInfo:
        """An ErrorInfo whose texts always encode (msgpack refuses lone surrogates) and stay
        within :data:`MAX_ERROR_TEXT_CHARS` (a traceback keeps its end, where the error is)."""
        text = safe_text(message)
        if len(text) > MAX_ERROR_TEXT_CHARS:
            text = text[:MAX_ERROR_TEXT_CHARS] + " [truncated]"
        trace = None if traceback is None else safe_text(traceback)
        if trace is not None and len(trace) > MAX_ERROR_TEXT_CHARS:
            trace = "[truncated]\n" + trace[-MAX_ERROR_TEXT_CHARS:]
        return cls(safe_text(exc_type)[:MAX_TASK_NAME_CHARS], text, trace)


def safe_text(value: object) -> str:
    """``value`` as a str that encodes as UTF-8 (lone surrogates become escapes)."""
    if type(value) is not str:
        try:
            value = str(value)
        except Exception:
            return "<unprintable value>"
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode()
    return value


class Outcome(NamedTuple):
    """The end of one attempt, reported by a node (RESULTS carries a list of these)."""

    task_id: str
    attempt: int
    value: bytes | None  # packed result when the attempt succeeded
    error: ErrorInfo | None  # set when it failed
    started_at: float
    finished_at: float

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_wire(self) -> list[Any]:
        return [
            self.task_id,
            self.attempt,
            self.value,
            None if self.error is None else list(self.error),
            self.started_at,
            self.finished_at,
        ]


def parse_results(body: object) -> list[Outcome]:
    out: list[Outcome] = []
    for item in body if type(body) is list else _list_body(body, "RESULTS"):
        # (A tuple only from an in-process node, which keeps its outcomes as tuples.)
        # (The checks of every item inline, not through _expect: calls saved per task.)
        if type(item) not in _ARRAYS or len(item) != 6:
            raise ProtocolError("RESULTS item must have 6 fields")
        task_id, attempt, value, error, started_at, finished_at = item
        if not (
            type(task_id) is str
            and type(attempt) is int
            and (value is None or type(value) is bytes)
            # (Floats, from every node: checked inline first, a call saved per time.)
            and (
                (type(started_at) is float and math.isfinite(started_at)) or _is_number(started_at)
            )
            and (
                (type(finished_at) is float and math.isfinite(finished_at))
                or _is_number(finished_at)
            )
        ):
            raise ProtocolError("bad RESULTS item")
        info: ErrorInfo | None = None
        if error is not None:
            _expect(type(error) in _ARRAYS and len(error) == 3, "bad RESULTS error")
            etype, message, tb = error
            _expect(isinstance(etype, str) and isinstance(message, str), "bad RESULTS error")
            _expect(tb is None or isinstance(tb, str), "bad RESULTS traceback")
            info = ErrorInfo(etype, message, tb)
        if (value is None) == (info is None):
            raise ProtocolError("RESULTS item needs a value or an error")
        out.append(Outcome(task_id, attempt, value, info, float(started_at), float(finished_at)))
    return out


class TaskLimits(NamedTuple):
    """A task's fleet-wide limits: at most ``rate_count`` starts in any ``rate_window_s``
    seconds, and at most ``max_concurrency`` running at once (None: no such limit)."""

    rate_count: int | None = None
    rate_window_s: float | None = None
    max_concurrency: int | None = None


_RATE_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate_limit(text: str) -> tuple[int, float]:
    """``"10/s"`` (also ``/m`` and ``/h``) as (10, 1.0); ValueError for anything else."""
    count, _, unit = text.partition("/") if isinstance(text, str) else ("", "", "")
    if not count.strip().isdigit() or unit.strip() not in _RATE_UNITS or int(count) < 1:
        raise ValueError(
            f"rate_limit must look like '10/s', '100/m' or '1000/h' with a count >= 1: {text!r}"
        )
    return int(count), _RATE_UNITS[unit.strip()]


@dataclass(frozen=True, slots=True)
class NodeReady:
    """A node's handshake: who it is, its capacity and the tasks it serves."""

    node_id: str
    hostname: str
    pid: int
    async_slots: int
    cpu_slots: int
    tasks: dict[str, SlotKind]
    running: list[tuple[str, int]]  # attempts it still holds after a reconnect
    limits: dict[str, TaskLimits] = field(default_factory=dict)  # of the limited tasks

    def to_wire(self) -> dict[str, Any]:
        return {
            "limits": {name: list(limit) for name, limit in self.limits.items()},
            "node_id": self.node_id,
            "hostname": self.hostname,
            "pid": self.pid,
            "async_slots": self.async_slots,
            "cpu_slots": self.cpu_slots,
            "tasks": {name: str(kind) for name, kind in self.tasks.items()},
            "running": [list(r) for r in self.running],
        }


def parse_ready(body: object) -> NodeReady:
    m = _map_body(body, "READY")
    try:
        node_id, hostname, pid = m["node_id"], m["hostname"], m["pid"]
        async_slots, cpu_slots, tasks, running = (
            m["async_slots"],
            m["cpu_slots"],
            m["tasks"],
            m["running"],
        )
    except KeyError as exc:
        raise ProtocolError(f"READY lacks {exc}") from None
    _expect(isinstance(node_id, str) and 0 < len(node_id) <= 200, "bad node_id")
    _expect(isinstance(hostname, str) and _is_int(pid), "bad hostname or pid")
    _expect(_is_int(async_slots) and 0 <= async_slots <= 1_000_000, "bad async_slots")
    _expect(_is_int(cpu_slots) and 0 <= cpu_slots <= 10_000, "bad cpu_slots")
    _expect(isinstance(tasks, dict) and len(tasks) <= 100_000, "bad tasks map")
    kinds: dict[str, SlotKind] = {}
    for name, kind in tasks.items():
        _expect(isinstance(name, str) and kind in ("async", "cpu"), "bad tasks entry")
        kinds[name] = SlotKind(kind)
    _expect(isinstance(running, list), "bad running list")
    held: list[tuple[str, int]] = []
    for item in running:
        _expect(isinstance(item, list) and len(item) == 2, "bad running entry")
        _expect(isinstance(item[0], str) and _is_int(item[1]), "bad running entry")
        held.append((item[0], item[1]))
    limits: dict[str, TaskLimits] = {}
    raw_limits = m.get("limits", {})
    _expect(isinstance(raw_limits, dict) and len(raw_limits) <= 100_000, "bad limits map")
    for name, limit in raw_limits.items():
        _expect(isinstance(name, str) and isinstance(limit, list) and len(limit) == 3, "bad limit")
        count, window, concurrency = limit
        _expect(count is None or (_is_int(count) and count >= 1), "bad rate limit count")
        _expect(window is None or (_is_number(window) and window > 0), "bad rate limit window")
        _expect((count is None) == (window is None), "bad rate limit")
        _expect(concurrency is None or (_is_int(concurrency) and concurrency >= 1), "bad limit")
        limits[name] = TaskLimits(count, None if window is None else float(window), concurrency)
    return NodeReady(node_id, hostname, pid, async_slots, cpu_slots, kinds, held, limits)


@dataclass(frozen=True, slots=True)
class Welcome:
    """The broker's answer to HELLO and READY."""

    broker_id: str
    publish_endpoint: str
    heartbeat_interval_ms: int
    heartbeat_liveness: int
    max_message_bytes: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "broker_id": self.broker_id,
            "publish": self.publish_endpoint,
            "heartbeat_ms": self.heartbeat_interval_ms,
            "liveness": self.heartbeat_liveness,
            "max_message_bytes": self.max_message_bytes,
        }


def parse_welcome(body: object) -> Welcome:
    m = _map_body(body, "WELCOME")
    try:
        welcome = Welcome(
            m["broker_id"], m["publish"], m["heartbeat_ms"], m["liveness"], m["max_message_bytes"]
        )
    except KeyError as exc:
        raise ProtocolError(f"WELCOME lacks {exc}") from None
    _expect(isinstance(welcome.publish_endpoint, str), "bad publish endpoint")
    _expect(_is_int(welcome.heartbeat_interval_ms) and welcome.heartbeat_interval_ms > 0, "bad hb")
    _expect(_is_int(welcome.heartbeat_liveness) and welcome.heartbeat_liveness > 0, "bad liveness")
    _expect(_is_int(welcome.max_message_bytes), "bad max_message_bytes")
    return welcome


def parse_state(body: object) -> tuple[int, list[Any], bool, list[str]]:
    """``[request_id, [record, ...], more, [omitted id, ...]]`` of a STATE piece.

    A GET is answered by one or more STATE pieces, each within the message size limit;
    ``more`` is true on all but the last. Unknown ids are absent; ``omitted`` (last piece
    only) lists ids whose records did not fit in the reply's bound: ask for them again.
    """
    items = _list_body(body, "STATE")
    _expect(len(items) == 4, "STATE body must be [request_id, records, more, omitted]")
    request_id, records, more, omitted = items
    _expect(_is_int(request_id), "bad STATE request id")
    _expect(isinstance(records, list), "STATE records must be a list")
    _expect(isinstance(more, bool), "STATE more must be a bool")
    return request_id, records, more, parse_task_ids(omitted, "STATE")


# The code an ACK carries when a task id is already taken by another call.
ACK_CONFLICT: Final = "conflict"


@dataclass(frozen=True, slots=True)
class Ack:
    """The broker's verdict on one submitted task: ``error`` is None when accepted.

    ``code`` classifies a refusal for the client (:data:`ACK_CONFLICT`), or is None.
    """

    task_id: str
    error: str | None
    code: str | None = None


def parse_ack(body: object) -> list[Ack]:
    out: list[Ack] = []
    for item in _list_body(body, "ACK"):
        _expect(isinstance(item, list) and len(item) in (2, 3), "bad ACK item")
        _expect(isinstance(item[0], str), "bad ACK task id")
        _expect(item[1] is None or isinstance(item[1], str), "bad ACK error")
        code = item[2] if len(item) == 3 else None
        _expect(code is None or isinstance(code, str), "bad ACK code")
        out.append(Ack(item[0], item[1], code))
    return out


def parse_admin(body: object) -> tuple[int, str, dict[str, Any]]:
    """``[request_id, verb, args]`` of an ADMIN request."""
    items = _list_body(body, "ADMIN")
    _expect(len(items) == 3, "ADMIN body must be [id, verb, args]")
    request_id, verb, args = items
    _expect(_is_int(request_id), "bad ADMIN request id")
    _expect(isinstance(verb, str), "ADMIN verb must be a string")
    _expect(isinstance(args, dict), "ADMIN args must be a map")
    return request_id, verb, args


def parse_admin_reply(body: object) -> tuple[int, str | None, Any]:
    """``[request_id, error, result]`` of an ADMIN_REPLY."""
    items = _list_body(body, "ADMIN_REPLY")
    _expect(len(items) == 3, "bad ADMIN_REPLY body")
    request_id, error, result = items
    _expect(_is_int(request_id), "bad ADMIN_REPLY request id")
    _expect(error is None or isinstance(error, str), "bad ADMIN_REPLY error")
    return request_id, error, result


def parse_error(body: object) -> tuple[str, str]:
    m = _map_body(body, "ERROR")
    code, message = m.get("code"), m.get("message")
    _expect(isinstance(code, str) and isinstance(message, str), "bad ERROR body")
    return code, message  # type: ignore[return-value]


# --------------------------------------------------------------------------- task records

# The public view of a task, as stored, published on the PUB socket and returned by GET.
RECORD_FIELDS: Final = (
    "task_id",
    "task_name",
    "status",
    "result",  # packed value (bytes) or None
    "error",  # "Type: message" or None
    "traceback",
    "retries",
    "submitted_at",
    "started_at",
    "finished_at",
    "eta",  # when a SCHEDULED task is due (Unix seconds) or None
    "progress",  # the latest [current, total, message] its task reported, or None
)


_RECORD_KEYS: Final = frozenset(RECORD_FIELDS)
_STATUS_VALUES: Final = frozenset(status.value for status in TaskStatus)


def _optional_text(value: object) -> bool:
    return value is None or type(value) is str


def parse_record(body: object) -> dict[str, Any]:
    """Validate one public task record (from STATE or a RESULT publication)."""
    m = _map_body(body, "record")
    missing = _RECORD_KEYS.difference(m.keys())
    _expect(not missing, f"record lacks {sorted(missing)}")
    status = m["status"]
    _expect(type(m["task_id"]) is str and type(m["task_name"]) is str, "bad record ids")
    _expect(type(status) is str and status in _STATUS_VALUES, "bad record status")
    _expect(m["result"] is None or type(m["result"]) is bytes, "bad record result")
    _expect(_is_int(m["retries"]), "bad record retries")
    _expect(_optional_text(m["error"]) and _optional_text(m["traceback"]), "bad record error")
    _expect(
        _optional_number(m["submitted_at"])
        and _optional_number(m["started_at"])
        and _optional_number(m["finished_at"])
        and _optional_number(m["eta"]),
        "bad record times",
    )
    progress = m["progress"]
    _expect(
        progress is None
        or (type(progress) is list and len(progress) == 3 and _is_number(progress[0])),
        "bad record progress",
    )
    return m
