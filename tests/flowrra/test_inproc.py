"""The in-process hub: unencoded hand-over of the hot messages, and the encoded fallback."""

from __future__ import annotations

from typing import Any

from flowrra.inproc import InprocHub
from flowrra.protocol import Command, decode, encode
from flowrra.transport import Frames, Wakeup


def _hub() -> tuple[InprocHub, Wakeup]:
    wakeup = Wakeup()
    return InprocHub(wakeup), wakeup


def test_a_body_goes_to_the_broker_unencoded_when_it_can_take_it() -> None:
    hub, _ = _hub()
    taken: list[tuple[bytes, Command, Any]] = []

    def process(peer: bytes, command: Command, body: Any) -> bool:
        taken.append((peer, command, body))
        return True

    hub.process_body = process
    link = hub.link(Wakeup())
    body = [["t-1", "mod.fn"]]
    assert link.send_body(Command.SUBMIT, body)
    assert len(taken) == 1 and taken[0][1:] == (Command.SUBMIT, body)
    assert taken[0][2] is body  # not encoded, not copied
    assert hub.drain(10) == ([], [])


def test_a_body_the_broker_cannot_take_now_is_queued_encoded_in_order() -> None:
    hub, wakeup = _hub()
    hub.process_body = lambda peer, command, body: False  # busy on this stack
    link = hub.link(Wakeup())
    link.send(encode(Command.HEARTBEAT))
    link.send_body(Command.RESULTS, [["t-1", 1, b"\x01", None, 1.0, 2.0]])
    messages, topics = hub.drain(10)
    assert topics == []
    assert [decode(frames).command for _, frames in messages] == [
        Command.HEARTBEAT,
        Command.RESULTS,
    ]
    assert decode(messages[1][1]).body == [["t-1", 1, b"\x01", None, 1.0, 2.0]]
    assert wakeup._flag  # the broker's loop picks them up


def test_without_a_body_processor_bodies_travel_encoded() -> None:
    hub, _ = _hub()
    link = hub.link(Wakeup())
    link.send_body(Command.SUBMIT, [])
    ((_, frames),), _ = hub.drain(10)
    assert decode(frames).command is Command.SUBMIT


def test_the_broker_hands_bodies_to_peers_that_take_them_and_frames_to_others() -> None:
    hub, _ = _hub()
    bodies: list[tuple[Command, Any]] = []
    frames_in: list[Frames] = []
    direct, framed = hub.link(Wakeup()), hub.link(Wakeup())
    direct.push_bodies_to(lambda command, body: bodies.append((command, body)))
    framed.push_to(frames_in.append)
    peers = list(hub._links)
    assert hub.takes_bodies(peers[0]) and not hub.takes_bodies(peers[1])
    assert hub.send_body(peers[0], Command.ACK, [["t-1", None]])
    assert hub.send_body(peers[1], Command.ACK, [["t-2", None]])
    assert bodies == [(Command.ACK, [["t-1", None]])]
    assert [decode(f).body for f in frames_in] == [[["t-2", None]]]
    direct.close()
    assert not hub.send_body(peers[0], Command.ACK, [])  # gone
    assert not hub.takes_bodies(peers[0])


def test_publications_reach_matching_subscribers_as_bodies_or_frames() -> None:
    hub, _ = _hub()
    got: list[tuple[bytes, Command, Any]] = []
    frames_in: list[Frames] = []
    direct = hub.subscriber(hub.publish_endpoint, Wakeup())
    direct.push_bodies_to(lambda topic, command, body: got.append((topic, command, body)))
    direct.subscribe(b"abc")
    framed = hub.subscriber(hub.publish_endpoint, Wakeup())
    framed.push_to(frames_in.append)
    framed.subscribe(b"abc1")
    other = hub.subscriber(hub.publish_endpoint, Wakeup())
    other.subscribe(b"zzz")
    records = [{"task_id": "abc123"}]
    hub.publish_body(b"abc123", Command.RESULT, records)
    assert got == [(b"abc123", Command.RESULT, records)]
    assert len(frames_in) == 1 and frames_in[0][0] == b"abc123"
    assert decode(frames_in[0][1:]).body == records
    assert other.drain(10) == []
