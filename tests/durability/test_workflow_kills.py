"""Chains, groups and chords over two real nodes, with the broker killed (``kill -9``) and
restarted on the same data directory and ports in the middle of them.

Every member waits for its own release file, so the test decides which members finish before
the kill, which while the broker is down (their nodes keep the outcomes and report them when
they register again) and which after the restart. What must hold: each step is released
exactly once, with every result of the step before it in call order; each callback runs
exactly once (it leaves a marker per run); nothing runs twice (the nodes adopt their attempts).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from flowrra import Flowrra, TaskStatus, call
from tests.apps import workflow_app as wf
from tests.apps.workflow_app import markers
from tests.conftest import BrokerProcess, Launcher, remote_twin, wait_until

APP = "tests.apps.workflow_app:app"


class Dirs:
    def __init__(self, tmp_path: Path) -> None:
        self.markers = tmp_path / "markers"
        self.release = tmp_path / "release"
        self.markers.mkdir()
        self.release.mkdir()
        self.m = str(self.markers)
        self.r = str(self.release)

    def let_go(self, *keys: str) -> None:
        """Create the release files of ``keys``: those tasks may finish."""
        for key in keys:
            (self.release / key).touch()

    def count(self, what: str) -> int:
        return len(markers(self.markers, what))

    async def wait_for(self, what: str, count: int = 1, timeout: float = 15.0) -> None:
        await wait_until(lambda: self.count(what) >= count, timeout, f"{count} x {what} marker(s)")


@pytest.fixture
def dirs(tmp_path: Path) -> Dirs:
    return Dirs(tmp_path)


def fleet(launcher: Launcher) -> BrokerProcess:
    """A durable broker and two nodes serving the workflow app."""
    broker = launcher.broker(durability="full")
    launcher.nodes(broker, APP, count=2)
    return broker


def kill(broker: BrokerProcess) -> None:
    broker.process.kill9()


async def succeeded(client: Flowrra, task_ids: list[str], timeout: float = 15.0) -> list[object]:
    results = await asyncio.gather(*(client.wait_for_result(t, timeout=timeout) for t in task_ids))
    assert [r.status for r in results] == [TaskStatus.SUCCESS] * len(task_ids), results
    return [r.result for r in results]


def ran_once(dirs: Dirs, keys: list[str]) -> None:
    starts = {key: dirs.count(f"{key}-start") for key in keys}
    assert starts == dict.fromkeys(keys, 1), starts


def node_pids(dirs: Dirs, keys: list[str]) -> set[int]:
    return {int(m["pid"]) for key in keys for m in markers(dirs.markers, f"{key}-start")}


async def test_a_chain_a_group_and_a_chord_over_two_nodes(launcher: Launcher, dirs: Dirs) -> None:
    """The baseline, without a kill: each kind over the same two-node fleet."""
    broker = fleet(launcher)
    client = remote_twin(wf.app, broker)
    keys = [f"k{i}" for i in range(8)]
    dirs.let_go(*keys, "c0", "c1", "c2")
    async with client:
        last = await client.chain(
            call(wf.link, [], dirs.m, "c0", dirs.r),
            call(wf.link, dirs.m, "c1", dirs.r),
            call(wf.link, dirs.m, "c2", dirs.r),
        )
        group = await client.group(*(call(wf.member, dirs.m, k, dirs.r, k) for k in keys[:4]))
        callback = await client.chord(
            [call(wf.member, dirs.m, k, dirs.r, {"key": k}) for k in keys[4:]],
            call(wf.collect, dirs.m),
        )
        assert await succeeded(client, [last]) == [["c0", "c1", "c2"]]
        grouped = await client.wait_for_group(group, timeout=15)
        assert [r.result for r in grouped] == keys[:4]
        assert await succeeded(client, [callback]) == [[{"key": k} for k in keys[4:]]]
    assert dirs.count("callback") == 1
    ran_once(dirs, [*keys, "c0", "c1", "c2"])
    assert len(node_pids(dirs, keys)) == 2  # the members ran on both nodes


async def test_a_chain_survives_a_kill_while_a_link_runs(launcher: Launcher, dirs: Dirs) -> None:
    broker = fleet(launcher)
    client = remote_twin(wf.app, broker)
    links = ["c0", "c1", "c2", "c3"]
    async with client:
        last = await client.chain(
            call(wf.link, [], dirs.m, "c0", dirs.r).with_options(task_id="c0"),
            *(call(wf.link, dirs.m, key, dirs.r) for key in links[1:]),
        )
        dirs.let_go("c0")
        await dirs.wait_for("c1-start")  # c0 is done and c1 was handed its result
        # c1 is dispatched before the commit of the tick that records c0's result (a tick's
        # dispatches leave before its commit); c0's result is published only after it, so
        # once it is seen the kill cannot undo c1's start (which would run c1 again).
        await succeeded(client, ["c0"])
        kill(broker)
        dirs.let_go("c1")  # c1 ends while the broker is down: its node keeps the outcome
        await dirs.wait_for("c1-done")
        broker = launcher.restart(broker)
        dirs.let_go("c2", "c3")
        assert await succeeded(client, [last]) == [links]
    ran_once(dirs, links)
    # Each link got the results of all before it, and started only after the previous ended.
    for index in range(1, len(links)):
        start = markers(dirs.markers, f"{links[index]}-start")[0]
        assert start["previous"] == links[:index]
        assert start["t"] >= markers(dirs.markers, f"{links[index - 1]}-done")[0]["t"]


async def test_a_group_survives_a_kill_half_way(launcher: Launcher, dirs: Dirs) -> None:
    broker = fleet(launcher)
    client = remote_twin(wf.app, broker)
    keys = [f"g{i}" for i in range(8)]
    async with client:
        group = await client.group(
            *(call(wf.member, dirs.m, k, dirs.r, k).with_options(task_id=k) for k in keys)
        )
        await dirs.wait_for("g*-start", count=len(keys))  # all running, on both nodes
        dirs.let_go(*keys[:3])
        await succeeded(client, keys[:3])  # recorded (committed) before the kill
        kill(broker)
        dirs.let_go(*keys[3:5])  # these end while the broker is down
        await dirs.wait_for("g[34]-done", count=2)
        broker = launcher.restart(broker)
        dirs.let_go(*keys[5:])
        results = await client.wait_for_group(group, timeout=15)
    assert [r.status for r in results] == [TaskStatus.SUCCESS] * len(keys)
    assert [r.result for r in results] == keys
    ran_once(dirs, keys)
    assert len(node_pids(dirs, keys)) == 2


@pytest.mark.parametrize("last_member_ends", ["after the restart", "while the broker is down"])
async def test_a_chord_calls_back_once_after_a_kill_mid_chord(
    launcher: Launcher, dirs: Dirs, last_member_ends: str
) -> None:
    """Members end before the kill, while the broker is down and (in one case) after the
    restart; the callback runs once, with all eight results in call order."""
    broker = fleet(launcher)
    client = remote_twin(wf.app, broker)
    keys = [f"m{i}" for i in range(8)]
    values = [{"index": i, "key": k} for i, k in enumerate(keys)]
    member_ids = [f"chord-member-{i}" for i in range(8)]
    async with client:
        callback = await client.chord(
            [
                call(wf.member, dirs.m, k, dirs.r, v).with_options(task_id=t)
                for k, v, t in zip(keys, values, member_ids, strict=True)
            ],
            call(wf.collect, dirs.m),
        )
        await dirs.wait_for("m*-start", count=len(keys))  # all eight are running
        dirs.let_go(*keys[:3])
        await succeeded(client, member_ids[:3])  # recorded (committed) before the kill
        kill(broker)
        down = keys[3:] if last_member_ends == "while the broker is down" else keys[3:6]
        dirs.let_go(*down)
        await wait_until(
            lambda: all(dirs.count(f"{k}-done") == 1 for k in down), 15, "members ended"
        )
        assert dirs.count("callback") == 0
        broker = launcher.restart(broker)
        dirs.let_go(*keys)
        assert await succeeded(client, [callback]) == [values]
        assert await succeeded(client, member_ids) == values
    runs = markers(dirs.markers, "callback")
    assert len(runs) == 1, runs  # exactly one run of the callback
    assert runs[0]["results"] == values  # every member once, in call order
    assert len(runs[0]["results"]) == len(keys)
    last_done = max(markers(dirs.markers, f"{k}-done")[0]["t"] for k in keys)
    assert runs[0]["t"] >= last_done  # not before every member had ended
    ran_once(dirs, keys)
    assert len(node_pids(dirs, keys)) == 2


async def test_a_chord_callback_running_at_a_kill_is_adopted(
    launcher: Launcher, dirs: Dirs
) -> None:
    broker = fleet(launcher)
    client = remote_twin(wf.app, broker)
    keys = [f"m{i}" for i in range(6)]
    dirs.let_go(*keys)
    async with client:
        callback = await client.chord(
            [call(wf.member, dirs.m, k, dirs.r, k) for k in keys],
            call(wf.gated_collect, dirs.m, "cb", dirs.r).with_options(task_id="cb"),
        )
        member_ids = (await client.admin("inspect", task_id="cb"))["workflow"]["parents"]
        await dirs.wait_for("cb-start")
        # The callback leaves before the commit that records the last member's result and
        # its own lease; the members' results are published after that commit, so once they
        # are seen the callback's attempt is durable and is adopted, not run again.
        await succeeded(client, member_ids)
        kill(broker)
        broker = launcher.restart(broker)
        dirs.let_go("cb")
        assert await succeeded(client, [callback]) == [keys]
    runs = markers(dirs.markers, "cb-start")
    assert len(runs) == 1 and runs[0]["results"] == keys
    ran_once(dirs, keys)


async def test_a_kill_as_the_last_member_ends_still_gives_one_callback_result(
    launcher: Launcher, tmp_path: Path
) -> None:
    """The broker is killed within a few milliseconds of a chord's last member ending, so the
    kill lands before, during or after the tick that records that result and releases the
    callback. A released step is dispatched only after the commit that released it, so in
    every round the callback is released (never lost), runs exactly once, and gets both
    member results, in order, once each."""
    broker = fleet(launcher)
    client = remote_twin(wf.app, broker)
    runs_per_round = []
    async with client:
        for round_ in range(8):
            (tmp_path / f"round{round_}").mkdir()
            dirs = Dirs(tmp_path / f"round{round_}")
            keys, values = ["m0", "m1"], [f"r{round_}-m0", f"r{round_}-m1"]
            callback = await client.chord(
                [call(wf.member, dirs.m, k, dirs.r, v) for k, v in zip(keys, values, strict=True)],
                call(wf.collect, dirs.m),
            )
            await dirs.wait_for("m*-start", count=2)
            dirs.let_go(*keys)
            deadline = time.monotonic() + 15
            while dirs.count("m*-done") < 2:  # poll tightly: the kill must land close by
                assert time.monotonic() < deadline, "the members did not end"
                await asyncio.sleep(0.0005)
            time.sleep((round_ % 4) * 0.002)  # 0, 2, 4 or 6 ms later (blocking: precise)
            kill(broker)
            broker = launcher.restart(broker)
            assert await succeeded(client, [callback]) == [values]
            runs = markers(dirs.markers, "callback")
            assert len(runs) == 1, runs
            assert all(run["results"] == values for run in runs), runs
            ran_once(dirs, keys)
            runs_per_round.append(len(runs))
    print("callback runs per round:", runs_per_round)
