"""A tick's results for one client leave in RESULT publications of at most
PUBLICATION_RECORDS records each, in order, so small results stay under pyzmq's zero-copy
threshold (copied, not tracked)."""

from __future__ import annotations

from flowrra.broker.core import PUBLICATION_RECORDS, Outbox
from flowrra.broker.endpoint import LARGE_FRAME_BYTES
from flowrra.protocol import Command, decode


def test_results_are_published_in_bounded_pieces_in_order() -> None:
    outbox = Outbox()
    topic = b"0123456789abcdef"
    count = 2 * PUBLICATION_RECORDS + 7
    for i in range(count):
        outbox.results[topic].append({"task_id": f"0123456789abcdef{i:016x}", "result": b"x"})
    _, publications = outbox.take()
    assert len(publications) == 3
    seen = []
    for frames in publications:
        assert frames[0] == topic
        assert all(len(frame) < LARGE_FRAME_BYTES for frame in frames)
        message = decode(frames[1:])
        assert message.command is Command.RESULT
        assert len(message.body) <= PUBLICATION_RECORDS
        seen.extend(record["task_id"] for record in message.body)
    assert seen == [f"0123456789abcdef{i:016x}" for i in range(count)]
