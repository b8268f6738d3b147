"""The inline fast path of split_submit accepts and builds exactly what the full check of
every field (protocol._submission) does, for any 8-field item."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from flowrra import protocol
from flowrra.errors import ProtocolError

numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.booleans(),
    st.none(),
    st.sampled_from([0.0, -0.0, 1.0, 1e-9, math.inf, -math.inf, math.nan]),
)
texts = st.one_of(
    st.text(max_size=3),
    st.text(min_size=190, max_size=210),
    st.sampled_from(["t1", "x" * 200, "x" * 201, "€" * 66, "€" * 67, ""]),
    st.integers(),
    st.binary(max_size=3),
)
items = st.tuples(
    texts,
    texts,
    st.one_of(st.integers(min_value=-(2**32), max_value=2**32), st.booleans(), numbers),
    st.one_of(st.binary(max_size=4), st.text(max_size=2), st.none()),
    st.one_of(st.integers(min_value=-2, max_value=1002), st.booleans(), numbers),
    numbers,
    numbers,
    numbers,
)


def reference(item: list[Any]) -> tuple[list[protocol.Submission], list[str]]:
    try:
        return [protocol._submission(item)], []
    except ProtocolError:
        return [], [item[0]]


@given(items, st.booleans())
def test_the_fast_path_agrees_with_the_full_check(fields: tuple[Any, ...], as_list: bool) -> None:
    item: Any = list(fields) if as_list else fields
    if not isinstance(item[0], str):
        return  # the whole message is malformed then, on either path
    valid, rejected = protocol.split_submit([item])
    expected_valid, expected_rejected = reference(list(fields))
    assert [tuple(s) for s in valid] == [tuple(s) for s in expected_valid]
    assert [task_id for task_id, _ in rejected] == expected_rejected
    for sub in valid:  # the types the broker stores
        assert type(sub.retry_delay_s) is float and type(sub.submitted_at) is float
        assert sub.timeout_s is None or type(sub.timeout_s) is float


GOOD = ("t1", "mod.add", 0, b"\x90", 3, 1.0, None, 1700000000.5)


def test_chosen_items_near_each_bound_agree_with_the_full_check() -> None:
    variants: list[tuple[Any, ...]] = [GOOD]
    for index, values in enumerate(
        [
            ["", "x" * 200, "x" * 201, "€" * 66, "€" * 67],
            ["", "n" * 500, "n" * 501],
            [-(2**31), 2**31 - 1, 2**31, True, 1.0],
            [b"", "x", None],
            [0, 1000, 1001, -1, True],
            [0.0, -0.0, 2, -1.0, math.inf, math.nan],
            [None, 0.5, 0.0, -1.0, 2, math.inf, math.nan],
            [0.0, 1, math.inf, math.nan, None],
        ]
    ):
        for value in values:
            item = list(GOOD)
            item[index] = value
            variants.append(tuple(item))
    for fields in variants:
        for item in (fields, list(fields)):
            valid, rejected = protocol.split_submit([item])
            expected_valid, expected_rejected = reference(list(fields))
            assert [tuple(s) for s in valid] == [tuple(s) for s in expected_valid], fields
            assert [task_id for task_id, _ in rejected] == expected_rejected, fields
    (accepted,), _ = protocol.split_submit([GOOD])
    assert accepted == protocol.Submission(*GOOD)
