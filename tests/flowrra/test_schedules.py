"""Schedule slots, with the time passed in: cron semantics, DST, anchoring, catch-up."""

from __future__ import annotations

import datetime as dt

import pytest

from flowrra.schedules import (
    MISSED_AFTER_S,
    CatchUp,
    ScheduleType,
    Timetable,
    check_cron,
    due_slots,
    schedule_id,
    slot_task_id,
    time_zone,
)

BERLIN = time_zone("Europe/Berlin")
NEW_YORK = time_zone("America/New_York")


def at(*fields: int, tz: dt.tzinfo = dt.UTC) -> float:
    return dt.datetime(*fields, tzinfo=tz).timestamp()  # type: ignore[misc]


def slots(table: Timetable, after: float, count: int, tz: dt.tzinfo = dt.UTC) -> list[str]:
    out = []
    for _ in range(count):
        after = table.slot_after(after)  # type: ignore[assignment]
        out.append(dt.datetime.fromtimestamp(after, tz).strftime("%Y-%m-%d %H:%M %z"))
    return out


def cron(expression: str, tz: str = "UTC") -> Timetable:
    return Timetable(ScheduleType.CRON, expression, tz)


def test_ranges_steps_and_names() -> None:
    table = cron("*/20 9-10 * * mon-fri")
    assert slots(table, at(2026, 12, 4, 10, 30), 4) == [  # a Friday
        "2026-12-04 10:40 +0000",
        "2026-12-07 09:00 +0000",  # the weekend is skipped
        "2026-12-07 09:20 +0000",
        "2026-12-07 09:40 +0000",
    ]
    assert slots(cron("0 0 1 jan,jul *"), at(2026, 2, 1), 2) == [
        "2026-07-01 00:00 +0000",
        "2027-01-01 00:00 +0000",
    ]


def test_day_of_month_or_day_of_week() -> None:
    # Both restricted: a day matches when either does (the 13th, or any Friday).
    days = slots(cron("0 12 13 * fri"), at(2026, 11, 1), 5)
    assert days == [
        "2026-11-06 12:00 +0000",
        "2026-11-13 12:00 +0000",  # a Friday the 13th runs once
        "2026-11-20 12:00 +0000",
        "2026-11-27 12:00 +0000",
        "2026-12-04 12:00 +0000",
    ]
    assert "2026-12-13 12:00 +0000" in slots(cron("0 12 13 * fri"), at(2026, 12, 1), 3)


def test_month_ends() -> None:
    assert slots(cron("0 0 31 * *"), at(2026, 1, 1), 3) == [
        "2026-01-31 00:00 +0000",
        "2026-03-31 00:00 +0000",  # February and April have no 31st
        "2026-05-31 00:00 +0000",
    ]
    assert slots(cron("0 0 29 2 *"), at(2026, 1, 1), 1) == ["2028-02-29 00:00 +0000"]


def test_a_skipped_wall_time_runs_once_at_the_first_valid_instant() -> None:
    # Europe/Berlin springs forward on 2026-03-29 from 02:00 to 03:00.
    daily = cron("30 2 * * *", "Europe/Berlin")
    assert slots(daily, at(2026, 3, 28, 12, tz=BERLIN), 3, BERLIN) == [
        "2026-03-29 03:00 +0200",
        "2026-03-30 02:30 +0200",
        "2026-03-31 02:30 +0200",
    ]
    quarter = cron("*/15 * * * *", "Europe/Berlin")
    assert slots(quarter, at(2026, 3, 29, 1, 40, tz=BERLIN), 3, BERLIN) == [
        "2026-03-29 01:45 +0100",
        "2026-03-29 03:00 +0200",  # 02:00, 02:15, 02:30 and 02:45 do not exist: one run
        "2026-03-29 03:15 +0200",
    ]


def test_a_repeated_wall_time_runs_once() -> None:
    # America/New_York falls back on 2026-11-01 from 02:00 EDT to 01:00 EST.
    table = cron("30 1 * * *", "America/New_York")
    runs = slots(table, at(2026, 10, 31, 12, tz=NEW_YORK), 3, NEW_YORK)
    assert runs == [
        "2026-11-01 01:30 -0400",  # the first 01:30 only
        "2026-11-02 01:30 -0500",
        "2026-11-03 01:30 -0500",
    ]


def test_interval_slots_are_anchored_and_do_not_drift() -> None:
    table = Timetable(ScheduleType.INTERVAL, 10.0, start=1000.0)
    assert table.slot_after(999.0) == 1000.0
    assert table.slot_after(1000.0) == 1010.0
    assert table.slot_after(1017.3) == 1020.0  # late fires keep the grid
    assert table.slot_after(1_000_000.5) == 1_000_010.0
    assert table.latest_slot(1017.3) == 1010.0 and table.latest_slot(999.0) is None


def test_once() -> None:
    table = Timetable(ScheduleType.ONCE, 500.0)
    assert table.slot_after(10.0) == 500.0 and table.slot_after(500.0) is None
    assert table.period_after(500.0) is None


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (CatchUp.ONCE, [1050.0]),
        (CatchUp.SKIP, []),
        (CatchUp.ALL, [1000.0, 1010.0, 1020.0, 1030.0, 1040.0, 1050.0]),
    ],
)
def test_catch_up_after_an_outage(mode: CatchUp, expected: list[float]) -> None:
    table = Timetable(ScheduleType.INTERVAL, 10.0, start=1000.0)
    due, following = due_slots(table, 1000.0, 1050.0 + MISSED_AFTER_S + 1, mode)
    assert due == expected and following == 1060.0


def test_on_time_slots_run_in_every_mode() -> None:
    table = Timetable(ScheduleType.INTERVAL, 10.0, start=1000.0)
    for mode in CatchUp:
        assert due_slots(table, 1010.0, 1010.2, mode) == ([1010.0], 1020.0)
        assert due_slots(table, 1010.0, 1009.0, mode) == ([], 1010.0)


def test_bad_schedules_are_refused_clearly() -> None:
    for bad in ("61 * * * *", "* * *", "0 0 * * * *", "nonsense", ""):
        with pytest.raises(ValueError, match="cron"):
            check_cron(bad)
    for interval in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="interval"):
            Timetable(ScheduleType.INTERVAL, interval)
    with pytest.raises(ValueError, match="unknown time zone"):
        Timetable(ScheduleType.CRON, "* * * * *", "Mars/Olympus")


def test_ids_are_deterministic() -> None:
    a = schedule_id("t", ScheduleType.CRON, "* * * * *", b"args", "UTC")
    assert a == schedule_id("t", ScheduleType.CRON, "* * * * *", b"args", "UTC")
    assert a != schedule_id("t", ScheduleType.CRON, "* * * * *", b"other", "UTC")
    assert slot_task_id(a, 12.5) == f"{a}@12500"
