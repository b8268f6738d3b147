"""Fleet-wide limits over two real nodes: ``rate_limit="5/s"`` and ``max_concurrency=2``.

The broker enforces both across nodes (broker/limits.py); here the tasks record, on the
shared clock of this machine, when each run really started (and ended), and the test checks
those times.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from flowrra import Flowrra, TaskStatus
from tests.apps import workflow_app as wf
from tests.apps.workflow_app import markers
from tests.conftest import Launcher, remote_twin

APP = "tests.apps.workflow_app:app"

RATE_COUNT, RATE_WINDOW_S = 5, 1.0  # wf.rated is rate_limit="5/s"
RATE_TASKS = 20
# The 90 % throughput bound. The limit is a strict sliding window: at most RATE_COUNT starts
# in any RATE_WINDOW_S. At the full rate the first RATE_COUNT start at once, and each later
# start waits for the window of the one RATE_COUNT places before it to close (the broker
# wakes when a window opens, it does not poll), so start i (from 0) is due
# floor(i / RATE_COUNT) windows after the first one: the last of 20 is due
# (20 - 5) / 5 = 3 windows = 3.0 s after the first start. At 90 % of the rate that span
# stretches to 3.0 / 0.9 = 3.33 s. On top of that the tolerance covers what is not the
# limiter's doing: the wake-up, the tick, the hop to a node and the task's start, paid once
# per window (three times), each normally well under 10 ms but tens of ms on a loaded CI box.
THROUGHPUT_SPAN_S = ((RATE_TASKS - RATE_COUNT) / RATE_COUNT) * RATE_WINDOW_S / 0.9
THROUGHPUT_TOLERANCE_S = 0.3

# Dispatch jitter the guard check tolerates (see the strictness test's xfail reason).
JITTER_ALLOWANCE_S = 0.05
STRICT_ROUNDS = 4

CAP = 2  # wf.capped is max_concurrency=2
CAPPED_TASKS = 8
CAPPED_DELAY_S = 0.3


def overfull_windows(starts: list[float], window_s: float) -> list[list[float]]:
    """Windows of ``window_s`` beginning at a start that hold more than RATE_COUNT starts. A
    window beginning elsewhere holds no more starts than the one beginning at its first start,
    so checking these covers every window."""
    starts = sorted(starts)
    found = []
    for first in starts:
        inside = [s for s in starts if first <= s < first + window_s]
        if len(inside) > RATE_COUNT:
            found.append(inside)
    return found


async def run_rated(client: Flowrra, marker_dir: Path) -> list[float]:
    """Submit RATE_TASKS runs of ``wf.rated`` at once; the times they really started."""
    marker_dir.mkdir()
    ids = await client.submit_many(
        wf.rated, [(str(marker_dir), f"r{i}") for i in range(RATE_TASKS)]
    )
    results = await asyncio.gather(*(client.wait_for_result(t, timeout=15) for t in ids))
    assert [r.status for r in results] == [TaskStatus.SUCCESS] * RATE_TASKS
    assert len(markers(marker_dir, "rated")) == RATE_TASKS  # each ran once
    return sorted(float(r.result) for r in results)


async def test_a_rate_limit_reaches_90_percent_of_the_rate_across_two_nodes(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker()
    nodes = launcher.nodes(broker, APP, count=2)
    client = remote_twin(wf.app, broker)
    async with client:
        starts = await run_rated(client, tmp_path / "runs")
    assert {m["pid"] for m in markers(tmp_path / "runs", "rated")} == {n.pid for n in nodes}

    # The throughput: at least 90 % of the rate.
    span = starts[-1] - starts[0]
    assert span <= THROUGHPUT_SPAN_S + THROUGHPUT_TOLERANCE_S, (span, starts)

    # Not the strictness assertion (that is the next test, which fails today), but a guard
    # that still catches a limiter letting whole bursts through (a token bucket, a window
    # per node, a window that forgets): with the windows shortened by a few milliseconds of
    # dispatch jitter, none holds more than RATE_COUNT starts.
    assert overfull_windows(starts, RATE_WINDOW_S - JITTER_ALLOWANCE_S) == [], starts


async def test_a_rate_limit_is_strict_on_the_real_start_times(
    launcher: Launcher, tmp_path: Path
) -> None:
    broker = launcher.broker()
    launcher.nodes(broker, APP, count=2)
    client = remote_twin(wf.app, broker)
    starts: list[float] = []
    async with client:
        # A few rounds, stopping at the first overfull window: the defect shows in most
        # single rounds, and a clean pass of them all (once fixed) takes under 15 s.
        for round_ in range(STRICT_ROUNDS):
            starts += await run_rated(client, tmp_path / f"round{round_}")
            if overfull_windows(starts, RATE_WINDOW_S):
                break
    # Strict: no window of RATE_WINDOW_S (any window, across the rounds too, since the limit
    # holds across all time) holds more than RATE_COUNT real starts.
    assert overfull_windows(starts, RATE_WINDOW_S) == [], starts


async def test_a_concurrency_cap_holds_across_two_nodes(launcher: Launcher, tmp_path: Path) -> None:
    broker = launcher.broker()
    nodes = launcher.nodes(broker, APP, count=2)
    client = remote_twin(wf.app, broker)
    async with client:
        ids = await client.submit_many(
            wf.capped,
            [(str(tmp_path), f"c{i}", CAPPED_DELAY_S) for i in range(CAPPED_TASKS)],
        )
        results = await asyncio.gather(*(client.wait_for_result(t, timeout=15) for t in ids))
    assert [r.status for r in results] == [TaskStatus.SUCCESS] * CAPPED_TASKS
    runs = [(r.result["start"], r.result["end"]) for r in results]
    assert len(markers(tmp_path, "capped-start")) == CAPPED_TASKS  # each ran once
    assert len(markers(tmp_path, "capped-end")) == CAPPED_TASKS
    assert {m["pid"] for m in markers(tmp_path, "capped-start")} == {n.pid for n in nodes}

    # The most runs at once is reached at some run's start: count, at each start, the runs
    # that had started and not yet ended (a run that ended exactly then has left).
    at_once = [sum(1 for s, e in runs if s <= start < e) for start, _ in runs]
    assert max(at_once) <= CAP, sorted(runs)
    assert max(at_once) == CAP  # the cap is used, not just respected
