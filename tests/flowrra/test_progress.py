"""report_progress: validation and coalescing, with an injected clock."""

from __future__ import annotations

import pytest

from flowrra import report_progress
from flowrra.progress import Progress, Throttle, current_sink


def test_reports_are_coalesced_and_the_latest_wins() -> None:
    now = [0.0]
    sent: list[Progress] = []
    throttle = Throttle(sent.append, interval_s=0.1, clock=lambda: now[0])
    for step in range(100):  # 100 reports within 50 ms
        now[0] = step * 0.0005
        throttle(Progress(step))
    assert sent == [Progress(0)]
    now[0] = 0.2
    throttle(Progress(100))
    assert sent == [Progress(0), Progress(100)]
    now[0] = 0.21
    throttle(Progress(101, 200, "almost"))
    throttle.flush()  # at the end of a call, what was held back goes out
    assert sent[-1] == Progress(101, 200, "almost")


def test_bad_reports_raise_and_outside_a_task_nothing_happens() -> None:
    report_progress(1, 10, "fine")  # no task running here: ignored
    for args in (("1",), (float("nan"),), (1, float("inf")), (True,)):
        with pytest.raises((TypeError, ValueError)):
            report_progress(*args)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        report_progress(1, 2, 3)  # type: ignore[arg-type]
    got: list[Progress] = []
    token = current_sink.set(got.append)
    try:
        report_progress(3, None, "x" * 5000)
    finally:
        current_sink.reset(token)
    assert got[0].current == 3 and len(got[0].message or "") == 1000
