"""Testing your tasks with pytest: a fresh embedded app per test, and a clock you advance.

Installing ``flowrra-fabric`` registers this module as a pytest plugin (the ``pytest11``
entry point ``flowrra``), so its fixtures are available in every test without an import:

``flowrra_app``
    An embedded copy of *your* app, started for the test and stopped after it: the same task
    registrations, a broker and a node in the test's event loop, and an empty in-memory store
    (a task submitted in one test is unknown in the next). Which app is copied comes from
    the ``flowrra_app_target`` fixture; by default that reads the ``flowrra_app`` marker
    (``@pytest.mark.flowrra_app("myproject.tasks:app")``, with options for
    :meth:`Flowrra.from_urls() <flowrra.Flowrra.from_urls>` as keyword arguments), else the
    ``flowrra_app`` ini option. Override ``flowrra_app_target`` in a ``conftest.py`` to
    return your app (or its ``"module:attribute"``) for a whole directory.

``flowrra_clock``
    The :class:`Clock` the embedded broker of ``flowrra_app`` reads the time from. It runs
    with real time; :meth:`Clock.advance` moves it forward at once, and the broker then runs
    the retries, countdowns and deadlines that became due without a real wait.

:func:`embedded_copy` builds such an app outside the fixtures, and :func:`wait_for_status`
waits for a task to reach a status (a retry being scheduled, say). See :doc:`testing`.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from flowrra import Flowrra
from flowrra.protocol import TaskStatus
from flowrra.result import TaskResult

__all__ = ["Clock", "embedded_copy", "load_app", "wait_for_status"]

MARKER = "flowrra_app"
INI_OPTION = "flowrra_app"


class Clock:
    """The time an embedded broker sees: real time plus what the test has advanced it by.

    Call it for the current time in Unix seconds, as :func:`time.time`. :meth:`advance`
    moves it forward and wakes the brokers that read it, so what became due runs at once.
    It never goes back.
    """

    def __init__(self) -> None:
        self.offset = 0.0  # seconds advanced so far
        self._listeners: list[Callable[[], None]] = []

    def __call__(self) -> float:
        return time.time() + self.offset

    def time(self) -> float:
        """The current time of this clock, in Unix seconds."""
        return self()

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward and wake the brokers that read it.

        A retry or a countdown that falls due is dispatched on the broker's next turn of the
        event loop: await its result (``await app.wait_for_result(task_id, timeout=5)``) or
        :func:`wait_for_status`.
        """
        if not seconds >= 0:  # also refuses NaN
            raise ValueError(f"the clock only moves forward: advance({seconds!r})")
        self.offset += float(seconds)
        for wake in list(self._listeners):
            wake()

    def attach(self, app: Flowrra) -> None:
        """Make the embedded broker of ``app`` read this clock (before ``app.start()``);
        once started, :meth:`advance` wakes it."""
        if not app.embedded:
            raise ValueError("only an embedded app's broker can use a test clock")
        if app._service is not None:
            raise RuntimeError("attach the clock before the app starts")
        app._broker_clock = self

    def _started(self, app: Flowrra) -> None:
        service = app._service
        if service is not None:
            self._listeners.append(service.wakeup.set)

    def _stopped(self, app: Flowrra) -> None:
        self._listeners.clear()


def load_app(target: Flowrra | str) -> Flowrra:
    """``target`` itself, or the app that ``"package.module:attribute"`` names (the attribute
    defaults to ``app``)."""
    if isinstance(target, Flowrra):
        return target
    if not isinstance(target, str) or not target.partition(":")[0]:
        raise TypeError(f"expected a Flowrra app or 'package.module:app', got {target!r}")
    module_name, _, attribute = target.partition(":")
    app = getattr(importlib.import_module(module_name), attribute or "app", None)
    if not isinstance(app, Flowrra):
        raise TypeError(f"{target!r} is not a Flowrra app (got {type(app).__qualname__})")
    return app


def embedded_copy(app: Flowrra | str, *, clock: Clock | None = None, **options: Any) -> Flowrra:
    """A new embedded app (not started) with the same task registrations as ``app``.

    ``options`` go to :meth:`Flowrra.from_urls() <flowrra.Flowrra.from_urls>` (for example
    ``processes=0``); with ``clock`` its broker reads that :class:`Clock`. The copy submits
    the same decorated functions (``await copy.submit(send_email, ...)``) and task names.
    """
    copy = Flowrra.from_urls(**options)
    copy_tasks(load_app(app), copy)
    if clock is not None:
        clock.attach(copy)
    return copy


async def wait_for_status(
    app: Flowrra,
    task_id: str,
    status: TaskStatus | str,
    *,
    retries: int | None = None,
    timeout: float = 10.0,
) -> TaskResult:
    """Wait until the task has ``status`` (and, if given, that many ``retries``); its result.

    For example ``await wait_for_status(app, task_id, "retrying", retries=1)`` returns once
    the first attempt failed and its retry is scheduled. Raises :class:`TimeoutError` after
    ``timeout`` real seconds, saying what the task's state was.
    """
    wanted = TaskStatus(status)
    deadline = time.monotonic() + timeout
    while True:
        result = await app.get_result(task_id)
        if (
            result is not None
            and result.status is wanted
            and (retries is None or result.retries == retries)
        ):
            return result
        if time.monotonic() > deadline:
            seen = "unknown" if result is None else f"{result.status} after {result.retries}"
            raise TimeoutError(
                f"task {task_id} did not reach {wanted} (retries={retries}) within "
                f"{timeout}s: {seen} retries"
            )
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- pytest plugin


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        INI_OPTION,
        "the app whose tasks the flowrra_app fixture copies, as 'package.module:app'",
        default=None,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(target, **options): the app whose tasks the flowrra_app fixture copies (a "
        "Flowrra app or 'package.module:app'), and options for Flowrra.from_urls()",
    )


@pytest.fixture
def flowrra_clock() -> Clock:
    """The clock of this test's ``flowrra_app`` broker: ``flowrra_clock.advance(60)``."""
    return Clock()


@pytest.fixture
def flowrra_app_target(request: pytest.FixtureRequest) -> Flowrra | str:
    """The app ``flowrra_app`` copies: the ``flowrra_app`` marker's target, else the
    ``flowrra_app`` ini option. Override this fixture to give it another way."""
    marker = request.node.get_closest_marker(MARKER)
    if marker is not None and marker.args:
        target: Flowrra | str = marker.args[0]
        return target
    configured = request.config.getini(INI_OPTION)
    if configured:
        return str(configured)
    raise pytest.UsageError(
        "flowrra_app needs to know your app: mark the test "
        "@pytest.mark.flowrra_app('myproject.tasks:app'), set 'flowrra_app = "
        "myproject.tasks:app' in the pytest configuration, or override the "
        "flowrra_app_target fixture"
    )


async def _flowrra_app(
    request: pytest.FixtureRequest, flowrra_app_target: Flowrra | str, flowrra_clock: Clock
) -> AsyncIterator[Flowrra]:
    """A started embedded copy of your app with an empty store, stopped after the test."""
    marker = request.node.get_closest_marker(MARKER)
    options = dict(marker.kwargs) if marker is not None else {}
    app = embedded_copy(flowrra_app_target, clock=flowrra_clock, **options)
    await app.start()
    flowrra_clock._started(app)
    try:
        yield app
    finally:
        flowrra_clock._stopped(app)
        await app.stop()


def _needs_pytest_asyncio() -> Flowrra:
    """Needs pytest-asyncio (``pip install pytest-asyncio``)."""
    raise pytest.UsageError("the flowrra_app fixture needs pytest-asyncio installed")


def _app_fixture() -> Any:
    """The ``flowrra_app`` fixture; without pytest-asyncio, one saying what is missing (the
    plugin loads in every pytest run where the package is installed, so it must not fail)."""
    try:
        import pytest_asyncio
    except ImportError:
        return pytest.fixture(_needs_pytest_asyncio, name="flowrra_app")
    return pytest_asyncio.fixture(_flowrra_app, name="flowrra_app")


flowrra_app = _app_fixture()


def copy_tasks(source: Flowrra, target: Flowrra) -> None:
    """Register every task of ``source`` on ``target``, with the same options."""
    for spec in source.tasks.values():
        target.task(
            name=spec.name,
            max_retries=spec.max_retries,
            retry_delay=spec.retry_delay,
            priority=spec.priority,
            cpu_bound=spec.cpu_bound,
            timeout=spec.timeout,
            rate_limit=spec.rate_limit,
            max_concurrency=spec.max_concurrency,
        )(spec.fn)
