"""The node's pool of worker processes for ``cpu_bound=True`` task functions.

Each worker is one ``multiprocessing`` process joined to the node by a duplex pipe. The parent
side of every pipe, and every process sentinel, is watched with ``loop.add_reader``, so any
number of calls run in parallel (one per process) without a thread per call and without polling.

Messages on a pipe are msgpack documents sent with ``send_bytes``/``recv_bytes``; task data is
never pickled:

* worker -> parent, once at start-up: ``["ready", pid]``
* parent -> worker: ``[module, qualname, payload]`` runs one call; ``nil`` asks the worker to exit
* worker -> parent: ``[true, result_bytes]`` or ``[false, [exc_type, message, traceback]]``

End of file on the pipe, and the process sentinel becoming readable, mean the worker died.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import importlib
import logging
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Final

import msgpack  # type: ignore[import-untyped, unused-ignore]

from flowrra import tracing
from flowrra.errors import RemoteTaskError, TaskTimeoutError, WorkerLostError
from flowrra.progress import Progress, Throttle, current_sink
from flowrra.protocol import pack_value, unpack_args

__all__ = ["FunctionRef", "ProcessPool"]

log = logging.getLogger("flowrra.node.pool")

# A worker that dies before it ever became ready is probably broken at import time; wait before
# starting another one so a broken environment does not turn into a fork loop.
_RESPAWN_DELAY_S: Final = 1.0
# How long close() waits after SIGTERM before it sends SIGKILL.
_TERMINATE_GRACE_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class FunctionRef:
    """Where a worker process finds a task function: module name and qualname."""

    module: str  # e.g. "myapp.tasks"; "__main__" means the parent's main script
    qualname: str


# --------------------------------------------------------------------------- worker side


def _pack(message: object) -> bytes:
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def _resolve(module_name: str, qualname: str) -> Callable[..., Any]:
    """Find a task function by module and qualname, as a worker process does."""
    if module_name == "__main__":
        # spawn re-imports the parent's main script under this name.
        module = sys.modules.get("__mp_main__") or sys.modules["__main__"]
    else:
        module = importlib.import_module(module_name)
    target: Any = module
    for part in qualname.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{module_name}.{qualname} is not callable")
    return target  # type: ignore[no-any-return]


def _text(value: object) -> str:
    """str() that never fails and always survives msgpack's UTF-8 encoding."""
    try:
        text = str(value)
    except Exception:
        text = f"<unprintable {type(value).__qualname__}>"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _run_one(
    request: Any, cache: dict[tuple[str, str], Callable[..., Any]], conn: Connection[Any, Any]
) -> list[Any]:
    # report_progress() in the task sends ["progress", current, total, message] to the node,
    # at most every PROGRESS_INTERVAL_S; the latest one held back goes before the result.
    throttle = Throttle(lambda p: conn.send_bytes(_pack(["progress", *p])))
    token = current_sink.set(throttle)
    try:
        module_name, qualname, payload = request
        key = (module_name, qualname)
        func = cache.get(key)
        if func is None:
            func = cache[key] = _resolve(module_name, qualname)
        args, kwargs = unpack_args(payload)
        with tracing.context_of(payload):  # the attempt's span, for spans the task makes
            return [True, pack_value(func(*args, **kwargs))]
    except BaseException as exc:  # SystemExit from a task is reported too, not obeyed
        return [False, [type(exc).__qualname__, _text(exc), _text(traceback.format_exc())]]
    finally:
        current_sink.reset(token)
        throttle.flush()


def _die_with_parent(parent_pid: int) -> None:
    """On Linux, have the kernel SIGKILL this worker when its node dies, even mid-call (a
    closed pipe is only noticed between calls)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1


def _worker_main(conn: Connection[Any, Any], parent_pid: int | None = None) -> None:
    """Entry point of a worker process: serve calls until told to stop or the pipe closes."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    # The parent owns Ctrl-C: it shuts workers down itself, so a terminal's SIGINT to the whole
    # process group must not kill calls in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Likewise SIGTERM to the whole group (systemd's default stop): the node drains first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    cache: dict[tuple[str, str], Callable[..., Any]] = {}
    try:
        conn.send_bytes(_pack(["ready", os.getpid()]))
        while True:
            # EOF here means the parent died: exit rather than linger as an orphan.
            request = msgpack.unpackb(conn.recv_bytes(), raw=False)
            if request is None:
                return
            conn.send_bytes(_pack(_run_one(request, cache, conn)))
    except (EOFError, OSError):
        return


# --------------------------------------------------------------------------- parent side


@dataclass(eq=False)
class _Worker:
    process: BaseProcess
    conn: Connection[Any, Any]
    pid: int
    ready: asyncio.Future[None]
    exited: asyncio.Future[int]
    is_ready: bool = False
    reading: bool = True
    call: asyncio.Future[Any] | None = None
    call_name: str = ""
    on_progress: Callable[[Progress], None] | None = None  # of the call it runs
    kill_reason: str | None = None  # set when the pool itself killed the process
    awaited: bool = False  # start() awaits `ready` and reports a failed start-up itself

    @property
    def usable(self) -> bool:
        return self.is_ready and not self.exited.done() and self.kill_reason is None


class ProcessPool:
    """A fixed-size pool of worker processes that run task functions, one call per process.

    Workers that die or overrun their timeout are replaced, so the pool keeps its size until
    :meth:`close`. Callers beyond the number of free workers wait in FIFO order.
    """

    def __init__(self, size: int, *, start_method: str = "spawn") -> None:
        if size < 1:
            raise ValueError("a process pool needs at least one worker")
        self._size = size
        self._ctx = multiprocessing.get_context(start_method)
        self._workers: list[_Worker] = []
        self._idle: collections.deque[_Worker] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[_Worker]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._closing: asyncio.Future[None] | None = None
        self._refill_timer: asyncio.TimerHandle | None = None

    @property
    def size(self) -> int:
        """The number of worker processes the pool keeps."""
        return self._size

    @property
    def alive(self) -> int:
        """The number of worker processes currently alive (starting, idle or busy)."""
        return sum(1 for w in self._workers if not w.exited.done() and w.process.is_alive())

    @property
    def idle(self) -> int:
        """The number of workers that are ready and not running a call."""
        return sum(1 for w in self._idle if w.usable)

    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.pid for w in self._workers if not w.exited.done()]

    async def start(self) -> None:
        """Start the worker processes; returns once every one is ready to take work."""
        if self._started:
            raise RuntimeError("process pool already started")
        self._started = True
        self._loop = asyncio.get_running_loop()
        try:
            workers = [self._spawn(awaited=True) for _ in range(self._size)]
            outcomes = await asyncio.gather(*(w.ready for w in workers), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
        except BaseException:
            await self.close()
            raise

    async def run(
        self,
        ref: FunctionRef,
        payload: bytes,
        timeout_s: float | None,
        on_progress: Callable[[Progress], None] | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> bytes:
        """Run one call in a worker process and return its packed result.

        ``timeout_s`` counts from when a worker takes the call, not while waiting for a free
        one; ``on_start`` is called then. Raises RemoteTaskError when the function raises (or
        its result cannot be encoded), TaskTimeoutError when it overruns and WorkerLostError
        when its process dies.
        """
        if not self._started or self._closing is not None:
            raise RuntimeError("process pool is not running")
        loop = asyncio.get_running_loop()
        worker = await self._acquire()
        if on_start is not None:
            on_start()
        call: asyncio.Future[Any] = loop.create_future()
        worker.call = call
        worker.call_name = ref.qualname
        worker.on_progress = on_progress
        if tracing.tracer is not None:
            payload = tracing.with_current_context(payload)  # the attempt's span
        with contextlib.suppress(OSError):  # a dying process: its sentinel will fail `call`
            worker.conn.send_bytes(_pack([ref.module, ref.qualname, payload]))
        try:
            async with asyncio.timeout(timeout_s):
                reply = await call
        except TimeoutError:
            if not call.done() or call.cancelled():
                self._kill(worker, f"{ref.qualname} exceeded its timeout of {timeout_s}s")
                # Reap it before reporting, so a timed-out call never outlives its error.
                await asyncio.shield(worker.exited)
                raise TaskTimeoutError(f"task exceeded its timeout of {timeout_s}s") from None
            reply = call.result()  # the reply and the deadline arrived together
        except asyncio.CancelledError:
            # A worker cannot be interrupted mid-call; killing it is the only way to stop it.
            if not call.done() or call.cancelled():
                self._kill(worker, f"call to {ref.qualname} was cancelled")
            else:
                self._finish(worker)
            raise
        self._finish(worker)
        ok, body = reply
        if ok:
            return body  # type: ignore[no-any-return]
        exc_type, message, tb = body
        raise RemoteTaskError(exc_type, message, tb)

    async def close(self, *, grace_s: float = 2.0) -> None:
        """Stop every worker: ask them to exit, then SIGTERM and SIGKILL stragglers.

        Calls still running when the grace period ends fail with WorkerLostError, and callers
        still waiting for a worker fail too. Safe to call more than once.
        """
        if self._closing is not None:
            await asyncio.shield(self._closing)
            return
        loop = asyncio.get_running_loop()
        self._closing = loop.create_future()
        try:
            if self._refill_timer is not None:
                self._refill_timer.cancel()
                self._refill_timer = None
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(WorkerLostError("process pool closed"))
            self._idle.clear()
            workers = list(self._workers)
            for w in workers:
                with contextlib.suppress(OSError):
                    w.conn.send_bytes(_pack(None))
            pending = {w.exited for w in workers if not w.exited.done()}
            if pending:
                _, pending = await asyncio.wait(pending, timeout=grace_s)
            if pending:
                for w in workers:
                    if not w.exited.done():
                        w.process.terminate()
                _, pending = await asyncio.wait(pending, timeout=_TERMINATE_GRACE_S)
            if pending:
                for w in workers:
                    if not w.exited.done():
                        w.process.kill()
                await asyncio.wait(pending)
            log.info("process pool closed (%d workers stopped)", len(workers))
        finally:
            self._closing.set_result(None)

    # ----------------------------------------------------------------------- internals

    def _spawn(self, *, awaited: bool = False) -> _Worker:
        loop = self._loop
        assert loop is not None
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        try:
            # daemon=True: if the node exits without close(), multiprocessing terminates the
            # workers instead of joining them forever.
            process = self._ctx.Process(  # type: ignore[attr-defined]
                target=_worker_main,
                args=(child_conn, os.getpid()),
                name="flowrra-cpu-worker",
                daemon=True,
            )
            process.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()  # only the child holds its end now, so its death reads as EOF
        worker = _Worker(
            process=process,
            conn=parent_conn,
            pid=process.pid,
            ready=loop.create_future(),
            exited=loop.create_future(),
            awaited=awaited,
        )
        self._workers.append(worker)
        loop.add_reader(parent_conn.fileno(), self._on_readable, worker)
        loop.add_reader(process.sentinel, self._on_exit, worker)
        return worker

    async def _acquire(self) -> _Worker:
        while True:
            if self._idle:
                worker = self._idle.popleft()
            else:
                loop = asyncio.get_running_loop()
                waiter: asyncio.Future[_Worker] = loop.create_future()
                self._waiters.append(waiter)
                try:
                    worker = await waiter
                except asyncio.CancelledError:
                    if waiter.done() and not waiter.cancelled():
                        self._release(waiter.result())
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                    raise
            # A worker handed to a waiter may have died before the waiter woke up.
            if worker.usable:
                return worker

    def _release(self, worker: _Worker) -> None:
        if self._closing is not None or not worker.usable:
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    def _finish(self, worker: _Worker) -> None:
        worker.call = None
        worker.call_name = ""
        self._release(worker)

    def _kill(self, worker: _Worker, reason: str) -> None:
        if worker.kill_reason is None:
            worker.kill_reason = reason
        if not worker.exited.done():
            worker.process.kill()

    def _stop_reading(self, worker: _Worker) -> None:
        if worker.reading:
            worker.reading = False
            assert self._loop is not None
            self._loop.remove_reader(worker.conn.fileno())

    def _on_readable(self, worker: _Worker) -> None:
        try:
            raw = worker.conn.recv_bytes()
        except (EOFError, OSError):
            # The process is exiting; its sentinel reports the exit code shortly.
            self._stop_reading(worker)
            return
        self._handle_message(worker, raw)

    def _handle_message(self, worker: _Worker, raw: bytes) -> None:
        try:
            message = msgpack.unpackb(raw, raw=False)
        except Exception:
            message = None
        if isinstance(message, list) and len(message) == 2 and message[0] == "ready":
            if not worker.is_ready:
                worker.is_ready = True
                worker.ready.set_result(None)
                log.info("worker process %d started", worker.pid)
                self._release(worker)
            return
        call = worker.call
        if call is None or call.done():
            return  # a reply to a call whose caller already gave up on it
        if isinstance(message, list) and len(message) == 4 and message[0] == "progress":
            _, current, total, text = message
            if worker.on_progress is not None and isinstance(current, int | float):
                worker.on_progress(Progress(current, total, text))
            return
        if (
            isinstance(message, list)
            and len(message) == 2
            and isinstance(message[0], bool)
            and (isinstance(message[1], bytes) if message[0] else _is_error_body(message[1]))
        ):
            call.set_result(message)
        else:
            call.set_exception(
                RemoteTaskError("ProtocolError", f"worker process {worker.pid} sent a bad reply")
            )
            self._kill(worker, "it sent a malformed reply")

    def _on_exit(self, worker: _Worker) -> None:
        loop = self._loop
        assert loop is not None
        loop.remove_reader(worker.process.sentinel)
        # A reply written just before the process died is still in the pipe: deliver it first.
        while worker.reading:
            try:
                if not worker.conn.poll(0):
                    break
                raw = worker.conn.recv_bytes()
            except (EOFError, OSError):
                break
            self._handle_message(worker, raw)
        self._stop_reading(worker)
        worker.conn.close()
        worker.process.join()  # returns at once: the sentinel says the process has ended
        code = worker.process.exitcode
        exit_code = code if code is not None else -1
        worker.exited.set_result(exit_code)
        self._workers.remove(worker)
        with contextlib.suppress(ValueError):
            self._idle.remove(worker)

        call_name = worker.call_name
        if worker.call is not None and not worker.call.done():
            worker.call.set_exception(
                WorkerLostError(
                    f"worker process {worker.pid} died (exit code {exit_code}) "
                    f"while running {call_name}"
                )
            )
        if not worker.is_ready:
            if worker.awaited:
                worker.ready.set_exception(
                    WorkerLostError(
                        f"worker process {worker.pid} exited (exit code {exit_code}) before "
                        "it was ready"
                    )
                )
            elif self._closing is None:
                log.error(
                    "worker process %d exited (exit code %d) during start-up; "
                    "starting another in %.0fs",
                    worker.pid,
                    exit_code,
                    _RESPAWN_DELAY_S,
                )
                self._schedule_refill()
            return
        if self._closing is not None:
            return
        if worker.kill_reason is not None:
            reason = f"killed because {worker.kill_reason}"
        elif call_name:
            reason = f"died (exit code {exit_code}) while running {call_name}"
        else:
            reason = f"died (exit code {exit_code}) while idle"
        new = self._respawn()
        log.warning(
            "worker process %d replaced by %s: %s",
            worker.pid,
            new.pid if new is not None else "nothing (spawn failed)",
            reason,
        )

    def _respawn(self) -> _Worker | None:
        try:
            return self._spawn()
        except Exception:
            log.exception("cannot start a worker process; retrying in %.0fs", _RESPAWN_DELAY_S)
            self._schedule_refill()
            return None

    def _schedule_refill(self) -> None:
        if self._refill_timer is None:
            assert self._loop is not None
            self._refill_timer = self._loop.call_later(_RESPAWN_DELAY_S, self._refill)

    def _refill(self) -> None:
        self._refill_timer = None
        while self._closing is None and len(self._workers) < self._size:
            if self._respawn() is None:
                return


def _is_error_body(body: object) -> bool:
    return isinstance(body, list) and len(body) == 3 and all(isinstance(part, str) for part in body)
