"""``flowrra status / inspect / tasks / purge / cancel / dead / schedules`` against a real
broker and nodes."""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Literal

import pytest

from flowrra import call
from flowrra.exitcodes import ExitCode
from flowrra.protocol import TaskStatus
from tests.cli import cliapp
from tests.cli.conftest import (
    FLOWRRA_EXE,
    UNSERVED,
    Client,
    CliProcess,
    Fleet,
    invoke,
    ok,
    ok_json,
)
from tests.conftest import Launcher, free_port, subprocess_env

CLEAR = "\033[2J\033[1;1H"
Sigint = Literal["default", "ignored"]


def _row(output: str, *cells: object) -> bool:
    """True when a line of ``output`` holds exactly ``cells``, separated by blanks."""
    pattern = r"^" + r"\s+".join(re.escape(str(c)) for c in cells) + r"$"
    return re.search(pattern, output, re.MULTILINE) is not None


def _is_iso(text: str) -> bool:
    return dt.datetime.fromisoformat(text).tzinfo is not None


# --------------------------------------------------------------------------- status


def test_status_shows_nodes_and_queue_depths(fleet: Fleet) -> None:
    client = fleet.client
    done = client.submit(cliapp.add, 1, 2)
    assert client.wait(done).success
    for priority in (9, 9, 3):
        client.submit(UNSERVED, priority=priority)
    try:
        out = ok(fleet.url, "status")
        assert _row(out, "queued", 3)
        assert _row(out, "in flight", 0)
        assert _row(out, "PRIORITY", "QUEUED")
        assert _row(out, 9, 2) and _row(out, 3, 1)
        assert _row(out, UNSERVED, 3)
        assert re.search(
            r"^NODE\s+HOST\s+PID\s+ASYNC\s+CPU\s+DONE\s+FAILED\s+HEARTBEAT$", out, re.M
        )
        for node in fleet.nodes:
            assert re.search(rf"^{node.node_id}\s+\S+\s+{node.pid}\s+0/4\s+0/0\s+\d+", out, re.M)
        assert re.search(r"^tasks/s \(1 min\)\s+\d+\.\d{3}$", out, re.M)

        reply = ok_json(fleet.url, "status")
        assert reply["queued"] == 3
        assert reply["queued_by_priority"] == {"9": 2, "3": 1}
        assert reply["queued_by_name"] == {UNSERVED: 3}
        by_id = {n["node_id"]: n for n in reply["nodes"]}
        assert set(by_id) == {n.node_id for n in fleet.nodes}
        assert sum(n["tasks_done"] for n in by_id.values()) >= 1
        assert all(n["async_total"] == 4 and n["pid"] for n in by_id.values())
    finally:
        assert ok(fleet.url, "purge", "--yes") == "dropped 3 queued tasks\n"


def test_status_json_from_the_executable_with_env_broker(fleet: Fleet) -> None:
    result = subprocess.run(
        [FLOWRRA_EXE, "status", "--json"],
        env=subprocess_env(FLOWRRA_BROKER=fleet.url),
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert {n["node_id"] for n in reply["nodes"]} == {n.node_id for n in fleet.nodes}


# A child that inherits SIGINT ignored (started by a background job of a non-interactive
# shell, as a busy machine's test run may be) must still stop on Ctrl-C: asyncio.run() alone
# then installs no handler and the watch ran on until killed (issue 13).
SIGINT_DISPOSITIONS = pytest.mark.parametrize("sigint", ["default", "ignored"])


@SIGINT_DISPOSITIONS
def test_status_watch_redraws_until_ctrl_c(fleet: Fleet, sigint: Sigint) -> None:
    """On a terminal (a pty here) every frame clears the screen and redraws."""
    argv = ("status", "--watch", "--interval", "0.1")
    with CliProcess(fleet.url, *argv, tty=True, sigint=sigint) as watch:
        # Two complete frames between three clears.
        seen = watch.read_until(lambda out: out.count(CLEAR) >= 3)
        code = watch.interrupt()
        assert (code, watch.stderr) == (ExitCode.OK, "")
    frames = seen.split(CLEAR)[1:3]
    for frame in frames:
        assert frame.startswith(f"every 0.1s: flowrra status {fleet.url}")
        assert re.search(r"^queued\s+\d+$", frame, re.M)
        for node in fleet.nodes:
            assert node.node_id in frame


@SIGINT_DISPOSITIONS
def test_status_watch_json_prints_one_document_per_interval(fleet: Fleet, sigint: Sigint) -> None:
    argv = ("status", "--watch", "--interval", "0.05", "--json")
    with CliProcess(fleet.url, *argv, sigint=sigint) as watch:
        out = watch.read_until(lambda out: out.count("\n") >= 2)
        code = watch.interrupt()
        assert (code, watch.stderr) == (ExitCode.OK, "")
    documents = [json.loads(line) for line in out.splitlines()[:2]]
    assert all(len(d["nodes"]) == 2 for d in documents)


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.4])
def test_status_watch_ends_on_ctrl_c_right_after_start(fleet: Fleet, delay: float) -> None:
    """SIGINT at once or soon after start (before the first frame, as a rule) ends it too.

    A SIGINT that lands before the command runs gets Python's or click's own handling: while
    the interpreter starts (a fatal error in ``site``: 1) or imports (a KeyboardInterrupt
    traceback and death by SIGINT), while click parses ("Aborted!": 1). Whatever the moment,
    the process ends at once; once the command runs, it ends cleanly. (With SIGINT inherited
    ignored, one sent before the command installs its handler is discarded by the kernel.)
    One landing in an import's module-lock callback is dropped by CPython itself ("Exception
    ignored in: <function _get_module_lock.<locals>.cb>", seen once in CI): then, as for any
    Python program, it takes a second Ctrl-C, which must end it as promptly.
    """
    with CliProcess(fleet.url, "status", "--watch", "--interval", "0.1") as watch:
        time.sleep(delay)
        code = watch.interrupt(swallowed_again=True)
        assert code in (ExitCode.OK, ExitCode.FAILURE, -signal.SIGINT), watch.stderr
        if code == ExitCode.OK:
            assert watch.stderr == ""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc/PID/task")
@SIGINT_DISPOSITIONS
def test_status_watch_of_a_broker_not_running_ends_on_ctrl_c(sigint: Sigint) -> None:
    """Ctrl-C while still connecting ends it at once, not after the --timeout (30 s)."""
    url = f"tcp://127.0.0.1:{free_port()}"
    argv = ("--timeout", "30", "status", "--watch")
    with CliProcess(url, *argv, sigint=sigint) as watch:
        watch.wait_for_threads(3)  # ZeroMQ's threads: the command is connecting
        code = watch.interrupt()
        assert (code, watch.stderr, watch.text) == (ExitCode.OK, "", "")


def test_status_watch_ends_on_ctrl_c_while_the_broker_is_gone(launcher: Launcher) -> None:
    """Ctrl-C with a status request in flight to a broker that died ends it at once, not
    after the request timeout (30 s)."""
    broker = launcher.broker()
    argv = ("--timeout", "30", "status", "--watch", "--interval", "0.05", "--json")
    with CliProcess(broker.url, *argv) as watch:
        watch.read_until(lambda out: out.count("\n") >= 1)
        broker.process.kill9()
        # Whatever was answered before the broker died arrives; then a request is out, and
        # no answer (nor timeout) comes for 30 s.
        before = watch.drain(0.5)
        assert len(watch.drain(0.5)) == len(before), "answered after the broker died?"
        code = watch.interrupt()
        assert (code, watch.stderr) == (ExitCode.OK, "")


def test_unreachable_broker_exits_unavailable_within_the_timeout() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    for args in (
        ["status"],
        ["inspect", "x"],
        ["tasks"],
        ["dead", "list"],
        ["purge", "--yes"],
        ["cancel", "x"],
        ["schedules", "list"],
        ["schedules", "disable", "x"],
    ):
        started = time.monotonic()
        result = invoke(url, *args, timeout=0.3)
        assert result.exit_code == ExitCode.UNAVAILABLE, result.output
        assert "error: no answer from the broker within 0.3s" in result.stderr
        assert time.monotonic() - started < 3.0


# --------------------------------------------------------------------------- inspect


def test_inspect_shows_arguments_attempts_and_error(fleet: Fleet) -> None:
    client = fleet.client
    task_id = client.submit(cliapp.fail, "boom", code=7)
    final = client.wait(task_id)
    assert final.status is TaskStatus.FAILED and final.retries == 2

    out = ok(fleet.url, "inspect", task_id)
    assert _row(out, "task id", task_id)
    assert _row(out, "name", "cli.fail")
    assert _row(out, "status", "failed")
    assert _row(out, "args", "['boom']")
    assert _row(out, "kwargs", "{'code': 7}")
    assert _row(out, "retries", "2", "of", "2", "(delay", "0.01s)")
    assert _row(out, "error", "ValueError:", "boom", "(7)")
    node_ids = "|".join(n.node_id for n in fleet.nodes)
    attempts = re.findall(
        rf"^(\d)\s+(?:{node_ids})\s+(\S+)\s+(\S+)\s+\d+\.\d+s\s+failed\s+ValueError: boom \(7\)$",
        out,
        re.M,
    )
    assert [a[0] for a in attempts] == ["1", "2", "3"]
    assert all(_is_iso(a[1]) and _is_iso(a[2]) for a in attempts)
    assert "traceback:" in out and "raise ValueError" in out

    record = ok_json(fleet.url, "inspect", task_id)
    assert record["args"] == ["boom"] and record["kwargs"] == {"code": 7}
    assert record["status"] == "failed" and record["error"] == "ValueError: boom (7)"
    assert "raise ValueError" in record["traceback"]
    assert [a["attempt"] for a in record["history"]] == [1, 2, 3]
    assert {a["outcome"] for a in record["history"]} == {"failed"}
    assert all(a["run_s"] >= 0 and _is_iso(a["started_at"]) for a in record["history"])
    assert _is_iso(record["submitted_at"]) and _is_iso(record["finished_at"])
    assert "payload" not in record and record["args_note"] is None  # decoded, not raw


def test_inspect_shows_the_result_of_a_success(fleet: Fleet) -> None:
    client = fleet.client
    task_id = client.submit(cliapp.add, 2, 3, label="five")
    assert client.wait(task_id).success
    out = ok(fleet.url, "inspect", task_id)
    assert _row(out, "result", "{'sum':", "5,", "'label':", "'five'}")
    assert _row(out, "args", "[2,", "3]") and _row(out, "kwargs", "{'label':", "'five'}")
    assert re.search(r"^1\s+cli-node-[ab]\s+\S+\s+\S+\s+\S+\s+success\s+-$", out, re.M)
    record = ok_json(fleet.url, "inspect", task_id)
    assert record["result"] == {"sum": 5, "label": "five"}
    assert len(record["history"]) == 1 and record["history"][0]["outcome"] == "success"


def test_inspect_unknown_task(fleet: Fleet) -> None:
    result = invoke(fleet.url, "inspect", "no-such-task")
    assert result.exit_code == ExitCode.FAILURE
    assert result.stderr == "unknown task id no-such-task\n"
    assert result.stdout == ""


# --------------------------------------------------------------------------- recent, stats


def test_recent_filters_by_status_and_name(fleet: Fleet) -> None:
    client = fleet.client
    failed = client.submit(cliapp.fail, "recent", code=3)
    done = client.submit(cliapp.add, 4, 5, label="recent")
    assert client.wait(failed).status is TaskStatus.FAILED and client.wait(done).success

    out = ok(fleet.url, "recent")
    assert re.search(
        r"^TASK ID\s+NAME\s+STATUS\s+ATTEMPT\s+SUBMITTED\s+FINISHED\s+ERROR$", out, re.M
    )
    assert re.search(
        rf"^{failed}\s+cli\.fail\s+failed\s+3\s+\S+\s+\S+\s+ValueError: recent \(3\)$", out, re.M
    )
    assert re.search(rf"^{done}\s+cli\.add\s+success\s+1\s+\S+\s+\S+\s+-$", out, re.M)

    only_failed = ok_json(fleet.url, "recent", "--status", "failed")
    assert failed in {t["task_id"] for t in only_failed}
    assert {t["status"] for t in only_failed} == {"failed"}
    assert all(_is_iso(t["submitted_at"]) for t in only_failed)
    by_name = ok_json(
        fleet.url, "recent", "--name", "cli.add", "--status", "success", "--status", "failed"
    )
    assert done in {t["task_id"] for t in by_name} and {t["task_name"] for t in by_name} == {
        "cli.add"
    }
    assert len(ok_json(fleet.url, "recent", "--limit", "1")) == 1
    assert ok(fleet.url, "recent", "--name", "no.such.task") == "no recent tasks match\n"
    refused = invoke(fleet.url, "recent", "--status", "done")
    assert refused.exit_code == 2 and "'done' is not one of" in refused.stderr


def test_stats_per_task_name(fleet: Fleet) -> None:
    client = fleet.client
    for i in range(3):
        assert client.wait(client.submit(cliapp.add, i, i)).success
    assert client.wait(client.submit(cliapp.fail, "stats")).status is TaskStatus.FAILED

    reply = ok_json(fleet.url, "stats")
    assert reply["run_window"] == 1000 and _is_iso(reply["since"])
    add, fail = reply["tasks"]["cli.add"], reply["tasks"]["cli.fail"]
    assert add["finished"] >= 3 and add["failed"] == 0 and add["failure_rate"] == 0
    assert 0 <= add["p50_s"] <= add["p95_s"]
    assert fail["failure_rate"] == 1 and fail["retried"] >= 2
    out = ok(fleet.url, "stats")
    assert re.search(
        r"^TASK\s+SUBMITTED\s+FINISHED\s+FAILED\s+FAILURE RATE\s+RETRIED\s+P50\s+P95$", out, re.M
    )
    assert re.search(
        rf"^cli\.fail\s+{fail['submitted']}\s+{fail['finished']}\s+{fail['failed']}\s+100\.0%\s+",
        out,
        re.M,
    )
    assert list(ok_json(fleet.url, "stats", "--name", "cli.add")["tasks"]) == ["cli.add"]


# --------------------------------------------------------------------------- tasks


def test_tasks_lists_names_and_nodes(fleet: Fleet) -> None:
    out = ok(fleet.url, "tasks")
    nodes = ", ".join(sorted(n.node_id for n in fleet.nodes))
    assert _row(out, "TASK", "NODES")
    for name in sorted(cliapp.app.tasks):
        assert _row(out, name, nodes)
    served = ok_json(fleet.url, "tasks")
    assert served == {name: sorted(n.node_id for n in fleet.nodes) for name in cliapp.app.tasks}


def test_tasks_without_nodes(launcher: Launcher) -> None:
    broker = launcher.broker()
    assert ok(broker.url, "tasks") == "no connected node serves any task\n"
    assert ok_json(broker.url, "tasks") == {}


# --------------------------------------------------------------------------- purge


def test_purge_asks_then_drops_exactly_the_queued_tasks(launcher: Launcher) -> None:
    broker = launcher.broker()  # no node: everything submitted stays queued
    client = Client(broker.url)
    ids = client.run(lambda app: app.submit_many(UNSERVED, [()] * 3, priority=2)) + client.run(
        lambda app: app.submit_many(UNSERVED, [()] * 2, priority=0)
    )

    declined = invoke(broker.url, "purge", input="n\n")
    assert declined.exit_code == ExitCode.FAILURE
    assert "drop 5 queued tasks" in declined.stdout and "nothing purged" in declined.stderr
    assert client.status()["queued"] == 5

    assert ok(broker.url, "purge", "--priority", "2", "--yes") == (
        "dropped 3 queued tasks of priority 2\n"
    )
    assert client.status()["queued_by_priority"] == {"0": 2}

    accepted = ok(broker.url, "purge", input="y\n")
    assert "drop 2 queued tasks" in accepted and accepted.endswith("dropped 2 queued tasks\n")
    assert client.status()["queued"] == 0
    assert all(client.get(task_id) is None for task_id in ids)

    assert ok(broker.url, "purge") == "no queued tasks: nothing to purge\n"
    assert ok(broker.url, "purge", "--yes") == "dropped 0 queued tasks\n"


# --------------------------------------------------------------------------- dead letters


def test_dead_list_and_retry(fleet: Fleet, tmp_path: Path) -> None:
    client = fleet.client
    failed = client.submit(cliapp.fail, "dead", code=1)
    marker = tmp_path / "flaky-marker"
    flaky = client.submit(cliapp.flaky, str(marker))
    assert client.wait(failed).status is TaskStatus.FAILED
    first = client.wait(flaky)
    assert first.status is TaskStatus.FAILED and first.error == "RuntimeError: first call fails"

    out = ok(fleet.url, "dead", "list")
    assert re.search(r"^TASK ID\s+NAME\s+RETRIES\s+FAILED AT\s+ERROR$", out, re.M)
    assert re.search(rf"^{failed}\s+cli\.fail\s+2\s+\S+\s+ValueError: dead \(1\)$", out, re.M)
    assert re.search(
        rf"^{flaky}\s+cli\.flaky\s+0\s+\S+\s+RuntimeError: first call fails$", out, re.M
    )
    listed = {r["task_id"]: r for r in ok_json(fleet.url, "dead", "list")}
    assert listed[failed]["error"] == "ValueError: dead (1)"
    assert _is_iso(listed[failed]["finished_at"])
    # Newest first: the limit keeps the most recent failures.
    newest = ok_json(fleet.url, "dead", "list", "--limit", "1")
    assert len(newest) == 1

    assert ok(fleet.url, "dead", "retry", flaky) == f"task {flaky} queued again\n"
    again = client.wait(flaky)
    assert again.success and again.result == "recovered"
    assert flaky not in {r["task_id"] for r in ok_json(fleet.url, "dead", "list")}
    history = ok_json(fleet.url, "inspect", flaky)["history"]
    assert [h["outcome"] for h in history] == ["failed", "success"]

    refused = invoke(fleet.url, "dead", "retry", flaky)
    assert refused.exit_code == ExitCode.FAILURE
    assert refused.stderr == f"error: task {flaky} is not in the dead-letter list\n"


def test_ping(fleet: Fleet) -> None:
    assert ok(fleet.url, "ping").startswith("broker ")
    welcome = ok_json(fleet.url, "ping")
    assert welcome["endpoint"] == fleet.url
    assert welcome["publish"] == fleet.broker.publish_url
    assert welcome["heartbeat_ms"] == 200


# --------------------------------------------------------------------------- workflows


def test_inspect_shows_workflow_links(fleet: Fleet) -> None:
    """A chain whose first link no node serves: the second one waits, linked to it."""
    client = fleet.client
    last = client.run(lambda app: app.chain(call(UNSERVED), call(cliapp.add, 1)))
    waiting = ok_json(fleet.url, "inspect", last)
    assert waiting["status"] == TaskStatus.WAITING.value
    links = waiting["workflow"]
    assert links["kind"] == "chain" and links["step"] == 1 and links["children"] == []
    (first,) = links["parents"]
    try:
        out = ok(fleet.url, "inspect", last)
        assert _row(out, "status", "waiting")
        assert _row(out, "workflow", links["workflow"], "(chain,", "step", "2)")
        assert _row(out, "parents", first)
        assert _row(out, "children", "none", "(last", "step)")

        head = ok_json(fleet.url, "inspect", first)
        assert head["status"] == TaskStatus.PENDING.value
        assert head["workflow"] == {
            "workflow": links["workflow"],
            "kind": "chain",
            "step": 0,
            "parents": [],
            "children": [last],
        }
        out = ok(fleet.url, "inspect", first)
        assert _row(out, "parents", "none", "(first", "step)")
        assert _row(out, "children", last)
    finally:
        # Cancelling the head ends the chain: the waiting link fails, naming it.
        assert ok(fleet.url, "cancel", first) == f"task {first} cancelled\n"
    final = client.wait(last)
    assert final.status is TaskStatus.FAILED and first in (final.error or "")
    assert "workflow" not in ok(fleet.url, "inspect", done_id(client))


def done_id(client: Client) -> str:
    """A task outside any workflow, finished."""
    task_id = client.submit(cliapp.add, 1, 1)
    assert client.wait(task_id).success
    return task_id


# --------------------------------------------------------------------------- cancel


def test_cancel_a_scheduled_task(fleet: Fleet) -> None:
    client = fleet.client
    task_id = client.run(lambda app: app.submit(cliapp.add, 1, 2, countdown=60))
    before = ok_json(fleet.url, "inspect", task_id)
    assert before["status"] == TaskStatus.SCHEDULED.value and _is_iso(before["eta"])
    out = ok(fleet.url, "inspect", task_id)
    assert _row(out, "status", "scheduled") and _row(out, "due", before["eta"])
    assert ok(fleet.url, "result", task_id).splitlines()[1] == f"due: {before['eta']}"

    assert ok(fleet.url, "cancel", task_id) == f"task {task_id} cancelled\n"
    cancelled = client.get(task_id)
    assert cancelled is not None and cancelled.status is TaskStatus.CANCELLED
    assert ok_json(fleet.url, "inspect", task_id)["status"] == "cancelled"
    assert ok_json(fleet.url, "result", task_id)["status"] == "cancelled"
    assert _row(ok(fleet.url, "inspect", task_id), "status", "cancelled")

    # Once final, nothing more to cancel: exit 1 with a message saying so.
    again = invoke(fleet.url, "cancel", task_id)
    assert again.exit_code == ExitCode.FAILURE and again.stdout == ""
    assert again.stderr == f"task {task_id} had already finished (cancelled): nothing cancelled\n"


def test_cancel_json_and_finished_tasks(fleet: Fleet) -> None:
    client = fleet.client
    queued = client.submit(UNSERVED)  # no node serves it: it stays queued
    assert ok_json(fleet.url, "cancel", queued) == {
        "task_id": queued,
        "cancelled": True,
        "status": "cancelled",
    }
    assert client.status()["queued_by_name"].get(UNSERVED, 0) == 0

    finished = done_id(client)
    refused = invoke(fleet.url, "cancel", finished, "--json")
    assert refused.exit_code == ExitCode.FAILURE
    assert json.loads(refused.stdout) == {
        "task_id": finished,
        "cancelled": False,
        "status": "success",
    }
    assert refused.stderr == f"task {finished} had already finished (success): nothing cancelled\n"
    assert client.wait(finished).result == {"sum": 2, "label": ""}  # untouched


def test_cancel_unknown_task(fleet: Fleet) -> None:
    result = invoke(fleet.url, "cancel", "no-such-task")
    assert result.exit_code == ExitCode.FAILURE
    assert (result.stdout, result.stderr) == ("", "unknown task id no-such-task\n")
    result = invoke(fleet.url, "cancel", "no-such-task", "--json")
    assert result.exit_code == ExitCode.FAILURE
    assert json.loads(result.stdout) == {
        "task_id": "no-such-task",
        "cancelled": False,
        "status": None,
    }


# --------------------------------------------------------------------------- schedules


def test_schedules_list_disable_enable_remove(fleet: Fleet) -> None:
    client = fleet.client
    # Hourly: declared now, its first slot is an hour away, so nothing fires meanwhile.
    interval_id = client.run(
        lambda app: app.create_scheduler().schedule_interval(
            cliapp.add, 3600, args=[1, 2], kwargs={"label": "hourly"}, description="every hour"
        )
    )
    cron_id = client.run(
        lambda app: app.create_scheduler().schedule_cron(
            cliapp.add, "0 3 * * *", args=[5, 5], tz="Europe/Berlin", task_id="cli-nightly"
        )
    )
    assert cron_id == "cli-nightly"
    try:
        listed = {s["id"]: s for s in ok_json(fleet.url, "schedules", "list")}
        hourly = listed[interval_id]
        assert hourly["task_name"] == "cli.add" and hourly["schedule_type"] == "interval"
        assert hourly["schedule"] == 3600 and hourly["tz"] == "UTC"
        assert hourly["enabled"] is True and hourly["description"] == "every hour"
        assert hourly["args"] == [1, 2] and hourly["kwargs"] == {"label": "hourly"}
        assert hourly["last_run_at"] is None and hourly["last_task_id"] is None
        next_run = dt.datetime.fromisoformat(hourly["next_run_at"])
        start = dt.datetime.fromisoformat(hourly["start"])
        assert next_run - start == dt.timedelta(hours=1)
        nightly = listed[cron_id]
        assert nightly["schedule"] == "0 3 * * *" and nightly["tz"] == "Europe/Berlin"
        assert _is_iso(nightly["next_run_at"])
        assert client.status()["schedules"] >= 2
        assert re.search(r"^schedules\s+\d+$", ok(fleet.url, "status"), re.M)

        out = ok(fleet.url, "schedules", "list")
        assert re.search(
            r"^ID\s+TASK\s+TYPE\s+SCHEDULE\s+TZ\s+ENABLED\s+NEXT RUN\s+LAST RUN\s+LAST TASK ID$",
            out,
            re.M,
        )
        assert _row(out, interval_id, "cli.add", "interval", "every", "3600s", "UTC", "yes",
                    hourly["next_run_at"], "-", "-")  # fmt: skip
        assert _row(out, cron_id, "cli.add", "cron", "0", "3", "*", "*", "*", "Europe/Berlin",
                    "yes", nightly["next_run_at"], "-", "-")  # fmt: skip

        assert ok(fleet.url, "schedules", "disable", interval_id) == (
            f"schedule {interval_id} disabled\n"
        )
        disabled = {s["id"]: s for s in ok_json(fleet.url, "schedules", "list")}[interval_id]
        assert disabled["enabled"] is False
        assert _row(ok(fleet.url, "schedules", "list"), interval_id, "cli.add", "interval",
                    "every", "3600s", "UTC", "no", "-", "-", "-")  # fmt: skip

        enabled = ok(fleet.url, "schedules", "enable", interval_id)
        assert re.fullmatch(rf"schedule {interval_id} enabled: next run (\S+)\n", enabled)
        after = {s["id"]: s for s in ok_json(fleet.url, "schedules", "list")}[interval_id]
        assert after["enabled"] is True and enabled.split()[-1] == after["next_run_at"]

        for schedule_id in (interval_id, cron_id):
            assert ok(fleet.url, "schedules", "remove", schedule_id) == (
                f"schedule {schedule_id} removed\n"
            )
        remaining = {s["id"] for s in ok_json(fleet.url, "schedules", "list")}
        assert not remaining & {interval_id, cron_id}
    finally:
        for schedule_id in (interval_id, cron_id):
            invoke(fleet.url, "schedules", "remove", schedule_id)


def test_schedules_of_unknown_ids_and_none(launcher: Launcher) -> None:
    broker = launcher.broker()
    assert ok(broker.url, "schedules", "list") == "no schedules\n"
    assert ok_json(broker.url, "schedules", "list") == []
    for verb in ("enable", "disable", "remove"):
        result = invoke(broker.url, "schedules", verb, "no-such-schedule")
        assert result.exit_code == ExitCode.FAILURE, verb
        assert (result.stdout, result.stderr) == ("", "unknown schedule id no-such-schedule\n")


def test_schedule_once_is_listed_at_its_time(launcher: Launcher) -> None:
    broker = launcher.broker()
    client = Client(broker.url)
    run_at = dt.datetime(2099, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    schedule_id = client.run(
        lambda app: app.create_scheduler().schedule_once(UNSERVED, run_at, enabled=False)
    )
    (listed,) = ok_json(broker.url, "schedules", "list")
    assert listed["id"] == schedule_id and listed["schedule_type"] == "once"
    assert listed["schedule"] == "2099-01-02T03:04:05.000+00:00" and listed["enabled"] is False
    assert _row(ok(broker.url, "schedules", "list"), schedule_id, UNSERVED, "once", "at",
                "2099-01-02T03:04:05.000+00:00", "UTC", "no", "-", "-", "-")  # fmt: skip
