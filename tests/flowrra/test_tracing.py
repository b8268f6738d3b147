"""OpenTelemetry tracing (flowrra/tracing.py, docs/tracing.md): the trace context travels in
the payload's headers, each attempt runs in a span that is a child of its submit span.

The spans of the test process go to the SDK's in-memory exporter through a provider given to
``tracing.use_tracer_provider`` (never the global one, so other tests are not traced); a node
in another process configures its own provider and its tasks report the span they see.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, Tracer

from flowrra import Flowrra, TaskIdConflict, TaskStatus, call, tracing
from flowrra.broker.records import TaskRecord
from flowrra.errors import ProtocolError
from flowrra.protocol import (
    Submission,
    pack_args,
    pack_value,
    prepend_arg,
    same_call,
    split_headers,
    unpack_args,
    with_headers,
)
from flowrra.render import decode_args
from tests.apps import traced
from tests.conftest import Launcher, embedded_twin, remote_twin, wait_until

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# --------------------------------------------------------------------------- payload headers


def test_headers_ride_in_a_third_payload_element_that_argument_decoding_ignores() -> None:
    call_payload = pack_args([1, "x"], {"k": [2]})
    with_context = with_headers(call_payload, {"traceparent": TRACEPARENT})
    assert with_context[:1] == b"\x93"
    assert unpack_args(with_context) == ((1, "x"), {"k": [2]})
    assert split_headers(with_context) == (call_payload, {"traceparent": TRACEPARENT})
    assert split_headers(call_payload) == (call_payload, None)  # old payloads: unchanged
    # New headers replace old ones; the arguments are untouched.
    again = with_headers(with_context, {"traceparent": "other"})
    assert split_headers(again) == (call_payload, {"traceparent": "other"})
    # What the dashboard and the CLI show.
    assert decode_args(with_context) == {"args": [1, "x"], "kwargs": {"k": [2]}, "args_note": None}


@pytest.mark.parametrize("count", [0, 3, 15, 16, 70_000])
def test_a_workflow_result_is_prepended_and_the_headers_kept(count: int) -> None:
    payload = with_headers(pack_args(list(range(count)), {"k": 1}), {"traceparent": TRACEPARENT})
    handed_on = prepend_arg(payload, pack_value({"result": True}))
    args, kwargs = unpack_args(handed_on)
    assert args == ({"result": True}, *range(count)) and kwargs == {"k": 1}
    assert split_headers(handed_on)[1] == {"traceparent": TRACEPARENT}


def test_same_call_ignores_headers_and_nothing_else() -> None:
    plain = pack_args([1], {})
    assert same_call(plain, plain)
    assert same_call(plain, with_headers(plain, {"traceparent": TRACEPARENT}))
    assert same_call(with_headers(plain, {"a": "1"}), with_headers(plain, {"a": "2"}))
    assert not same_call(plain, pack_args([2], {}))
    assert not same_call(with_headers(plain, {"a": "1"}), with_headers(pack_args([2], {}), {}))
    # The broker's idempotency check uses it: a resubmit from another trace is the same call.
    sub = Submission("t1", "jobs.work", 0, plain, 0, 0.0, None, 0.0)
    record = TaskRecord.from_submission(sub, 1)
    assert record.is_call_of(sub._replace(payload=with_headers(plain, {"traceparent": "x"})))
    assert not record.is_call_of(sub._replace(payload=with_headers(pack_args([2], {}), {})))


@pytest.mark.parametrize(
    "payload",
    [
        b"\x93\x90\x80",  # no third element
        b"\x93\x90\x80\x01",  # headers that are not a map
        b"\x93\x90\x80\x80\x01",  # bytes after the headers
        b"\x93\x90",
    ],
)
def test_broken_headers_are_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        split_headers(payload)
    assert not same_call(payload, pack_args([], {}))


def test_with_headers_refuses_what_is_not_a_payload() -> None:
    with pytest.raises(ProtocolError):
        with_headers(pack_value([1]), {"traceparent": TRACEPARENT})


# --------------------------------------------------------------------------- fixtures


@dataclass
class Traced:
    exporter: InMemorySpanExporter
    tracer: Tracer

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        (span,) = self.spans(name)
        return span


@pytest.fixture
def otel() -> Iterator[Traced]:
    """Tracing on, into an in-memory exporter, for this test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing.use_tracer_provider(provider)
    yield Traced(exporter, provider.get_tracer("tests"))
    tracing.use_tracer_provider(None)
    provider.shutdown()


@pytest.fixture
def untraced() -> Iterator[None]:
    """No tracer provider anywhere (the test process never sets a global one)."""
    tracing.use_tracer_provider(None)
    assert tracing.tracer is None
    yield


def embedded(processes: int = 0) -> Flowrra:
    """The traced tasks in an embedded app (without worker processes unless asked)."""
    return embedded_twin(traced.app, processes=processes)


def submit_name(task: Any) -> str:
    return f"flowrra.submit {traced.app.spec_for(task).name}"


def run_name(task: Any) -> str:
    return f"flowrra.run {traced.app.spec_for(task).name}"


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


# --------------------------------------------------------------------------- embedded


async def test_a_task_runs_in_a_child_span_of_its_submit_in_the_request_trace(
    otel: Traced,
) -> None:
    app = embedded()
    async with app:
        with otel.tracer.start_as_current_span("request") as request:
            task_id = await app.submit(traced.current)
        result = await app.wait_for_result(task_id, timeout=10)
    assert result.status is TaskStatus.SUCCESS
    submit, run = otel.one(submit_name(traced.current)), otel.one(run_name(traced.current))
    trace_id = request.get_span_context().trace_id
    assert submit.context is not None and run.context is not None
    assert submit.context.trace_id == run.context.trace_id == trace_id
    assert submit.parent is not None and submit.parent.span_id == request.get_span_context().span_id
    assert run.parent is not None and run.parent.span_id == submit.context.span_id
    assert submit.kind is SpanKind.PRODUCER and run.kind is SpanKind.CONSUMER
    name = traced.app.spec_for(traced.current).name
    assert submit.attributes == {
        "messaging.system": "flowrra",
        "messaging.operation.type": "send",
        "messaging.operation.name": "submit",
        "messaging.destination.name": name,
        "messaging.message.id": task_id,
        "flowrra.task.name": name,
    }
    attributes = dict(run.attributes or {})
    node_id = attributes.pop("flowrra.node.id")
    assert isinstance(node_id, str) and str(os.getpid()) in node_id
    assert attributes == {
        "messaging.system": "flowrra",
        "messaging.operation.type": "process",
        "messaging.operation.name": "run",
        "messaging.destination.name": name,
        "messaging.message.id": task_id,
        "flowrra.task.name": name,
        "flowrra.task.attempt": 1,
        "flowrra.task.outcome": "success",
    }
    assert run.status.status_code is StatusCode.UNSET
    # Inside the task the run span is the current span.
    assert (result.result["trace_id"], result.result["span_id"]) == hex_ids(run)


async def test_each_attempt_is_its_own_span_under_the_same_submit(otel: Traced) -> None:
    app = embedded()
    async with app:
        with otel.tracer.start_as_current_span("request"):
            task_id = await app.submit(traced.flaky, uuid.uuid4().hex, 1)
        result = await app.wait_for_result(task_id, timeout=10)
    assert result.status is TaskStatus.SUCCESS and result.result == 2
    submit = otel.one(submit_name(traced.flaky))
    runs = sorted(otel.spans(run_name(traced.flaky)), key=lambda s: s.start_time or 0)
    assert [s.attributes["flowrra.task.attempt"] for s in runs if s.attributes] == [1, 2]
    assert [s.attributes["flowrra.task.outcome"] for s in runs if s.attributes] == [
        "failed",
        "success",
    ]
    assert all(s.parent is not None and s.context is not None for s in runs)
    assert submit.context is not None
    assert {s.parent.span_id for s in runs if s.parent} == {submit.context.span_id}
    failed, succeeded = runs
    assert failed.status.status_code is StatusCode.ERROR
    assert succeeded.status.status_code is StatusCode.UNSET
    (event,) = failed.events
    assert event.name == "exception" and event.attributes is not None
    assert event.attributes["exception.type"] == "RuntimeError"
    assert event.attributes["exception.message"] == "attempt 1 fails on purpose"
    assert "RuntimeError" in str(event.attributes["exception.stacktrace"])
    assert not succeeded.events


async def test_a_failing_task_has_status_error_and_the_exception(otel: Traced) -> None:
    app = embedded()
    async with app:
        task_id = await app.submit(traced.boom, "no luck")  # no request span: a new trace
        result = await app.wait_for_result(task_id, timeout=10)
    assert result.status is TaskStatus.FAILED
    submit, run = otel.one(submit_name(traced.boom)), otel.one(run_name(traced.boom))
    assert submit.parent is None
    assert run.parent is not None and submit.context is not None
    assert run.parent.span_id == submit.context.span_id
    assert run.status.status_code is StatusCode.ERROR
    assert run.status.description == "ValueError: no luck"
    assert run.attributes is not None and run.attributes["flowrra.task.outcome"] == "failed"
    (event,) = run.events
    assert event.attributes is not None and event.attributes["exception.type"] == "ValueError"


async def test_threads_and_worker_processes_see_the_run_span(otel: Traced) -> None:
    app = embedded(processes=1)
    async with app:
        with otel.tracer.start_as_current_span("request"):
            thread_id = await app.submit(traced.in_thread)
            process_id = await app.submit(traced.in_process)
        in_thread = (await app.wait_for_result(thread_id, timeout=10)).result
        in_process = (await app.wait_for_result(process_id, timeout=20)).result
    thread_run, process_run = (
        otel.one(run_name(traced.in_thread)),
        otel.one(run_name(traced.in_process)),
    )
    assert (in_thread["trace_id"], in_thread["span_id"]) == hex_ids(thread_run)
    # The worker process has no tracer provider: it sees the run span's context only.
    assert in_process["pid"] != os.getpid() and not in_process["recording"]
    assert (in_process["trace_id"], in_process["span_id"]) == hex_ids(process_run)
    assert process_run.attributes is not None
    assert process_run.attributes["flowrra.task.outcome"] == "success"


async def test_a_cancelled_attempt_and_one_handed_back_at_shutdown(otel: Traced) -> None:
    app = embedded()
    cancelled_key, returned_key = uuid.uuid4().hex, uuid.uuid4().hex
    async with app:
        cancelled_id = await app.submit(traced.sleepy, cancelled_key)
        await wait_until(lambda: cancelled_key in traced.started, what="sleepy started")
        assert await app.cancel(cancelled_id)
        result = await app.wait_for_result(cancelled_id, timeout=10)
        assert result.status is TaskStatus.CANCELLED
        returned_id = await app.submit(traced.sleepy, returned_key)
        await wait_until(lambda: returned_key in traced.started, what="sleepy started")
    # The app stopped with the second one running: its node handed it back.
    outcomes = {
        s.attributes["messaging.message.id"]: s
        for s in otel.spans(run_name(traced.sleepy))
        if s.attributes
    }
    cancelled, returned = outcomes[cancelled_id], outcomes[returned_id]
    assert cancelled.attributes is not None and returned.attributes is not None
    assert cancelled.attributes["flowrra.task.outcome"] == "cancelled"
    assert returned.attributes["flowrra.task.outcome"] == "returned"
    assert cancelled.status.status_code is returned.status.status_code is StatusCode.UNSET


async def test_submit_many_and_workflows_trace_every_call(otel: Traced) -> None:
    app = embedded()
    async with app:
        with otel.tracer.start_as_current_span("request") as request:
            many = await app.submit_many(traced.echo, [(1,), (2,)])
            last = await app.chain(call(traced.flaky, uuid.uuid4().hex, 0), call(traced.echo, 5))
        assert [(await app.wait_for_result(i, timeout=10)).result for i in many] == [
            [[1], {}],
            [[2], {}],
        ]
        # The chain handed the first result on, through a payload with headers.
        assert (await app.wait_for_result(last, timeout=10)).result == [[1, 5], {}]
    trace_id = request.get_span_context().trace_id
    submits = {
        s.attributes["messaging.message.id"]: s
        for s in otel.exporter.get_finished_spans()
        if s.kind is SpanKind.PRODUCER and s.attributes
    }
    runs = [s for s in otel.exporter.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert len(submits) == len(runs) == 4
    for run in runs:
        assert run.attributes is not None and run.context is not None
        submit = submits[run.attributes["messaging.message.id"]]
        assert submit.context is not None and run.parent is not None
        assert run.parent.span_id == submit.context.span_id
        assert run.context.trace_id == trace_id


async def test_a_resubmit_from_another_trace_is_the_same_call(otel: Traced) -> None:
    app = embedded()
    async with app:
        task_id = uuid.uuid4().hex
        with otel.tracer.start_as_current_span("first"):
            assert await app.submit(traced.echo, 1, task_id=task_id) == task_id
        with otel.tracer.start_as_current_span("second"):
            assert await app.submit(traced.echo, 1, task_id=task_id) == task_id
            with pytest.raises(TaskIdConflict):
                await app.submit(traced.echo, 2, task_id=task_id)
        assert (await app.wait_for_result(task_id, timeout=10)).result == [[1], {}]
    # The refused submit's span records why.
    refused = otel.spans(submit_name(traced.echo))[-1]
    assert refused.status.status_code is StatusCode.ERROR
    assert [e.attributes["exception.type"] for e in refused.events if e.attributes] == [
        "flowrra.errors.TaskIdConflict"
    ]
    assert len(otel.spans(run_name(traced.echo))) == 1


def test_app_sync_submits_in_the_calling_threads_trace(otel: Traced) -> None:
    """``app.sync`` runs the submit in its loop thread, with the caller's context."""
    app = embedded()
    try:
        with otel.tracer.start_as_current_span("request") as request:
            task_id = app.sync.submit(traced.current)
        seen = app.sync.wait_for_result(task_id, timeout=10).result
    finally:
        app.sync.close()
    assert seen["trace_id"] == format(request.get_span_context().trace_id, "032x")
    submit = otel.one(submit_name(traced.current))
    assert submit.parent is not None
    assert submit.parent.span_id == request.get_span_context().span_id


async def test_without_a_provider_nothing_is_traced_and_payloads_have_no_headers(
    untraced: None,
) -> None:
    app = embedded()
    async with app:
        assert tracing.tracer is None
        task_id = await app.submit(traced.echo, 1, k="v")
        assert (await app.wait_for_result(task_id, timeout=10)).result == [[1], {"k": "v"}]
        stored = await app.admin("inspect", task_id=task_id)
    assert stored["payload"] == pack_args([1], {"k": "v"})


def test_without_opentelemetry_tracing_is_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import raises ImportError
    provider = TracerProvider()
    assert not tracing.use_tracer_provider(provider)
    assert tracing.tracer is None
    with tracing.context_of(with_headers(pack_args([], {}), {"traceparent": TRACEPARENT})):
        pass  # a worker process without opentelemetry runs the call as usual
    monkeypatch.undo()
    tracing.use_tracer_provider(None)


# --------------------------------------------------------------------------- remote node


@pytest.mark.parametrize("node_traces", [True, False], ids=["node-traces", "node-untraced"])
async def test_the_context_reaches_a_node_in_another_process(
    otel: Traced, launcher: Launcher, node_traces: bool
) -> None:
    broker = launcher.broker()
    env = {"TRACED_APP_PROVIDER": "1"} if node_traces else {}
    launcher.node(broker, "tests.apps.traced:app", processes=0, env=env)
    app = remote_twin(traced.app, broker)
    async with app:
        with otel.tracer.start_as_current_span("request") as request:
            seen_id = await app.submit(traced.current)
            echo_id = await app.submit(traced.echo, 1, k=2)
        seen = (await app.wait_for_result(seen_id, timeout=10)).result
        # Headers or not, the node decodes the same arguments.
        assert (await app.wait_for_result(echo_id, timeout=10)).result == [[1], {"k": 2}]
    assert seen["pid"] != os.getpid()
    submit = otel.one(submit_name(traced.current))
    if node_traces:
        assert seen["trace_id"] == format(request.get_span_context().trace_id, "032x")
        assert seen["parent_id"] == hex_ids(submit)[1] and seen["recording"]
    else:
        assert seen["trace_id"] == "0" * 32 and not seen["recording"]  # no span at all
    assert not otel.spans(run_name(traced.current))  # those spans stay in the node
