"""flowrra.processes, the launcher the suite and the scripts share: its own behaviour (the
integration tests use it for every broker and node they start)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from flowrra import Flowrra
from flowrra.processes import Launcher, LaunchError, ManagedProcess, free_ports, pid_alive

PRINT_LINES = "import time\nfor i in range(5): print(f'line {i}', flush=True)\ntime.sleep(60)"
IGNORE_TERM = (
    "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('up', flush=True)\ntime.sleep(60)"
)


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_positions_count_every_line_even_those_no_longer_kept(tmp_path: Path) -> None:
    with Launcher(tmp_path, keep_lines=2, log_dir=tmp_path) as launch:
        process = launch.start("printer", [sys.executable, "-c", PRINT_LINES])
        assert process.wait_for(r"line 4").group(0) == "line 4"
        assert process.mark() == 5
        assert process.log() == "line 3\nline 4"  # only the last two are kept
        assert process.find(r"line \d", since=4) is not None
        assert process.find(r"line 0") is None  # dropped
        with pytest.raises(LaunchError, match="did not log"):
            process.wait_for(r"line 2", timeout=0.2, since=2)  # dropped before it was awaited
    # The log file has every line.
    assert (tmp_path / "printer.log").read_text().splitlines() == [f"line {i}" for i in range(5)]


def test_a_process_that_ignores_sigterm_is_killed_and_reported(tmp_path: Path) -> None:
    launch = Launcher(tmp_path)
    process = launch.start("stubborn", [sys.executable, "-c", IGNORE_TERM])
    process.wait_for("up")
    process.stop(grace=0.3)
    assert not pid_alive(process.pid)
    assert process.problems == ["stubborn ignored SIGTERM for 0.3s"]
    # close() reports what went wrong with every process it started, stopped earlier or not.
    assert launch.close() == ["stubborn ignored SIGTERM for 0.3s"]


def test_wait_for_raises_with_the_log_when_the_process_exits(tmp_path: Path) -> None:
    with Launcher(tmp_path) as launch:
        process = launch.start("quitter", [sys.executable, "-c", "print('bye')"])
        with pytest.raises(LaunchError, match=r"(?s)exited with 0 .*bye"):
            process.wait_for("never")


async def test_a_restarted_broker_keeps_its_ports_data_and_options(tmp_path: Path) -> None:
    with Launcher(tmp_path, heartbeat_ms=200, liveness=3) as launch:
        broker = launch.broker(durability="full")
        assert "--heartbeat-ms" in broker.process.argv
        client = Flowrra.from_urls(broker=broker.url)
        async with client:
            status = await client.admin("status")
            again = launch.restart(broker)
            assert not broker.process.running
            assert (again.port, again.publish_port, again.data_dir) == (
                broker.port,
                broker.publish_port,
                broker.data_dir,
            )
            assert again.process.argv[again.process.argv.index("--durability") + 1] == "full"
            # The same client reconnects: it is the same broker address and store.
            after = await client.admin("status")
        assert after["broker_id"] != status["broker_id"]
        assert isinstance(again.process, ManagedProcess)
