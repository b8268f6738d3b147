"""OpenTelemetry tracing: submits carry the trace context, nodes run each attempt in a span.

Optional (``pip install flowrra-fabric[otel]``) and off unless a tracer provider is set up:
:func:`refresh`, which apps and nodes call when they start, imports ``opentelemetry`` and
decides once. While it is off, :data:`tracer` is None and the only cost in submit and in the
node is a check of that attribute.

On the wire the context is a map of strings (``traceparent``, ``tracestate``, ``baggage``:
whatever the global propagator writes) in the optional third element of a task's payload,
``[args, kwargs, headers]`` (``docs/protocol.md`` §7). The broker stores and forwards it
without reading it, like the arguments.

Spans (``docs/tracing.md``): a PRODUCER span ``flowrra.submit <task name>`` per submitted call,
in the submitter's current context; on the node a CONSUMER span ``flowrra.run <task name>`` per
attempt, a child of that submit span (as Celery's instrumentation makes a run the child of its
publish span), current while the task runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from importlib import metadata
from typing import TYPE_CHECKING, Any, Final

from flowrra.protocol import Dispatch, ErrorInfo, Submission, split_headers, with_headers

if TYPE_CHECKING:
    from contextvars import Token
    from types import TracebackType

    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "Producing",
    "end_run",
    "refresh",
    "start_run",
    "submit",
    "tracer",
    "use_tracer_provider",
]

# The tracer Flowrra's spans come from, or None while tracing is off (see refresh()).
tracer: Tracer | None = None
# A provider given to use_tracer_provider(), instead of OpenTelemetry's global one.
_provider: TracerProvider | None = None

SYSTEM: Final = "flowrra"
# OpenTelemetry messaging semantic conventions (1.26+), and Flowrra's own attributes.
ATTR_SYSTEM: Final = "messaging.system"
ATTR_OPERATION_TYPE: Final = "messaging.operation.type"
ATTR_OPERATION_NAME: Final = "messaging.operation.name"
ATTR_DESTINATION: Final = "messaging.destination.name"
ATTR_MESSAGE_ID: Final = "messaging.message.id"
ATTR_TASK_NAME: Final = "flowrra.task.name"
ATTR_ATTEMPT: Final = "flowrra.task.attempt"
ATTR_OUTCOME: Final = "flowrra.task.outcome"
ATTR_NODE: Final = "flowrra.node.id"

# An attempt's outcome, in the words of the broker's attempt history (docs/protocol.md §4.6).
SUCCESS: Final = "success"
FAILED: Final = "failed"
CANCELLED: Final = "cancelled"
RETURNED: Final = "returned"  # the node stopped and handed the attempt back


def refresh() -> bool:
    """Decide whether Flowrra traces, and return that: on when ``opentelemetry`` can be
    imported and a tracer provider is configured (the one given to
    :func:`use_tracer_provider`, else a global one that is not OpenTelemetry's no-op).

    Apps and nodes call this when they start, so configure OpenTelemetry before that (in
    the app module, for a node), or call this again after.
    """
    global tracer
    try:
        from opentelemetry import trace
    except ImportError:
        tracer = None
        return False
    # The distribution's version, not flowrra.__version__: importing the package from here
    # would make an import cycle (flowrra -> app -> tracing -> flowrra).
    try:
        version: str | None = metadata.version("flowrra-fabric")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = None

    provider = _provider if _provider is not None else trace.get_tracer_provider()
    found = None
    if not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        found = provider.get_tracer("flowrra", version)
        if isinstance(found, trace.NoOpTracer):  # the SDK with OTEL_SDK_DISABLED=true
            found = None
    tracer = found
    return tracer is not None


def use_tracer_provider(provider: TracerProvider | None) -> bool:
    """Trace with ``provider`` rather than the global tracer provider (None: the global one
    again); returns whether tracing is now on. For tests, or an app that keeps its own."""
    global _provider
    _provider = provider
    return refresh()


# --------------------------------------------------------------------------- submit side


class Producing:
    """The PRODUCER spans of submitted calls: :meth:`add` starts one and returns the
    submission with its context in the payload's headers; leaving the ``with`` block ends
    them, recording an exception that escapes it."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    def add(self, submission: Submission) -> Submission:
        from opentelemetry import propagate, trace

        assert tracer is not None
        span = tracer.start_span(
            f"flowrra.submit {submission.name}",
            kind=trace.SpanKind.PRODUCER,
            attributes={
                ATTR_SYSTEM: SYSTEM,
                ATTR_OPERATION_TYPE: "send",
                ATTR_OPERATION_NAME: "submit",
                ATTR_DESTINATION: submission.name,
                ATTR_MESSAGE_ID: submission.task_id,
                ATTR_TASK_NAME: submission.name,
            },
        )
        self.spans.append(span)
        headers: dict[str, str] = {}
        propagate.inject(headers, context=trace.set_span_in_context(span))
        if not headers:  # a propagator that writes nothing (say, none configured)
            return submission
        return submission._replace(payload=with_headers(submission.payload, headers))

    def add_steps(self, steps: list[list[list[Any]]]) -> list[list[list[Any]]]:
        """A workflow's steps (lists of wire submissions) with a span for every call."""
        return [[self.add(Submission(*item)).to_wire() for item in step] for step in steps]

    def __enter__(self) -> Producing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for span in self.spans:
            if exc is not None:
                _fail(span, type(exc).__qualname__, str(exc))
                span.record_exception(exc)
            span.end()


async def submit(
    send: Callable[..., Awaitable[object]], submissions: list[Submission], **options: Any
) -> None:
    """``await send(submissions, **options)`` with a PRODUCER span for each submission."""
    with Producing() as producing:
        await send([producing.add(sub) for sub in submissions], **options)


# --------------------------------------------------------------------------- run side


class Run:
    """One attempt's CONSUMER span, current (in the running asyncio task) until it ends."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span, token: Token[Context]) -> None:
        self.span = span
        self.token = token


def start_run(dispatch: Dispatch, node_id: str) -> Run:
    """Start the span of one attempt, as a child of the submitter's context in the payload
    (a root span when there is none), and make it the current span of the calling asyncio
    task, so that the task's own spans, and its threads', nest under it."""
    from opentelemetry import context, trace

    assert tracer is not None
    span = tracer.start_span(
        f"flowrra.run {dispatch.name}",
        context=_parent(dispatch.payload),
        kind=trace.SpanKind.CONSUMER,
        attributes={
            ATTR_SYSTEM: SYSTEM,
            ATTR_OPERATION_TYPE: "process",
            ATTR_OPERATION_NAME: "run",
            ATTR_DESTINATION: dispatch.name,
            ATTR_MESSAGE_ID: dispatch.task_id,
            ATTR_TASK_NAME: dispatch.name,
            ATTR_ATTEMPT: dispatch.attempt,
            ATTR_NODE: node_id,
        },
    )
    return Run(span, context.attach(trace.set_span_in_context(span)))


def end_run(run: Run, error: ErrorInfo | None, outcome: str | None = None) -> None:
    """End an attempt's span with its outcome (``success``, ``failed`` or ``cancelled`` from
    ``error``, unless given); a failure is recorded as an exception event, status ERROR."""
    from opentelemetry import context

    span = run.span
    if outcome is None:
        if error is None:
            outcome = SUCCESS
        elif error.exc_type == "CancelledError":
            outcome = CANCELLED
        else:
            outcome = FAILED
    span.set_attribute(ATTR_OUTCOME, outcome)
    if error is not None and outcome == FAILED:
        # What Span.record_exception writes, from the error as reported to the broker (for
        # a cpu_bound task the exception was raised in a worker process).
        attributes = {"exception.type": error.exc_type, "exception.message": error.message}
        if error.traceback:
            attributes["exception.stacktrace"] = error.traceback
        span.add_event("exception", attributes)
        _fail(span, error.exc_type, error.message)
    span.end()
    context.detach(run.token)


def with_current_context(payload: bytes) -> bytes:
    """``payload`` with the current context (the attempt's span) in its headers, for a
    worker process: spans the task makes there nest under the run span."""
    from opentelemetry import propagate

    headers: dict[str, str] = {}
    propagate.inject(headers)
    return with_headers(payload, headers) if headers else payload


@contextlib.contextmanager
def context_of(payload: bytes) -> Iterator[None]:
    """Make the payload's trace context current (in a worker process) for the ``with``
    block; nothing when it has none or ``opentelemetry`` is not installed."""
    try:
        carrier = _carrier(payload)
        from opentelemetry import context, propagate
    except ImportError:
        carrier = None
    if not carrier:
        yield
        return
    token = context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        context.detach(token)


def _parent(payload: bytes) -> Context | None:
    carrier = _carrier(payload)
    if not carrier:
        return None
    from opentelemetry import propagate

    return propagate.extract(carrier)


def _carrier(payload: bytes) -> dict[str, str] | None:
    """The payload's headers that can be a trace context (strings only); None for a payload
    without headers, or one whose headers do not decode (the task then fails to decode its
    arguments anyway)."""
    try:
        headers = split_headers(payload)[1]
    except Exception:
        return None
    if not headers:
        return None
    return {k: v for k, v in headers.items() if type(k) is str and type(v) is str}


def _fail(span: Span, exc_type: str, message: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, f"{exc_type}: {message}"))
