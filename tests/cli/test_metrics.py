"""``flowrra-broker --metrics-port``: Prometheus counters, histograms and state gauges."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flowrra.broker.cli import metrics_host
from flowrra.broker.metrics import _snapshot
from flowrra.exitcodes import ExitCode
from flowrra.protocol import TaskStatus
from tests.cli import cliapp
from tests.cli.conftest import UNSERVED, Client
from tests.conftest import BROKER_EXE, Launcher, free_port, subprocess_env, wait_for_path

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample of http://127.0.0.1:port/metrics by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def test_metrics_count_tasks_and_report_broker_state(launcher: Launcher, tmp_path: Path) -> None:
    port = free_port()
    broker = launcher.broker(args=["--metrics-port", str(port)])
    broker.process.wait_for(rf"serving metrics on http://127\.0\.0\.1:{port}/metrics")
    node = launcher.node(broker, "tests.cli.cliapp:app", concurrency=3, node_id="metrics-node")
    client = Client(broker.url)

    before = scrape(port)
    assert value(before, "flowrra_nodes_connected") == 1
    assert value(before, "flowrra_tasks_in_flight") == 0

    added = client.run(lambda app: app.submit_many(cliapp.add, [(1, 2), (3, 4), (5, 6)]))
    failed = client.submit(cliapp.fail, "metrics")
    for task_id in added:
        assert client.wait(task_id).success
    assert client.wait(failed).status is TaskStatus.FAILED
    for priority in (4, 4, 1):
        client.submit(UNSERVED, priority=priority)
    mark = broker.process.mark()
    client.submit(cliapp.slow_retry)
    broker.process.wait_for(
        r"\(cli\.slow_retry\) failed with RuntimeError; retry 1 of 1", since=mark
    )
    started, release = tmp_path / "started", tmp_path / "release"
    held = client.submit(cliapp.hold, str(started), str(release))
    client.run(lambda app: wait_for_path(started))

    samples = scrape(port)
    assert value(samples, "flowrra_tasks_submitted_total", task="cli.add") == 3
    assert value(samples, "flowrra_tasks_submitted_total", task="cli.fail") == 1
    assert value(samples, "flowrra_tasks_submitted_total", task=UNSERVED) == 3
    assert value(samples, "flowrra_tasks_succeeded_total", task="cli.add") == 3
    assert value(samples, "flowrra_tasks_failed_total", task="cli.add") == 0
    assert value(samples, "flowrra_tasks_failed_total", task="cli.fail") == 1
    assert value(samples, "flowrra_tasks_retried_total", task="cli.fail") == 2
    assert value(samples, "flowrra_tasks_retried_total", task="cli.slow_retry") == 1
    # Every attempt started once (three for the failing task), and waited in a queue first.
    assert value(samples, "flowrra_task_queue_wait_seconds_count", task="cli.add") == 3
    assert value(samples, "flowrra_task_queue_wait_seconds_count", task="cli.fail") == 3
    assert value(samples, "flowrra_task_queue_wait_seconds_count", task=UNSERVED) == 0
    assert value(samples, "flowrra_task_queue_wait_seconds_sum", task="cli.add") >= 0
    assert value(samples, "flowrra_task_queue_wait_seconds_bucket", task="cli.add", le="+Inf") == 3
    # Run times are those of finished tasks.
    assert value(samples, "flowrra_task_run_seconds_count", task="cli.add") == 3
    assert value(samples, "flowrra_task_run_seconds_count", task="cli.fail") == 1
    assert value(samples, "flowrra_task_run_seconds_bucket", task="cli.add", le="1.0") == 3
    # State gauges: two queued at priority 4, one at 1, one running, one retry timer.
    assert value(samples, "flowrra_queue_depth", priority="4") == 2
    assert value(samples, "flowrra_queue_depth", priority="1") == 1
    assert value(samples, "flowrra_tasks_in_flight") == 1
    assert value(samples, "flowrra_nodes_connected") == 1
    assert value(samples, "flowrra_node_free_slots", node=node.node_id, kind="async") == 2
    assert value(samples, "flowrra_node_free_slots", node=node.node_id, kind="cpu") == 0
    assert value(samples, "flowrra_retry_timers") == 1

    release.touch()
    assert client.wait(held).result == "released"
    node.process.terminate()
    broker.process.wait_for(r"node metrics-node left")
    after = scrape(port)
    assert value(after, "flowrra_tasks_succeeded_total", task="cli.hold") == 1
    assert value(after, "flowrra_task_run_seconds_count", task="cli.hold") == 1
    assert value(after, "flowrra_tasks_in_flight") == 0
    assert value(after, "flowrra_nodes_connected") == 0
    assert not any(name == "flowrra_node_free_slots" for name, _ in after)


def test_metrics_without_prometheus_client_is_a_config_error(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "prometheus_client.py").write_text(
        "raise ImportError('No module named prometheus_client (test shadow)')\n"
    )
    env = subprocess_env([shadow], FLOWRRA_METRICS_PORT=str(free_port()))
    result = subprocess.run(
        [BROKER_EXE, "--bind", f"tcp://127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "d")],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        cwd=tmp_path,
    )
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "pip install 'flowrra-fabric[metrics]'" in result.stderr
    assert "broker listening" not in result.stderr


def test_metrics_port_in_use_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [BROKER_EXE, "--bind", f"tcp://127.0.0.1:{free_port()}"]
        argv += ["--data-dir", str(tmp_path / "d"), "--metrics-port", str(port)]
        result = subprocess.run(
            argv, env=subprocess_env(), capture_output=True, text=True, timeout=20, cwd=tmp_path
        )
    assert result.returncode == ExitCode.UNAVAILABLE, result.stderr
    assert f"cannot serve metrics on 127.0.0.1 port {port}" in result.stderr


@pytest.mark.parametrize(
    ("bind", "host"),
    [
        ("tcp://127.0.0.1:5555", "127.0.0.1"),
        ("tcp://10.1.2.3:5555", "10.1.2.3"),
        ("tcp://*:5555", "127.0.0.1"),
        ("tcp://0.0.0.0:5555", "127.0.0.1"),
        ("tcp://[::]:5555", "127.0.0.1"),
        ("tcp://[::1]:5555", "::1"),
        ("ipc:///tmp/flowrra.sock", "127.0.0.1"),
    ],
)
def test_metrics_host_follows_the_bind_host(bind: str, host: str) -> None:
    assert metrics_host(bind) == host


def test_snapshot_retries_while_the_state_changes() -> None:
    calls = []

    def read() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("dictionary changed size during iteration")
        return 42

    assert _snapshot(read) == 42 and len(calls) == 3

    def never() -> int:
        raise RuntimeError("dictionary changed size during iteration")

    assert _snapshot(never) is None
