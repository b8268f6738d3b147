"""TaskResult.from_record builds its result through a mutable twin class (result._Builder):
what it returns must be exactly what TaskResult(...) makes."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest

from flowrra import result as result_module
from flowrra.protocol import TaskStatus, pack_value
from flowrra.result import TaskResult


def record(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "task_id": "t1",
        "task_name": "mod.add",
        "status": "success",
        "result": pack_value([1, {"a": 2}]),
        "error": None,
        "traceback": None,
        "retries": 1,
        "submitted_at": 1_700_000_000.25,
        "started_at": 1_700_000_001.5,
        "finished_at": 1_700_000_002.75,
        "eta": None,
        "progress": [3, 4, "x"],
    }
    base.update(changes)
    return base


def test_the_twin_is_in_use() -> None:
    assert result_module._Builder is not None


@pytest.mark.parametrize(
    "changes",
    [{}, {"status": "failed", "result": None, "error": "E: m", "traceback": "tb"}, {"eta": 1.0}],
)
def test_from_record_makes_a_frozen_task_result_like_the_constructor(
    changes: dict[str, Any],
) -> None:
    built = TaskResult.from_record(record(**changes))
    assert type(built) is TaskResult
    direct = TaskResult(*(getattr(built, f.name) for f in dataclasses.fields(TaskResult)))
    assert built == direct and repr(built) == repr(direct)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.retries = 5  # type: ignore[misc]
    assert dataclasses.replace(built, retries=2).retries == 2
    assert dataclasses.asdict(built) == dataclasses.asdict(direct)
    assert pickle.loads(pickle.dumps(built)) == direct
    assert built.status is TaskStatus(record(**changes)["status"])


def test_equal_results_hash_alike() -> None:
    one = TaskResult.from_record(record(result=pack_value(3), progress=None))
    assert hash(one) == hash(dataclasses.replace(one))


def test_a_subclass_is_built_by_its_own_constructor() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Mine(TaskResult):
        pass

    built = Mine.from_record(record())
    assert type(built) is Mine and built.result == [1, {"a": 2}]
