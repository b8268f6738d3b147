"""``app.sync``: the client API for code that is not async (Django views, Flask, scripts).

Every method has the name, the arguments and the errors of the async method of
:class:`~flowrra.Flowrra` it stands for, and blocks the calling thread until that method is
done. The async methods run in one background event-loop thread per app: the first call starts
it (and starts the app in it, as ``await app.start()`` would); :meth:`BlockingFlowrra.close`
stops the app in that loop and joins the thread, and so does interpreter exit, after a bounded
wait for submits that are still awaiting the broker's acknowledgement.

Any number of threads may call it at once: the app's client only ever runs in the loop
thread. A call made from inside a running event loop raises :class:`SyncCallInLoopError`
instead of stalling that loop; use the async API there.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

from flowrra.errors import FlowrraError
from flowrra.result import TaskResult
from flowrra.scheduler import ScheduledTask, Scheduler

log = logging.getLogger("flowrra.blocking")

T = TypeVar("T")

# At close or interpreter exit, submits still awaiting the broker's acknowledgement get this
# long to be acknowledged before the app is stopped.
ACK_GRACE_S = 5.0
# How long close() waits for the app to stop in its loop, and then for the thread to end.
STOP_TIMEOUT_S = 30.0
# A blocked caller looks this often whether the loop thread is still alive.
_POLL_S = 0.25
# A call with a timeout gives up this long after it, should the loop not answer (blocked).
_TIMEOUT_SLACK_S = 1.0

_facades_lock = threading.Lock()
_FACADE_ATTRIBUTE = "_flowrra_blocking_facade"


class SyncCallInLoopError(FlowrraError, RuntimeError):
    """A blocking ``app.sync`` method was called from inside a running event loop.

    Blocking there would stall that loop (or deadlock it); async code uses the async API:
    ``await app.submit(...)`` instead of ``app.sync.submit(...)``.
    """


class _AsyncApp(Protocol):
    """What the facade uses of :class:`~flowrra.Flowrra` (which it must not import)."""

    @property
    def _client(self) -> object: ...

    def start(self) -> Coroutine[Any, Any, None]: ...
    def stop(self) -> Coroutine[Any, Any, None]: ...
    def submit(self, task: Any, /, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, str]: ...
    def submit_many(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, list[str]]: ...
    def wait_for_result(
        self, task_id: str, timeout: float | None = None
    ) -> Coroutine[Any, Any, TaskResult]: ...
    def get_result(self, task_id: str) -> Coroutine[Any, Any, TaskResult | None]: ...
    def cancel(self, task_id: str) -> Coroutine[Any, Any, bool]: ...
    def admin(self, verb: str, **args: Any) -> Coroutine[Any, Any, Any]: ...
    def chain(self, *links: Any) -> Coroutine[Any, Any, str]: ...
    def group(self, *calls: Any) -> Coroutine[Any, Any, str]: ...
    def chord(self, header: Any, callback: Any) -> Coroutine[Any, Any, str]: ...
    def wait_for_group(
        self, group_id: str, timeout: float | None = None
    ) -> Coroutine[Any, Any, list[TaskResult]]: ...
    def get_group(self, group_id: str) -> Coroutine[Any, Any, list[TaskResult] | None]: ...
    def watch(self, task_id: str) -> AsyncIterator[TaskResult]: ...
    def create_scheduler(self) -> Scheduler: ...

    @property
    def scheduler(self) -> Scheduler: ...


@dataclass(frozen=True, slots=True)
class _LoopThread:
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread


def _refuse_in_loop(method: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return  # no loop runs in this thread: blocking is fine
    instead = (
        "`async for snapshot in app.watch(...)`"
        if method == "watch"
        else f"`await app.{method}(...)`"
    )
    raise SyncCallInLoopError(
        f"app.sync.{method}() blocks, and it was called from inside a running event loop, "
        f"which it would stall: use {instead} inside async code"
    )


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The loop thread: run until stopped, then end what is left as ``asyncio.run`` does."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


class BlockingFlowrra:
    """The blocking facade of one app; get it as ``app.sync`` (one per app).

    Methods take exactly the arguments of the async :class:`~flowrra.Flowrra` methods of the
    same name and raise the same exceptions, unchanged (``SerializationError``,
    ``TaskIdConflict``, ``TimeoutError``, ...), in the calling thread. It is safe to call from
    any number of threads at once, and never from inside a running event loop
    (:class:`SyncCallInLoopError`).

    An app used through ``app.sync`` runs in the facade's own loop: do not also start it with
    ``async with app:`` elsewhere. Starting the facade while the app is already started in
    another loop raises :class:`~flowrra.errors.FlowrraError`.
    """

    def __init__(self, app: _AsyncApp) -> None:
        self._app = app
        self._lock = threading.Lock()  # starting and stopping the loop, scheduling calls
        self._state: _LoopThread | None = None
        self._exiting = False  # the interpreter is exiting: no new start
        self._scheduler: BlockingScheduler | None = None
        # Calls whose effect the broker acknowledges (submits, cancels, schedules...),
        # given a grace period at close and exit.
        self._pending_lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()

    @classmethod
    def of(cls, app: _AsyncApp) -> BlockingFlowrra:
        """The one facade of ``app`` (made on first use, thread-safely)."""
        with _facades_lock:
            facade: BlockingFlowrra | None = getattr(app, _FACADE_ATTRIBUTE, None)
            if facade is None:
                facade = cls(app)
                setattr(app, _FACADE_ATTRIBUTE, facade)
            return facade

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        """True while the background loop thread runs (after the first call, until close)."""
        state = self._state
        return state is not None and state.thread.is_alive()

    @property
    def pending_acknowledgements(self) -> int:
        """Calls in flight (from any thread) whose effect the broker acknowledges: submits,
        cancels, workflows, schedule changes, operator commands."""
        with self._pending_lock:
            return sum(not future.done() for future in self._pending)

    def start(self) -> None:
        """Start the loop thread and the app in it now, rather than at the first call (for
        example when a web application starts, so that connection errors show there)."""
        _refuse_in_loop("start")
        with self._lock:
            self._started()

    def close(self, timeout: float = ACK_GRACE_S) -> None:
        """Stop the app in the loop and join the loop thread.

        Submits (and other acknowledged calls) still in flight in other threads get up to
        ``timeout`` seconds to be acknowledged first; calls still waiting after that raise
        (:class:`~flowrra.errors.BrokerUnavailable` or :class:`~flowrra.errors.FlowrraError`).
        Closing twice is harmless; a later call starts the facade again.
        """
        _refuse_in_loop("close")
        self._close(timeout)

    def __enter__(self) -> BlockingFlowrra:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _started(self) -> _LoopThread:
        """The running loop thread, started (with the app) if needed; hold ``_lock``."""
        state = self._state
        if state is not None:
            if state.thread.is_alive():
                return state
            self._state = None  # the loop died: start afresh
        if self._exiting:
            raise FlowrraError("the interpreter is exiting: app.sync has been stopped")
        if self._app._client is not None:
            raise FlowrraError(
                "this app is already started in another event loop ('async with app:' or "
                "'await app.start()'): use its async API there, or give the blocking code an "
                "app of its own; app.sync runs the app in a loop thread of its own"
            )
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=_run_loop, args=(loop,), name="flowrra-sync-loop", daemon=True
        )
        thread.start()
        state = _LoopThread(loop, thread)
        try:
            self._wait(asyncio.run_coroutine_threadsafe(self._app.start(), loop), state, None)
        except BaseException:
            self._stop_app(state)  # whatever part of it had started
            self._stop_loop(state, STOP_TIMEOUT_S)
            raise
        self._state = state
        atexit.register(self._at_exit)
        return state

    def _close(self, grace_s: float) -> None:
        with self._lock:  # calls made meanwhile wait, then start the facade again
            state, self._state = self._state, None
            if state is None:
                return
            atexit.unregister(self._at_exit)
            with self._pending_lock:
                pending = list(self._pending)
            if pending and state.thread.is_alive():
                concurrent.futures.wait(pending, timeout=grace_s)
            self._stop_app(state)
            self._stop_loop(state, STOP_TIMEOUT_S)

    def _stop_app(self, state: _LoopThread) -> None:
        if not state.thread.is_alive():
            return
        stopping = asyncio.run_coroutine_threadsafe(self._app.stop(), state.loop)
        try:
            stopping.result(STOP_TIMEOUT_S)
        except Exception:
            log.exception("stopping the app in the app.sync loop failed")

    @staticmethod
    def _stop_loop(state: _LoopThread, timeout: float) -> None:
        if state.thread.is_alive():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: the thread is ending
                state.loop.call_soon_threadsafe(state.loop.stop)
            state.thread.join(timeout)
        if state.thread.is_alive():
            log.warning("the app.sync loop thread did not stop within %.0fs", timeout)

    def _at_exit(self) -> None:
        self._exiting = True
        self._close(ACK_GRACE_S)

    # ------------------------------------------------------------------ running calls

    def _call(
        self,
        method: str,
        make: Callable[[], Coroutine[Any, Any, T]],
        *,
        timeout: float | None = None,
        acknowledged: bool = False,
    ) -> T:
        """Run ``make()`` in the loop thread and return its result in this one."""
        _refuse_in_loop(method)
        coro = make()  # bad arguments raise here, as the async call would
        try:
            with self._lock:
                state = self._started()
                future = asyncio.run_coroutine_threadsafe(coro, state.loop)
                if acknowledged:  # registered before close() can look: it gets the grace
                    with self._pending_lock:
                        self._pending.add(future)
        except BaseException:
            coro.close()
            raise
        try:
            return self._wait(future, state, timeout)
        finally:
            if acknowledged:
                with self._pending_lock:
                    self._pending.discard(future)

    @staticmethod
    def _wait(future: concurrent.futures.Future[T], state: _LoopThread, timeout: float | None) -> T:
        """The call's result or exception; never blocks for good if the loop thread dies,
        nor (with a timeout) much past the timeout if the loop is blocked."""
        give_up = None if timeout is None else time.monotonic() + timeout + _TIMEOUT_SLACK_S
        try:
            while True:
                try:
                    future.exception(_POLL_S)  # waits; returns (not raises) the call's error
                except concurrent.futures.CancelledError:
                    break
                except concurrent.futures.TimeoutError:  # only this wait: the call runs on
                    if not state.thread.is_alive():
                        raise FlowrraError(
                            "the app.sync loop thread stopped before the call ended"
                        ) from None
                    if give_up is not None and time.monotonic() >= give_up:
                        raise TimeoutError(
                            f"the app.sync loop did not answer within {timeout}s "
                            "(is something blocking it?)"
                        ) from None
                    continue
                break
        except BaseException:  # KeyboardInterrupt included: the call is abandoned
            future.cancel()
            raise
        if future.cancelled():
            raise FlowrraError("app.sync was closed while this call was waiting")
        return future.result()

    # ------------------------------------------------------------------ submitting

    def submit(self, task: Callable[..., Any] | str, /, *args: Any, **kwargs: Any) -> str:
        """:meth:`Flowrra.submit <flowrra.Flowrra.submit>`, blocking: the task's id once the
        broker has stored it (same arguments, options such as ``priority``, ``task_id``,
        ``countdown``, ``eta``, ``expires`` included)."""
        return self._call(
            "submit", lambda: self._app.submit(task, *args, **kwargs), acknowledged=True
        )

    def submit_many(self, *args: Any, **kwargs: Any) -> list[str]:
        """:meth:`Flowrra.submit_many <flowrra.Flowrra.submit_many>`, blocking."""
        return self._call(
            "submit_many", lambda: self._app.submit_many(*args, **kwargs), acknowledged=True
        )

    def cancel(self, task_id: str) -> bool:
        """``Flowrra.cancel``, blocking: True if this call stopped the task."""
        return self._call("cancel", lambda: self._app.cancel(task_id), acknowledged=True)

    def admin(self, verb: str, **args: Any) -> Any:
        """``Flowrra.admin``, blocking: an operator command on the broker."""
        return self._call("admin", lambda: self._app.admin(verb, **args), acknowledged=True)

    # ------------------------------------------------------------------ results

    def wait_for_result(self, task_id: str, timeout: float | None = None) -> TaskResult:
        """:meth:`Flowrra.wait_for_result <flowrra.Flowrra.wait_for_result>`, blocking;
        raises ``TimeoutError`` after ``timeout`` seconds."""
        return self._call(
            "wait_for_result", lambda: self._app.wait_for_result(task_id, timeout), timeout=timeout
        )

    def get_result(self, task_id: str) -> TaskResult | None:
        """:meth:`Flowrra.get_result <flowrra.Flowrra.get_result>`, blocking."""
        return self._call("get_result", lambda: self._app.get_result(task_id))

    def watch(self, task_id: str) -> Iterator[TaskResult]:
        """``for snapshot in app.sync.watch(task_id)``: ``Flowrra.watch``, blocking on each
        step (each call of ``next`` waits for the task's next change)."""
        updates = self._app.watch(task_id)
        done = object()

        async def step() -> Any:
            try:
                return await anext(updates)
            except StopAsyncIteration:
                return done

        async def close() -> None:
            aclose = getattr(updates, "aclose", None)
            if aclose is not None:
                await aclose()

        try:
            while True:
                snapshot = self._call("watch", step)
                if snapshot is done:
                    return
                yield snapshot
        finally:
            if self.running:
                with contextlib.suppress(Exception):  # the loop may be closing meanwhile
                    self._call("watch", close)

    # ------------------------------------------------------------------ workflows

    def chain(self, *links: Any) -> str:
        """``Flowrra.chain``, blocking: the last task's id."""
        return self._call("chain", lambda: self._app.chain(*links), acknowledged=True)

    def group(self, *calls: Any) -> str:
        """``Flowrra.group``, blocking: the group's id."""
        return self._call("group", lambda: self._app.group(*calls), acknowledged=True)

    def chord(self, header: Any, callback: Any) -> str:
        """``Flowrra.chord``, blocking: the callback's id."""
        return self._call("chord", lambda: self._app.chord(header, callback), acknowledged=True)

    def wait_for_group(self, group_id: str, timeout: float | None = None) -> list[TaskResult]:
        """``Flowrra.wait_for_group``, blocking."""
        return self._call(
            "wait_for_group", lambda: self._app.wait_for_group(group_id, timeout), timeout=timeout
        )

    def get_group(self, group_id: str) -> list[TaskResult] | None:
        """``Flowrra.get_group``, blocking."""
        return self._call("get_group", lambda: self._app.get_group(group_id))

    # ------------------------------------------------------------------ schedules

    def create_scheduler(self) -> BlockingScheduler:
        """The blocking face of ``app.create_scheduler()`` (also ``app.sync.scheduler``
        after this): the same methods, blocking."""
        scheduler = self._app.create_scheduler()
        with self._pending_lock:  # a short lock (never held while the loop works)
            if self._scheduler is None:
                self._scheduler = BlockingScheduler(self, scheduler)
            return self._scheduler

    @property
    def scheduler(self) -> BlockingScheduler:
        """The scheduler made by :meth:`create_scheduler` (FlowrraError before it, as
        ``app.scheduler``)."""
        self._app.scheduler  # noqa: B018 - raises the app's own error when there is none
        return self.create_scheduler()


class BlockingScheduler:
    """:class:`~flowrra.scheduler.Scheduler`'s methods, blocking (``app.sync.scheduler``)."""

    def __init__(self, facade: BlockingFlowrra, scheduler: Scheduler) -> None:
        self._facade = facade
        self._scheduler = scheduler

    def _run(self, method: str, make: Callable[[], Coroutine[Any, Any, T]], changes: bool) -> T:
        return self._facade._call(f"scheduler.{method}", make, acknowledged=changes)

    def schedule_cron(self, task_name: Any, cron: str, *args: Any, **kwargs: Any) -> str:
        """``Scheduler.schedule_cron``, blocking: the schedule's id."""
        s = self._scheduler
        return self._run(
            "schedule_cron", lambda: s.schedule_cron(task_name, cron, *args, **kwargs), True
        )

    def schedule_interval(self, task_name: Any, interval: Any, *args: Any, **kwargs: Any) -> str:
        """``Scheduler.schedule_interval``, blocking: the schedule's id."""
        s = self._scheduler
        return self._run(
            "schedule_interval",
            lambda: s.schedule_interval(task_name, interval, *args, **kwargs),
            True,
        )

    def schedule_once(self, task_name: Any, run_at: Any, *args: Any, **kwargs: Any) -> str:
        """``Scheduler.schedule_once``, blocking: the schedule's id."""
        s = self._scheduler
        return self._run(
            "schedule_once", lambda: s.schedule_once(task_name, run_at, *args, **kwargs), True
        )

    def unschedule(self, id: str) -> bool:
        """``Scheduler.unschedule``, blocking."""
        return self._run("unschedule", lambda: self._scheduler.unschedule(id), True)

    def enable_task(self, id: str) -> bool:
        """``Scheduler.enable_task``, blocking."""
        return self._run("enable_task", lambda: self._scheduler.enable_task(id), True)

    def disable_task(self, id: str) -> bool:
        """``Scheduler.disable_task``, blocking."""
        return self._run("disable_task", lambda: self._scheduler.disable_task(id), True)

    def get_scheduled_task(self, id: str) -> ScheduledTask | None:
        """``Scheduler.get_scheduled_task``, blocking."""
        return self._run(
            "get_scheduled_task", lambda: self._scheduler.get_scheduled_task(id), False
        )

    def list_scheduled_tasks(self) -> list[ScheduledTask]:
        """``Scheduler.list_scheduled_tasks``, blocking."""
        return self._run("list_scheduled_tasks", self._scheduler.list_scheduled_tasks, False)
