"""A full disk under a real ``flowrra-broker`` (issue 13): submits are refused with
SubmitRejected, the broker keeps running and serving, and it takes submits again as soon as
there is room (docs/operations.md, "A full disk").

The data directory is on a 20 MB tmpfs mounted for the test, which needs root (or
CAP_SYS_ADMIN); without it the test is skipped.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowrra.errors import SubmitRejected
from flowrra.protocol import TaskStatus
from tests.apps import failures
from tests.conftest import BrokerProcess, NodeProcess, remote_twin

DISK_BYTES = 20 * 2**20
# Written before the broker starts and deleted to free space once the disk is full.
FILLER_BYTES = 4 * 2**20
PAYLOAD_BYTES = 50_000
# Far more than fit: the 16 MB left hold about 300 tasks of 50 KB.
MAX_SUBMITS = 2000


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs, unmounted at the end (request it before the launcher fixtures, so that
    the processes using it are stopped first)."""
    if sys.platform != "linux":
        pytest.skip("mounts a tmpfs: Linux only")
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.skip("no mount/umount command to make a small disk with")
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(
            "cannot mount a 20 MB tmpfs to fill up (needs root or CAP_SYS_ADMIN): "
            f"{done.stderr.strip() or f'mount exited with {done.returncode}'}"
        )
    try:
        yield mountpoint
    finally:
        if subprocess.run([umount, str(mountpoint)], capture_output=True, check=False).returncode:
            subprocess.run([umount, "-l", str(mountpoint)], capture_output=True, check=False)


@pytest.mark.parametrize("durability", ["full", "fast"])
async def test_a_full_disk_refuses_submits_and_the_broker_recovers_when_space_is_freed(
    small_disk: Path,
    start_broker: Callable[..., BrokerProcess],
    start_node: Callable[..., NodeProcess],
    durability: str,
) -> None:
    filler = small_disk / "filler"
    filler.write_bytes(b"\xff" * FILLER_BYTES)
    broker = start_broker(data_dir=small_disk / "data", args=["--durability", durability])
    start_node(broker, "tests.apps.failures:app")
    payload = os.urandom(PAYLOAD_BYTES)
    accepted: list[str] = []
    # Strict submits, so that the refusal is raised by the submit that met the full disk.
    async with remote_twin(failures.app, broker, confirm_submits=True) as client:
        refused: SubmitRejected | None = None
        for _ in range(MAX_SUBMITS):
            try:
                accepted.append(await client.submit(failures.sink, payload))
            except SubmitRejected as exc:
                refused = exc
                break
        assert refused is not None, f"{len(accepted)} tasks of 50 KB fitted on a 20 MB disk"
        assert "broker storage error" in str(refused)
        assert "is full" in str(refused), str(refused)
        assert len(accepted) > 100, "refused long before the disk was full"
        # Neither an exit (lmdb.Error from the commit) nor SIGBUS (writes through the map).
        await broker.process.await_line(r"commit failed, refusing this tick's submissions")
        assert broker.process.running, broker.process.log()

        # Still serving: every acknowledged task is known, and results are delivered.
        first = await client.wait_for_result(accepted[0], timeout=10)
        assert first.success and first.result == PAYLOAD_BYTES
        states = [await client.get_result(task_id) for task_id in accepted]
        assert all(state is not None for state in states)
        finished = [state for state in states if state is not None and state.is_complete]
        assert all(state.success for state in finished)
        # A result that reached the broker in a tick whose commit failed is applied again in
        # the next tick: nothing accepted stays RUNNING for long.
        unfinished = [state for state in states if state is not None and not state.is_complete]
        assert all(state.status is not TaskStatus.FAILED for state in unfinished), unfinished
        # Still full: still refused. (Finished tasks free store pages meanwhile, so a submit
        # may fit again before the next refusal; such a one is stored and must run.)
        squeezed_in: list[str] = []
        with pytest.raises(SubmitRejected, match="broker storage error"):
            for _ in range(MAX_SUBMITS):
                squeezed_in.append(await client.submit(failures.sink, payload))
        assert len(squeezed_in) < 20, "the full disk took 20 more tasks of 50 KB"

        filler.unlink()  # room again: submits are accepted and run
        mark = broker.process.mark()
        again = squeezed_in + [await client.submit(failures.sink, payload) for _ in range(5)]
        for task_id in again:
            result = await client.wait_for_result(task_id, timeout=10)
            assert result.success and result.result == PAYLOAD_BYTES
        await broker.process.await_line(r"the store accepts writes again", since=mark)
        assert broker.process.running
    assert broker.process.terminate() == 0  # and it still stops cleanly
