#!/usr/bin/env python3
"""Flowrra benchmarks, each figure set against a raw pyzmq baseline measured in the same run.

    .venv/bin/python scripts/bench.py                 # everything, a few minutes
    .venv/bin/python scripts/bench.py --quick         # tiny sizes: proves it works in seconds
    .venv/bin/python scripts/bench.py --json          # JSON on stdout (table goes to stderr)
    .venv/bin/python scripts/bench.py --modes fast --workloads w1,w2
    .venv/bin/python scripts/bench.py --upstream /tmp/upstream/bin/python

What it measures (sizes are the defaults; ``--quick`` shrinks them):

* baseline: DEALER client -> ROUTER pass-through broker -> DEALER worker and back, ~100-byte
  msgpack messages over tcp loopback, three processes, sync pyzmq + Poller: round trips/s with
  1,000 in flight (20,000 messages) and sequential round-trip p50/p99 (1,000);
* pool: W3's work in a bare ``ProcessPoolExecutor(2)`` with ``pool.map``;
* W1-seq (the headline: the guide's one-call-at-a-time pattern): one client,
  ``ids = [await app.submit(add, i, i) for i in range(10_000)]``, then every result awaited
  (asyncio.gather of ``wait_for_result``); tasks/s from first submit to last result;
* W1: one client, 10,000 ``add(x, y)`` tasks, first submit to last result, as (i) asyncio.gather
  of ``app.submit`` and (ii) ``app.submit_many``;
* W2: 1,000 sequential submit + wait_for_result round trips, p50/p99;
* W3: 400 ``cpu_bound`` ``sum(range(200_000))`` tasks through a node with 2 worker processes;
* W4: 4 client processes doing W1 (submit_many) at once; total tasks/s;

for the embedded default (``Flowrra.from_urls()``, in-process), and for ``flowrra-broker`` +
``flowrra-node`` processes on loopback with ``--durability full`` and ``--durability fast``.
``--upstream PYTHON`` also runs W1-seq, W1 (gather) and W2 on upstream flowrra 0.1.8's
in-process executor under that interpreter. The summary ends with the performance targets
(issue 9's first), each as a ratio taken within this one run.

Progress goes to stderr. Every process the bench starts is stopped on exit, error or Ctrl-C.
"""

# Only the standard library at module level: the same file runs under the upstream
# interpreter (``_upstream`` role), which has neither pyzmq nor this project installed.
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
# The node's async slots: the same 1,000 in flight as the baseline. With a window of 100 the
# node and the broker take turns on one batch (lock-step); a deeper one lets them overlap.
NODE_CONCURRENCY = 1000
HOST = "127.0.0.1"

ALL_MODES = ("embedded", "full", "fast")
ALL_WORKLOADS = ("w1seq", "w1", "w2", "w3", "w4", "wf")

FULL_SIZES = {
    "baseline_messages": 20_000,
    "baseline_window": 1_000,
    "baseline_sequential": 1_000,
    "w1_seq_tasks": 10_000,
    "w1_tasks": 10_000,
    "w2_rounds": 1_000,
    "w3_tasks": 400,
    "w3_n": 200_000,
    "w4_clients": 4,
    "w4_tasks": 10_000,
    "chord_members": 1_000,
    "chain_links": 100,
}
QUICK_SIZES = {
    "baseline_messages": 2_000,
    "baseline_window": 1_000,
    "baseline_sequential": 100,
    "w1_seq_tasks": 300,
    "w1_tasks": 300,
    "w2_rounds": 50,
    "w3_tasks": 8,
    "w3_n": 200_000,
    "w4_clients": 4,
    "w4_tasks": 200,
    "chord_members": 50,
    "chain_links": 10,
}
WARMUP_TASKS = 200
PROFILED_STEPS = ("w1_seq", "w1_many", "w2")  # with --profile
WARMUP_ROUNDS = 20


# --------------------------------------------------------------------------- small helpers

_T0 = time.monotonic()


def progress(text: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f}s] {text}", file=sys.stderr, flush=True)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of ``values`` (p in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "count": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms),
        "max_ms": max(ms),
    }


def _die_with_parent() -> None:
    """In a child before exec: new session, and SIGTERM when the bench process dies."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """User+system CPU of every live process in process group ``pgid`` (Linux /proc)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        # fields[0] is state (field 3); pgrp is field 5, utime 14, stime 15
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / clock_ticks()


# --------------------------------------------------------------------------- child processes


class LineReader:
    """Collects a pipe's lines in a thread; lets the caller wait for a line containing text."""

    def __init__(self, stream: Any, keep: int = 200) -> None:
        self.lines: deque[str] = deque(maxlen=keep)
        self._cond = threading.Condition()
        self._closed = False
        self._count = 0
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._count += 1
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_for(self, text: str, timeout: float) -> str | None:
        """The first kept line containing ``text``; None on timeout or end of stream."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return None
                self._cond.wait(min(remaining, 0.2))

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def tail(self, n: int = 15) -> str:
        with self._cond:
            return "\n".join(list(self.lines)[-n:])


class Child:
    def __init__(self, name: str, popen: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.popen = popen
        self.out = LineReader(popen.stdout)
        self.err = LineReader(popen.stderr)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_seconds(self) -> float:
        """CPU of this child and of its own children (they share its process group)."""
        return group_cpu_seconds(self.popen.pid)

    def describe_failure(self) -> str:
        return (
            f"{self.name} (pid {self.pid}, exit {self.popen.poll()}); last stderr lines:\n"
            f"{self.err.tail()}"
        )


class Children:
    """Every process the bench starts; :meth:`stop_all` ends them (and their children)."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        stdin: bool = False,
    ) -> Child:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,  # Ctrl-C reaches only the bench, which stops them in order
            preexec_fn=_die_with_parent,
        )
        child = Child(name, popen)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace: float = 5.0) -> None:
        """SIGTERM the child's process group, then SIGKILL whatever is left after ``grace``."""
        pgid = child.pid  # start_new_session: the child leads its own group
        if child.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(grace)
        # the group may still hold the child's own children (a node's worker processes)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(2)
        for stream in (child.popen.stdin, child.popen.stdout, child.popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child, grace=3.0)


def python_env(extra_path: Path | None = SCRIPTS) -> dict[str, str]:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(extra_path), env.get("PYTHONPATH", "")) if p
        )
    env["PYTHONUNBUFFERED"] = "1"
    return env


class StepError(Exception):
    """One measurement failed; the rest of the run goes on."""


# --------------------------------------------------------------------------- baseline roles
# Plain sync pyzmq with a Poller, three processes: client, pass-through broker, worker.


def _stop_flag() -> list[bool]:
    flag = [False]

    def handler(signum: int, frame: Any) -> None:
        flag[0] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return flag


def role_baseline_broker() -> None:
    import zmq

    stop = _stop_flag()
    ctx = zmq.Context()
    front = ctx.socket(zmq.ROUTER)  # clients' DEALERs connect here
    back = ctx.socket(zmq.ROUTER)  # the worker's DEALER connects here
    for s in (front, back):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable reply raises, it is not dropped
        # Far above the 1,000 in flight, so the HWM (where ROUTER drops) is never reached.
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
    front_port = front.bind_to_random_port(f"tcp://{HOST}")
    back_port = back.bind_to_random_port(f"tcp://{HOST}")
    print(
        json.dumps({"front": f"tcp://{HOST}:{front_port}", "back": f"tcp://{HOST}:{back_port}"}),
        flush=True,
    )
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    worker: bytes | None = None
    waiting: deque[list[bytes]] = deque()  # requests that arrived before the worker did
    forwarded = 0
    while not stop[0]:
        events = dict(poller.poll(100))
        if back in events:
            while True:
                try:
                    frames = back.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if frames[1] == b"READY":
                    worker = frames[0]
                    while waiting:
                        back.send_multipart([worker, *waiting.popleft()])
                else:
                    front.send_multipart(frames[1:])  # [client id, reply]
                    forwarded += 1
        if front in events:
            while True:
                try:
                    frames = front.recv_multipart(zmq.NOBLOCK)  # [client id, request]
                except zmq.Again:
                    break
                if worker is None:
                    waiting.append(frames)
                else:
                    back.send_multipart([worker, *frames])
    front.close()
    back.close()
    ctx.term()
    print(json.dumps({"forwarded": forwarded, "cpu_s": time.process_time()}), flush=True)


def role_baseline_worker(url: str) -> None:
    import msgpack
    import zmq

    stop = _stop_flag()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(url)
    sock.send(b"READY")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    pad = "r" * 40
    handled = 0
    while not stop[0]:
        if not poller.poll(100):
            continue
        while True:
            try:
                client, request = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = msgpack.unpackb(request)
            x, y = msg["args"]
            reply = msgpack.packb(
                {"id": msg["id"], "status": "success", "result": x + y, "pad": pad}
            )
            sock.send_multipart([client, reply])
            handled += 1
    sock.close()
    ctx.term()
    print(json.dumps({"handled": handled, "cpu_s": time.process_time()}), flush=True)


def role_baseline_client(url: str, messages: int, window: int, sequential: int) -> None:
    import msgpack
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 20_000)  # a lost message fails the run instead of hanging
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.RCVHWM, 100_000)
    sock.connect(url)
    pad = "q" * 40

    def request(i: int) -> bytes:
        data: bytes = msgpack.packb({"id": i, "task": "bench_app.add", "args": [i, i], "pad": pad})
        return data

    def check(reply: bytes, expected: int | None = None) -> int:
        msg = msgpack.unpackb(reply)
        i: int = msg["id"]
        if msg["result"] != 2 * i or (expected is not None and i != expected):
            raise SystemExit(f"wrong reply {msg!r} (expected id {expected})")
        return i

    sizes = (
        len(request(12345)),
        len(msgpack.packb({"id": 12345, "status": "success", "result": 24690, "pad": pad})),
    )
    for i in range(WARMUP_ROUNDS * 10):  # warm-up: connect, caches
        sock.send(request(i))
        check(sock.recv(), i)

    # (a) throughput, ``window`` requests in flight
    seen = bytearray(messages)
    sent = received = 0
    started = time.perf_counter()
    while received < messages:
        while sent < messages and sent - received < window:
            sock.send(request(sent))
            sent += 1
        try:
            reply = sock.recv()
        except zmq.Again:
            raise SystemExit(f"no reply within 20 s: {received}/{messages} received") from None
        while True:
            i = check(reply)
            if seen[i]:
                raise SystemExit(f"duplicate reply {i}")
            seen[i] = 1
            received += 1
            try:
                reply = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
    elapsed = time.perf_counter() - started
    if not all(seen):
        raise SystemExit("lost replies")

    # (b) sequential round trips
    rtts = []
    for i in range(sequential):
        t = time.perf_counter()
        sock.send(request(i))
        check(sock.recv(), i)
        rtts.append(time.perf_counter() - t)
    sock.close()
    ctx.term()
    print(
        json.dumps(
            {
                "messages": messages,
                "window": window,
                "seconds": elapsed,
                "round_trips_per_s": messages / elapsed,
                "sequential": latency_summary(rtts),
                "request_bytes": sizes[0],
                "reply_bytes": sizes[1],
            }
        ),
        flush=True,
    )


def last_json(child: Child) -> dict[str, Any]:
    child.out.join(5)
    for line in reversed(child.out.lines):
        if line.startswith("{"):
            return json.loads(line)  # type: ignore[no-any-return]
    raise StepError(f"no result from {child.describe_failure()}")


def run_baseline(children: Children, sizes: dict[str, int], timeout: float) -> dict[str, Any]:
    me = [sys.executable, str(Path(__file__).resolve())]
    env = python_env(None)
    broker = children.start("baseline-broker", [*me, "_baseline_broker"], env=env)
    worker = client = None
    try:
        line = broker.out.wait_for('"front"', 15)
        if line is None:
            raise StepError(f"baseline broker did not start: {broker.describe_failure()}")
        urls = json.loads(line)
        worker = children.start("baseline-worker", [*me, "_baseline_worker", urls["back"]], env=env)
        client = children.start(
            "baseline-client",
            [
                *me,
                "_baseline_client",
                urls["front"],
                str(sizes["baseline_messages"]),
                str(sizes["baseline_window"]),
                str(sizes["baseline_sequential"]),
            ],
            env=env,
        )
        try:
            rc = client.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise StepError(f"baseline client took over {timeout}s") from None
        if rc != 0:
            raise StepError(f"baseline client failed: {client.describe_failure()}")
        result = last_json(client)
        children.stop(worker)
        children.stop(broker)
        broker_stats, worker_stats = last_json(broker), last_json(worker)
        total = sizes["baseline_messages"] + sizes["baseline_sequential"] + WARMUP_ROUNDS * 10
        result["broker_cpu_us_per_msg"] = broker_stats["cpu_s"] / total * 1e6
        result["worker_cpu_us_per_msg"] = worker_stats["cpu_s"] / total * 1e6
        return result
    finally:
        for child in (client, worker, broker):
            if child is not None:
                children.stop(child)


# --------------------------------------------------------------------------- bare pool (W3)


def run_bare_pool(tasks: int, n: int) -> dict[str, Any]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import bench_app

    # spawn, like the node's pool; the pool is started and warmed before timing, as the
    # node's is when a task arrives.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(bench_app.cpu_sum, [n] * 4))  # both workers up and warm
        started = time.perf_counter()
        results = list(pool.map(bench_app.cpu_sum, [n] * tasks))
        elapsed = time.perf_counter() - started
    if results != [n * (n - 1) // 2] * tasks:
        raise StepError("bare pool returned wrong sums")
    return {"tasks": tasks, "seconds": elapsed, "tasks_per_s": tasks / elapsed}


# --------------------------------------------------------------------------- fsync probe


def probe_fsync(commits: int) -> dict[str, Any]:
    """Durable LMDB commits (``sync=True``) on the file system of the brokers' data dirs.

    Full durability costs one of these per broker loop tick, so it bounds W2 there.
    """
    import lmdb

    path = tempfile.mkdtemp(prefix="flowrra-bench-fsync-")
    try:
        env = lmdb.open(path, map_size=1 << 26, sync=True)
        durations = []
        for i in range(commits):
            started = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(i.to_bytes(8, "big"), b"x" * 200)
            durations.append(time.perf_counter() - started)
        env.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return {**latency_summary(durations), "dir": tempfile.gettempdir()}


# --------------------------------------------------------------------------- Flowrra workloads


async def _wait_all(app: Any, ids: list[str]) -> list[Any]:
    return await asyncio.gather(*(app.wait_for_result(task_id) for task_id in ids))


def _check_sums(results: list[Any], expected: list[int]) -> None:
    bad = [r for r, e in zip(results, expected, strict=True) if not r.success or r.result != e]
    if bad:
        raise StepError(f"{len(bad)} of {len(results)} results wrong, e.g. {bad[0]!r}")


async def w1_seq(app: Any, tasks: int) -> dict[str, Any]:
    """The guide's pattern: one ``await app.submit`` at a time, then all results."""
    import bench_app

    acks = []
    started = time.perf_counter()
    ids = []
    for i in range(tasks):
        t = time.perf_counter()
        ids.append(await app.submit(bench_app.add, i, i))
        acks.append(time.perf_counter() - t)
    submitted = time.perf_counter()
    results = await _wait_all(app, ids)
    elapsed = time.perf_counter() - started
    _check_sums(results, [2 * i for i in range(tasks)])
    ack = latency_summary(acks)
    return {
        "tasks": tasks,
        "seconds": elapsed,
        "submit_seconds": submitted - started,
        "tasks_per_s": tasks / elapsed,
        "submits_per_s": tasks / (submitted - started),
        "submit_p50_ms": ack["p50_ms"],
        "submit_p99_ms": ack["p99_ms"],
    }


async def w1_seq_strict(app: Any, tasks: int, url: str | None) -> dict[str, Any]:
    """W1-seq with ``confirm_submits=True``: each submit returns once the broker has stored
    it (the default returns once it is queued in the client; see docs/operations.md).

    Over sockets it runs on a client of its own, started strict: a client started with the
    default asks the broker for late ACKs in its HELLO (protocol.md §4.1), which would delay
    a strict submit's ACK. Embedded (no late ACKs) it switches the app's setting and back."""
    import bench_app

    if url is None:
        default = app.confirm_submits
        app.confirm_submits = True
        try:
            return await w1_seq(app, tasks)
        finally:
            app.confirm_submits = default
    async with bench_app.make_app(url, confirm_submits=True) as strict:
        for i in range(WARMUP_ROUNDS):
            await strict.wait_for_result(await strict.submit(bench_app.add, i, i))
        return await w1_seq(strict, tasks)


async def wf_chord(app: Any, members: int) -> dict[str, Any]:
    """A chord of ``members`` ``add`` calls into ``total``, against ``submit_many`` of the
    same members (timed in the same run)."""
    import bench_app

    from flowrra import call

    started = time.perf_counter()
    ids = await app.submit_many(bench_app.add, [(i, i) for i in range(members)])
    await _wait_all(app, ids)
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    callback = await app.chord([call(bench_app.add, i, i) for i in range(members)],
                               call(bench_app.total))  # fmt: skip
    result = await app.wait_for_result(callback)
    chord_s = time.perf_counter() - started
    if not result.success or result.result != sum(2 * i for i in range(members)):
        raise StepError(f"chord result wrong: {result!r}")
    return {
        "tasks": members,
        "seconds": chord_s,
        "tasks_per_s": members / chord_s,
        "submit_many_seconds": plain_s,
        "vs_submit_many": chord_s / plain_s,
    }


async def wf_chain(app: Any, links: int, w2_p50_ms: float | None) -> dict[str, Any]:
    """A chain of ``links`` ``add`` calls: time per link, against W2's round trip."""
    import bench_app

    from flowrra import call

    started = time.perf_counter()
    last = await app.chain(
        call(bench_app.add, 0, 1), *(call(bench_app.add, 1) for _ in range(links - 1))
    )
    result = await app.wait_for_result(last)
    elapsed = time.perf_counter() - started
    if not result.success or result.result != links:
        raise StepError(f"chain result wrong: {result!r}")
    per_link_ms = elapsed / links * 1000
    return {
        "tasks": links,
        "seconds": elapsed,
        "tasks_per_s": links / elapsed,
        "per_link_ms": per_link_ms,
        "vs_w2_p50": None if not w2_p50_ms else per_link_ms / w2_p50_ms,
    }


async def w1_gather(app: Any, tasks: int) -> dict[str, Any]:
    import bench_app

    started = time.perf_counter()
    ids = await asyncio.gather(*(app.submit(bench_app.add, i, i) for i in range(tasks)))
    submitted = time.perf_counter()
    results = await _wait_all(app, ids)
    elapsed = time.perf_counter() - started
    _check_sums(results, [2 * i for i in range(tasks)])
    return {
        "tasks": tasks,
        "seconds": elapsed,
        "submit_seconds": submitted - started,
        "tasks_per_s": tasks / elapsed,
    }


async def w1_many(app: Any, tasks: int) -> dict[str, Any]:
    import bench_app

    started = time.perf_counter()
    ids = await app.submit_many(bench_app.add, [(i, i) for i in range(tasks)])
    submitted = time.perf_counter()
    results = await _wait_all(app, ids)
    elapsed = time.perf_counter() - started
    _check_sums(results, [2 * i for i in range(tasks)])
    return {
        "tasks": tasks,
        "seconds": elapsed,
        "submit_seconds": submitted - started,
        "tasks_per_s": tasks / elapsed,
    }


async def w2_latency(app: Any, rounds: int) -> dict[str, Any]:
    import bench_app

    rtts = []
    # Where a round trip goes, from the record's timestamps (wall clock, one machine):
    # submit until acknowledged; submitted_at -> started_at (broker store + dispatch to the
    # node); started_at -> finished_at (the call); finished_at -> the client has the result.
    parts: dict[str, list[float]] = {"ack": [], "to_start": [], "run": [], "to_client": []}
    for i in range(rounds):
        t = time.perf_counter()
        task_id = await app.submit(bench_app.add, i, 1)
        acked = time.perf_counter()
        result = await app.wait_for_result(task_id)
        received = time.time()
        rtts.append(time.perf_counter() - t)
        if not result.success or result.result != i + 1:
            raise StepError(f"wrong result {result!r}")
        parts["ack"].append(acked - t)
        if result.submitted_at and result.started_at and result.finished_at:
            started, finished = result.started_at.timestamp(), result.finished_at.timestamp()
            parts["to_start"].append(started - result.submitted_at.timestamp())
            parts["run"].append(finished - started)
            parts["to_client"].append(received - finished)
    summary: dict[str, Any] = latency_summary(rtts)
    summary["breakdown_p50_ms"] = {
        name: percentile(values, 50) * 1000 for name, values in parts.items() if values
    }
    return summary


async def w3_cpu(app: Any, tasks: int, n: int) -> dict[str, Any]:
    import bench_app

    started = time.perf_counter()
    ids = await app.submit_many(bench_app.cpu_sum, [(n,)] * tasks)
    results = await _wait_all(app, ids)
    elapsed = time.perf_counter() - started
    _check_sums(results, [n * (n - 1) // 2] * tasks)
    runs = [
        (r.finished_at - r.started_at).total_seconds()
        for r in results
        if r.started_at and r.finished_at
    ]
    out: dict[str, Any] = {"tasks": tasks, "seconds": elapsed, "tasks_per_s": tasks / elapsed}
    if runs:
        # How busy the node's 2 worker processes were: time inside calls / (2 x elapsed).
        out["run_ms_p50"] = percentile(runs, 50) * 1000
        out["worker_utilization"] = sum(runs) / (2 * elapsed)
        # Worker-process time not spent in calls, per task: mostly the result -> broker ->
        # dispatch -> node round trip a slot waits for its next task (no prefetch).
        out["idle_ms_per_task"] = (2 * elapsed - sum(runs)) / tasks * 1000
    return out


async def warm_up(app: Any, with_cpu: bool) -> None:
    import bench_app

    ids = await app.submit_many(bench_app.add, [(i, i) for i in range(WARMUP_TASKS)])
    await _wait_all(app, ids)
    for i in range(WARMUP_ROUNDS):
        await app.wait_for_result(await app.submit(bench_app.add, i, i))
    if with_cpu:  # the worker processes import bench_app on their first call
        ids = await app.submit_many(bench_app.cpu_sum, [(10,)] * 4)
        await _wait_all(app, ids)


class Profiler:
    """``py-spy record`` of the broker and node processes during one workload."""

    def __init__(self, children: Children, out_dir: Path | None) -> None:
        self.children = children
        self.out_dir = out_dir
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.running: list[tuple[str, Child, Path]] = []

    def start(self, label: str, targets: dict[str, int]) -> None:
        """Record each process of ``targets`` (name -> pid) until :meth:`stop`."""
        if self.out_dir is None:
            return
        if not Path(self.exe).exists():
            progress("py-spy not found; not profiling")
            self.out_dir = None
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in targets.items():
            path = self.out_dir / f"{label}-{name}.txt"
            spy = self.children.start(
                f"py-spy {name}",
                [
                    self.exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    "250",
                    "--nonblocking",
                    "--subprocesses",
                    "--format",
                    "raw",
                    "--output",
                    str(path),
                ],
            )
            self.running.append((name, spy, path))
        time.sleep(0.5)  # let py-spy attach

    def stop(self) -> dict[str, str]:
        files = {}
        for name, spy, path in self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.popen.wait(20)
            self.children.stop(spy)
            files[name] = str(path)
        self.running = []
        return files


def summarize_profile(path: str, top: int = 15) -> list[tuple[str, float, float]]:
    """(function, self %, total %) from a py-spy raw (collapsed stacks) file."""
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    samples = 0
    with open(path) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(count_text)
            frames = [
                fr.split(" (", 1)[0]
                + " ("
                + fr.split(" (", 1)[1].split(":")[0].rsplit("/", 1)[-1]
                + ")"
                if " (" in fr
                else fr
                for fr in stack.split(";")
            ]
            frames = [fr for fr in frames if not fr.startswith("process ")]
            if not frames:
                continue
            samples += count
            self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
            for fr in set(frames):
                total_counts[fr] = total_counts.get(fr, 0) + count
    if not samples:
        return []
    ranked = sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]
    return [(fn, 100 * c / samples, 100 * total_counts[fn] / samples) for fn, c in ranked]


class Remote:
    """A ``flowrra-broker`` and a ``flowrra-node`` process on loopback, started by the
    project's launcher (``flowrra.processes``, imported here: the upstream role lacks it)."""

    def __init__(self, durability: str) -> None:
        from flowrra.processes import BrokerProcess, Launcher, NodeProcess

        self.durability = durability
        self.workdir = tempfile.mkdtemp(prefix=f"flowrra-bench-{durability}-")
        self.launcher = Launcher(
            self.workdir,
            python_path=[SCRIPTS],
            node_cwd=SCRIPTS,
            durability=durability,
            keep_lines=200,
            die_with_parent=True,
        )
        self.broker: BrokerProcess | None = None
        self.node: NodeProcess | None = None
        self.url = ""
        self.commands: list[list[str]] = []

    def start(self) -> None:
        from flowrra.processes import LaunchError

        try:
            self.broker = self.launcher.broker(timeout=20)
        except LaunchError as exc:
            raise StepError(f"broker did not start: {exc}") from None
        self.url = self.broker.url
        try:
            self.node = self.launcher.node(
                self.broker,
                "bench_app:app",
                concurrency=NODE_CONCURRENCY,
                processes=2,
                timeout=30,
            )
        except LaunchError as exc:
            raise StepError(f"node did not register: {exc}") from None
        self.commands = [self.broker.process.argv, self.node.process.argv]

    def pids(self) -> dict[str, int]:
        """The broker's and the node's process ids (each leads its own process group)."""
        return {
            name: started.pid
            for name, started in (("broker", self.broker), ("node", self.node))
            if started is not None
        }

    def check_alive(self) -> None:
        for started in (self.broker, self.node):
            if started is not None and not started.process.running:
                raise StepError(f"{started.process.name} died: {started.process.describe()}")

    def stop(self) -> None:
        self.launcher.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


async def run_w4(
    children: Children, url: str, clients: int, tasks: int, timeout: float
) -> dict[str, Any]:
    me = [sys.executable, str(Path(__file__).resolve())]
    procs = [
        children.start(
            f"w4-client-{i}",
            [*me, "_w4_client", url, str(tasks)],
            env=python_env(SCRIPTS),
            stdin=True,
        )
        for i in range(clients)
    ]
    try:
        loop = asyncio.get_running_loop()
        for proc in procs:
            ready = await loop.run_in_executor(None, proc.out.wait_for, "ready", 30)
            if ready is None:
                raise StepError(f"W4 client did not connect: {proc.describe_failure()}")
        for proc in procs:  # start them together
            assert proc.popen.stdin is not None
            proc.popen.stdin.write(b"go\n")
            proc.popen.stdin.flush()
        deadline = time.monotonic() + timeout
        for proc in procs:
            while proc.alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.alive():
                raise StepError(f"W4 client took over {timeout}s")
            if proc.popen.returncode != 0:
                raise StepError(f"W4 client failed: {proc.describe_failure()}")
        reports = [last_json(proc) for proc in procs]
    finally:
        for proc in procs:
            children.stop(proc)
    start = min(r["start"] for r in reports)
    end = max(r["end"] for r in reports)
    total = sum(r["tasks"] for r in reports)
    return {
        "clients": clients,
        "tasks": total,
        "seconds": end - start,
        "tasks_per_s": total / (end - start),
        "per_client_tasks_per_s": [r["tasks"] / (r["end"] - r["start"]) for r in reports],
    }


def role_w4_client(url: str, tasks: int) -> None:
    import bench_app

    async def main() -> dict[str, Any]:
        app = bench_app.make_app(url)
        async with app:
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            start = time.time()
            ids = await app.submit_many(bench_app.add, [(i, i) for i in range(tasks)])
            results = await _wait_all(app, ids)
            end = time.time()
        _check_sums(results, [2 * i for i in range(tasks)])
        return {"tasks": tasks, "start": start, "end": end}

    print(json.dumps(asyncio.run(main())), flush=True)


async def run_mode(
    mode: str,
    workloads: set[str],
    sizes: dict[str, int],
    children: Children,
    timeout: float,
    profiler: Profiler,
) -> dict[str, Any]:
    """All selected workloads for one mode; a failing workload is recorded, the rest go on."""
    import bench_app

    out: dict[str, Any] = {"errors": {}}
    remote = None
    try:
        if mode == "embedded":
            app = bench_app.make_app(processes=2)
            out["setup"] = "Flowrra.from_urls(processes=2) in the bench process (in-memory store)"
        else:
            remote = Remote(mode)
            progress(f"{mode}: starting flowrra-broker --durability {mode} and flowrra-node")
            remote.start()
            out["commands"] = [" ".join(c) for c in remote.commands]
            app = bench_app.make_app(remote.url)
        async with app:
            await asyncio.wait_for(warm_up(app, "w3" in workloads), timeout)
            steps: list[tuple[str, Any]] = []
            if "w1seq" in workloads:
                steps.append(("w1_seq", lambda: w1_seq(app, sizes["w1_seq_tasks"])))
                url = None if remote is None else remote.url
                steps.append(
                    ("w1_seq_strict", lambda: w1_seq_strict(app, sizes["w1_seq_tasks"], url))
                )
            if "w1" in workloads:
                steps.append(("w1_gather", lambda: w1_gather(app, sizes["w1_tasks"])))
                steps.append(("w1_many", lambda: w1_many(app, sizes["w1_tasks"])))
            if "w2" in workloads:
                steps.append(("w2", lambda: w2_latency(app, sizes["w2_rounds"])))
            if "w3" in workloads:
                steps.append(("w3", lambda: w3_cpu(app, sizes["w3_tasks"], sizes["w3_n"])))
            if "wf" in workloads:
                steps.append(("wf_chord", lambda: wf_chord(app, sizes["chord_members"])))
                steps.append(
                    (
                        "wf_chain",
                        lambda: wf_chain(
                            app, sizes["chain_links"], (out.get("w2") or {}).get("p50_ms")
                        ),
                    )
                )
            for name, make in steps:
                progress(f"{mode}: {name} ...")
                cpu_before = _cpu_sample(remote)
                if name in PROFILED_STEPS and remote is not None:
                    profiler.start(f"{mode}-{name}", remote.pids())
                try:
                    result = await asyncio.wait_for(make(), timeout)
                except (StepError, TimeoutError, Exception) as exc:
                    if remote is not None:
                        with contextlib.suppress(StepError):
                            remote.check_alive()
                    out["errors"][name] = f"{type(exc).__name__}: {exc}"
                    progress(f"{mode}: {name} FAILED: {exc}")
                    continue
                finally:
                    if profiler.running:
                        out.setdefault("profiles", {})[name] = profiler.stop()
                cpu = _cpu_delta(
                    cpu_before, _cpu_sample(remote), result.get("tasks") or result.get("count")
                )
                if cpu:
                    result["cpu_us_per_task"] = cpu
                out[name] = result
                progress(f"{mode}: {name} {_short(name, result)}")
        if "w4" in workloads:
            if remote is None:
                out["w4"] = None
                out["w4_note"] = "n/a: the embedded broker lives inside one client's process"
            else:
                progress(f"{mode}: w4 ({sizes['w4_clients']} client processes) ...")
                try:
                    out["w4"] = await run_w4(
                        children, remote.url, sizes["w4_clients"], sizes["w4_tasks"], timeout
                    )
                    progress(f"{mode}: w4 {out['w4']['tasks_per_s']:,.0f} tasks/s total")
                except (StepError, Exception) as exc:
                    out["errors"]["w4"] = f"{type(exc).__name__}: {exc}"
                    progress(f"{mode}: w4 FAILED: {exc}")
    except (StepError, Exception) as exc:
        out["errors"]["setup"] = f"{type(exc).__name__}: {exc}"
        progress(f"{mode}: FAILED: {exc}")
    finally:
        if remote is not None:
            remote.stop()
    if not out["errors"]:
        del out["errors"]
    return out


def _cpu_sample(remote: Remote | None) -> dict[str, float]:
    sample = {"client": time.process_time()}
    if remote is not None:
        for name, pid in remote.pids().items():
            sample[name] = group_cpu_seconds(pid)
    return sample


def _cpu_delta(
    before: dict[str, float], after: dict[str, float], tasks: int | None
) -> dict[str, float] | None:
    if not tasks:
        return None
    return {k: (after[k] - before[k]) / tasks * 1e6 for k in before if k in after}


def _short(name: str, result: dict[str, Any]) -> str:
    if "submit_p50_ms" in result:
        return (
            f"{result['tasks_per_s']:,.0f} tasks/s ({result['seconds']:.2f}s); one submit "
            f"p50 {result['submit_p50_ms']:.3f} ms, p99 {result['submit_p99_ms']:.3f} ms"
        )
    if "tasks_per_s" in result:
        return f"{result['tasks_per_s']:,.0f} tasks/s ({result['seconds']:.2f}s)"
    return f"p50 {result['p50_ms']:.3f} ms, p99 {result['p99_ms']:.3f} ms"


# --------------------------------------------------------------------------- upstream 0.1.8


def role_upstream(w1_tasks: int, w2_rounds: int, w1_seq_tasks: int) -> None:
    """Runs under the upstream interpreter: its ``Flowrra.from_urls()`` in-process executor."""
    import logging

    import flowrra

    logging.getLogger("flowrra").setLevel(logging.WARNING)

    async def main() -> dict[str, Any]:
        app = flowrra.Flowrra.from_urls()  # no broker/backend: IOExecutor + InMemoryBackend

        @app.task()
        async def add(x: int, y: int) -> int:
            return x + y

        def check(results: list[Any], expected: list[int]) -> None:
            for r, e in zip(results, expected, strict=True):
                if r.status.value != "success" or r.result != e:
                    raise SystemExit(f"wrong result {r!r}")

        async with app:
            warm = await asyncio.gather(*(app.submit(add, i, i) for i in range(WARMUP_TASKS)))
            await asyncio.gather(*(app.wait_for_result(t) for t in warm))
            # W1-seq: one await app.submit at a time, then every result.
            acks = []
            started_seq = time.perf_counter()
            seq_ids = []
            for i in range(w1_seq_tasks):
                t = time.perf_counter()
                seq_ids.append(await app.submit(add, i, i))
                acks.append(time.perf_counter() - t)
            seq_submitted = time.perf_counter()
            seq_results = await asyncio.gather(*(app.wait_for_result(t) for t in seq_ids))
            seq_elapsed = time.perf_counter() - started_seq
            check(seq_results, [2 * i for i in range(w1_seq_tasks)])
            started = time.perf_counter()
            ids = await asyncio.gather(*(app.submit(add, i, i) for i in range(w1_tasks)))
            submitted = time.perf_counter()
            results = await asyncio.gather(*(app.wait_for_result(t) for t in ids))
            elapsed = time.perf_counter() - started
            check(results, [2 * i for i in range(w1_tasks)])
            rtts = []
            for i in range(w2_rounds):
                t = time.perf_counter()
                result = await app.wait_for_result(await app.submit(add, i, 1))
                rtts.append(time.perf_counter() - t)
                check([result], [i + 1])
        return {
            "version": flowrra.__version__,
            "python": platform.python_version(),
            "executor": "Flowrra.from_urls() -> IOExecutor (io_workers=4, queue 1000), "
            "InMemoryBackend",
            "w1_seq": {
                "tasks": w1_seq_tasks,
                "seconds": seq_elapsed,
                "submit_seconds": seq_submitted - started_seq,
                "tasks_per_s": w1_seq_tasks / seq_elapsed,
                "submits_per_s": w1_seq_tasks / (seq_submitted - started_seq),
                "submit_p50_ms": latency_summary(acks)["p50_ms"],
                "submit_p99_ms": latency_summary(acks)["p99_ms"],
            },
            "w1_gather": {
                "tasks": w1_tasks,
                "seconds": elapsed,
                "submit_seconds": submitted - started,
                "tasks_per_s": w1_tasks / elapsed,
            },
            "w2": latency_summary(rtts),
        }

    print(json.dumps(asyncio.run(main())), flush=True)


def run_upstream(
    children: Children, python: str, sizes: dict[str, int], timeout: float
) -> dict[str, Any]:
    # -I: isolated, so neither this repo nor PYTHONPATH can shadow the upstream package.
    argv = [
        python,
        "-I",
        str(Path(__file__).resolve()),
        "_upstream",
        str(sizes["w1_tasks"]),
        str(sizes["w2_rounds"]),
        str(sizes["w1_seq_tasks"]),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    child = children.start("upstream", argv, env=env, cwd=tempfile.gettempdir())
    try:
        try:
            rc = child.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise StepError(f"upstream run took over {timeout}s") from None
        if rc != 0:
            raise StepError(f"upstream run failed: {child.describe_failure()}")
        result = last_json(child)
    finally:
        children.stop(child)
    if result.get("version") != "0.1.8":
        progress(f"warning: {python} has flowrra {result.get('version')}, not 0.1.8")
    return result


# --------------------------------------------------------------------------- report


def machine_info() -> dict[str, Any]:
    import lmdb
    import msgpack
    import zmq

    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "lmdb": lmdb.__version__,
        "git": commit,
        "loadavg_at_start": _loadavg(),
    }


def _loadavg() -> str:
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])
    return "unknown"


def _fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _ratio(value: float | None, ref: float | None) -> str:
    if value is None or not ref:
        return ""
    return f" ({value / ref:.2f}x)"


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def build_table(report: dict[str, Any]) -> str:
    base = report.get("baseline") or {}
    pool = report.get("pool") or {}
    b_tp = base.get("round_trips_per_s")
    b_p50 = _get(base, "sequential", "p50_ms")
    b_p99 = _get(base, "sequential", "p99_ms")
    p_tp = pool.get("tasks_per_s")
    header = [
        "mode",
        "W1-seq tasks/s (x base, higher=better)",
        "W1 gather tasks/s (x base, higher=better)",
        "W1 submit_many tasks/s (x base, higher=better)",
        "W2 p50 ms (x base, lower=better)",
        "W2 p99 ms (x base, lower=better)",
        "W3 tasks/s (x bare pool, higher=better)",
        "W4 total tasks/s (x base, higher=better)",
    ]
    rows = [header]
    rows.append(
        [
            "reference: raw pyzmq / bare pool",
            f"{_fmt_rate(b_tp)} rt/s" if b_tp else "—",
            f"{_fmt_rate(b_tp)} rt/s" if b_tp else "—",
            f"{_fmt_rate(b_tp)} rt/s" if b_tp else "—",
            f"{b_p50:.3f}" if b_p50 else "—",
            f"{b_p99:.3f}" if b_p99 else "—",
            f"{_fmt_rate(p_tp)} (pool)" if p_tp else "—",
            f"{_fmt_rate(b_tp)} rt/s" if b_tp else "—",
        ]
    )
    labels = {
        "embedded": "embedded (in-process)",
        "full": "processes, durability full",
        "fast": "processes, durability fast",
    }
    for mode, label in labels.items():
        m = report["modes"].get(mode)
        if m is None:
            continue
        errors = m.get("errors", {})

        def cell(
            key: str,
            field: str,
            ref: float | None,
            ms: bool = False,
            m: dict[str, Any] = m,
            errors: dict[str, str] = errors,
        ) -> str:
            if key in errors or ("setup" in errors and key not in m):
                return "FAILED"
            value = _get(m, key, field)
            if value is None:
                return "—"
            text = f"{value:.3f}" if ms else _fmt_rate(value)
            return text + _ratio(value, ref)

        w4 = cell("w4", "tasks_per_s", b_tp)
        if mode == "embedded" and "w4" in report["workloads"]:
            w4 = "n/a (in-process)"
        rows.append(
            [
                label,
                cell("w1_seq", "tasks_per_s", b_tp),
                cell("w1_gather", "tasks_per_s", b_tp),
                cell("w1_many", "tasks_per_s", b_tp),
                cell("w2", "p50_ms", b_p50, ms=True),
                cell("w2", "p99_ms", b_p99, ms=True),
                cell("w3", "tasks_per_s", p_tp),
                w4,
            ]
        )
    up = report.get("upstream")
    if up:
        if "error" in up:
            rows.append(["upstream flowrra 0.1.8 (in-process)", "FAILED", "", "", "", "", "", ""])
        else:
            rows.append(
                [
                    f"upstream flowrra {up.get('version')} (in-process)",
                    _fmt_rate(_get(up, "w1_seq", "tasks_per_s"))
                    + _ratio(_get(up, "w1_seq", "tasks_per_s"), b_tp),
                    _fmt_rate(_get(up, "w1_gather", "tasks_per_s"))
                    + _ratio(_get(up, "w1_gather", "tasks_per_s"), b_tp),
                    "n/a (no submit_many)",
                    f"{_get(up, 'w2', 'p50_ms'):.3f}" + _ratio(_get(up, "w2", "p50_ms"), b_p50),
                    f"{_get(up, 'w2', 'p99_ms'):.3f}" + _ratio(_get(up, "w2", "p99_ms"), b_p99),
                    "not run",
                    "n/a",
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The project's performance targets, each a ratio within this run, met or missed.

    Issue 9's targets ("Speed where users touch it") come first, then the earlier ones.
    """
    base = report.get("baseline") or {}
    modes = report["modes"]
    up = report.get("upstream") or {}
    if "error" in up:
        up = {}
    targets: list[dict[str, Any]] = []

    def check(
        group: str,
        name: str,
        value: float | None,
        ref: float | None,
        factor: float,
        unit: str,
        higher_is_better: bool,
    ) -> None:
        if value is None or not ref:
            return
        ratio = value / ref
        met = ratio >= factor if higher_is_better else ratio <= factor
        if met:
            note = "met"
        elif higher_is_better:
            note = f"missed: needs {factor / ratio:.2f}x the throughput"
        else:
            note = f"missed: needs {ratio / factor:.2f}x less time"
        targets.append(
            {
                "group": group,
                "target": name,
                "value": value,
                "reference": ref,
                "ratio": ratio,
                "goal_ratio": factor,
                "goal": factor * ref,
                "unit": unit,
                "met": met,
                "note": note,
            }
        )

    b_tp = base.get("round_trips_per_s")
    b_p50 = _get(base, "sequential", "p50_ms")
    p_tp = _get(report, "pool", "tasks_per_s")
    issue = "issue 9"
    check(
        issue,
        "embedded W1-seq >= 1.0x upstream 0.1.8 W1-seq",
        _get(modes, "embedded", "w1_seq", "tasks_per_s"),
        _get(up, "w1_seq", "tasks_per_s"),
        1.0,
        "tasks/s",
        True,
    )
    check(
        issue,
        "embedded W2 p50 <= 1.0x upstream 0.1.8 W2 p50",
        _get(modes, "embedded", "w2", "p50_ms"),
        _get(up, "w2", "p50_ms"),
        1.0,
        "ms",
        False,
    )
    for mode, seq_factor, p50_factor in (("fast", 0.30, 2.0), ("full", 0.15, 4.0)):
        check(
            issue,
            f"{mode} W1-seq >= {seq_factor:.2f}x raw pyzmq round trips/s",
            _get(modes, mode, "w1_seq", "tasks_per_s"),
            b_tp,
            seq_factor,
            "tasks/s",
            True,
        )
        check(
            issue,
            f"{mode} W2 p50 <= {p50_factor:.0f}x raw pyzmq sequential p50",
            _get(modes, mode, "w2", "p50_ms"),
            b_p50,
            p50_factor,
            "ms",
            False,
        )
    for mode in ("fast", "full"):
        for variant, label in (("w1_gather", "gather"), ("w1_many", "submit_many")):
            check(
                issue,
                f"{mode} W1 {label} >= 0.8x raw pyzmq round trips/s",
                _get(modes, mode, variant, "tasks_per_s"),
                b_tp,
                0.8,
                "tasks/s",
                True,
            )
    for mode in ALL_MODES:
        check(
            issue,
            f"{mode} W3 >= 0.9x bare 2-process pool",
            _get(modes, mode, "w3", "tasks_per_s"),
            p_tp,
            0.9,
            "tasks/s",
            True,
        )
    earlier = "earlier"
    check(
        earlier,
        "embedded W1 gather >= 1.0x upstream 0.1.8 W1 gather",
        _get(modes, "embedded", "w1_gather", "tasks_per_s"),
        _get(up, "w1_gather", "tasks_per_s"),
        1.0,
        "tasks/s",
        True,
    )
    check(
        earlier,
        "embedded W1 submit_many >= 1.0x upstream 0.1.8 W1 gather",
        _get(modes, "embedded", "w1_many", "tasks_per_s"),
        _get(up, "w1_gather", "tasks_per_s"),
        1.0,
        "tasks/s",
        True,
    )
    check(
        earlier,
        "embedded W2 p99 <= 1.0x upstream 0.1.8 W2 p99",
        _get(modes, "embedded", "w2", "p99_ms"),
        _get(up, "w2", "p99_ms"),
        1.0,
        "ms",
        False,
    )
    for mode in ("full", "fast"):
        check(
            earlier,
            f"{mode} W4 total >= 1.0x W1 submit_many {mode}",
            _get(modes, mode, "w4", "tasks_per_s"),
            _get(modes, mode, "w1_many", "tasks_per_s"),
            1.0,
            "tasks/s",
            True,
        )
    return targets


def single_call_summary(report: dict[str, Any]) -> list[str]:
    """W1-seq and W2 p50 per mode, as ratios to raw pyzmq and to upstream, from this run."""
    base = report.get("baseline") or {}
    up = report.get("upstream") or {}
    if "error" in up:
        up = {}
    b_tp = base.get("round_trips_per_s")
    b_p50 = _get(base, "sequential", "p50_ms")
    u_seq = _get(up, "w1_seq", "tasks_per_s")
    u_p50 = _get(up, "w2", "p50_ms")
    lines = []

    def ratios(value: float | None, refs: list[tuple[str, float | None]]) -> str:
        if value is None:
            return ""
        parts = [f"{value / ref:.2f}x {name}" for name, ref in refs if ref]
        return f" ({', '.join(parts)})" if parts else ""

    if b_tp or b_p50:
        lines.append(
            f"  {'raw pyzmq':9} W1-seq ref {_fmt_rate(b_tp)} round trips/s (1,000 in flight); "
            f"W2 ref p50 {b_p50 or float('nan'):.3f} ms"
        )
    if u_seq or u_p50:
        lines.append(
            f"  {'upstream':9} W1-seq {_fmt_rate(u_seq)} tasks/s"
            + ratios(u_seq, [("raw", b_tp)])
            + f"; W2 p50 {u_p50 or float('nan'):.3f} ms"
            + ratios(u_p50, [("raw", b_p50)])
            + f"; one submit p50 {_get(up, 'w1_seq', 'submit_p50_ms') or float('nan'):.3f} ms"
        )
    for mode, m in report["modes"].items():
        seq = _get(m, "w1_seq", "tasks_per_s")
        p50 = _get(m, "w2", "p50_ms")
        if seq is None and p50 is None:
            continue
        text = f"  {mode:9} W1-seq {_fmt_rate(seq)} tasks/s" + ratios(
            seq, [("raw", b_tp), ("upstream", u_seq)]
        )
        if p50 is not None:
            text += f"; W2 p50 {p50:.3f} ms" + ratios(p50, [("raw", b_p50), ("upstream", u_p50)])
        sub = _get(m, "w1_seq", "submit_p50_ms")
        if sub is not None:
            text += f"; one submit p50 {sub:.3f} ms"
        lines.append(text)
    return lines


def render(report: dict[str, Any]) -> str:
    out = [build_table(report), ""]
    base = report.get("baseline") or {}
    if base:
        out.append(
            f"baseline: {base['messages']:,} messages with {base['window']} in flight; "
            f"{base['sequential']['count']:,} sequential round trips; "
            f"{base['request_bytes']}/{base['reply_bytes']}-byte request/reply; "
            f"broker {base['broker_cpu_us_per_msg']:.1f} µs CPU per round trip"
        )
    if report.get("fsync"):
        f = report["fsync"]
        out.append(
            f"fsync probe: a durable LMDB commit takes p50 {f['p50_ms']:.3f} ms, "
            f"p99 {f['p99_ms']:.3f} ms on {f['dir']}"
        )
    out.append(
        f"load average: {report['machine'].get('loadavg_at_start')} at start, "
        f"{report.get('loadavg_at_end')} at end ({report['machine'].get('nproc')} CPUs)"
    )
    cpu_rows = []
    for mode, m in report["modes"].items():
        for key in ("w1_seq", "w1_gather", "w1_many", "w2", "w3"):
            cpu = _get(m, key, "cpu_us_per_task")
            if cpu:
                parts = ", ".join(f"{k} {v:,.1f}" for k, v in cpu.items())
                cpu_rows.append(f"  {mode:8} {key:9} {parts}")
    if cpu_rows:
        out.append("CPU µs per task (client = the bench process, embedded: everything):")
        out.extend(cpu_rows)
    for mode, m in report["modes"].items():
        parts = _get(m, "w2", "breakdown_p50_ms")
        if parts:
            out.append(
                f"W2 {mode} p50 breakdown (ms): "
                + ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
                + " (ack: submit until acknowledged; to_start: submitted -> running on the "
                "node; run: the call; to_client: finished -> result in the client)"
            )
    for mode, m in report["modes"].items():
        w3 = m.get("w3") or {}
        if "worker_utilization" in w3:
            out.append(
                f"W3 {mode}: one call takes p50 {w3['run_ms_p50']:.2f} ms on the node; the 2 "
                f"worker processes were busy {100 * w3['worker_utilization']:.0f}% of the time, "
                f"idle {w3.get('idle_ms_per_task', float('nan')):.2f} ms per task"
            )
    for mode, m in report["modes"].items():
        for step, error in (m.get("errors") or {}).items():
            out.append(f"ERROR {mode} {step}: {error}")
    if report.get("upstream", {}).get("error"):
        out.append(f"ERROR upstream: {report['upstream']['error']}")
    single = single_call_summary(report)
    if single:
        out.append("")
        out.append("Single calls (W1-seq: one await app.submit at a time; W2: submit + wait):")
        out.extend(single)
    extra = []
    for mode, m in report["modes"].items():
        seq, strict = m.get("w1_seq"), m.get("w1_seq_strict")
        if seq and strict:
            extra.append(
                f"  {mode:9} W1-seq with confirm_submits=True {strict['tasks_per_s']:,.0f} "
                f"tasks/s ({strict['tasks_per_s'] / seq['tasks_per_s']:.2f}x the default)"
            )
        chord, chain = m.get("wf_chord"), m.get("wf_chain")
        if chord:
            extra.append(
                f"  {mode:9} chord of {chord['tasks']:,}: {chord['seconds']:.3f} s, "
                f"{chord['vs_submit_many']:.2f}x submit_many of the same tasks"
            )
        if chain:
            vs = chain["vs_w2_p50"]
            extra.append(
                f"  {mode:9} chain of {chain['tasks']}: {chain['per_link_ms']:.3f} ms per link"
                + ("" if vs is None else f", {vs:.2f}x W2 p50")
            )
    if extra:
        out.append("")
        out.append("Deferred confirmation and workflows (issue 9, issue 11):")
        out.extend(extra)
    if report.get("targets"):
        out.append("")
        out.append("Targets (ratios within this run):")
        for t in report["targets"]:
            mark = "MET   " if t["met"] else "MISSED"
            out.append(
                f"  {mark} [{t['group']}] {t['target']}: {t['ratio']:.2f}x "
                f"({t['value']:,.3f} vs {t['reference']:,.3f} {t['unit']}) — {t['note']}"
            )
    for mode, m in report["modes"].items():
        for step, files in (m.get("profiles") or {}).items():
            for name, path in files.items():
                if not os.path.exists(path):
                    continue
                out.append("")
                out.append(f"py-spy {mode} {name} during {step} ({path}): self% total%")
                for fn, self_pct, total_pct in summarize_profile(path):
                    out.append(f"  {self_pct:5.1f} {total_pct:5.1f}  {fn}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Flowrra benchmarks against a raw pyzmq baseline measured in the same run.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as JSON on stdout (the table goes to stderr)",
    )
    parser.add_argument(
        "--modes",
        default=",".join(ALL_MODES),
        help=f"comma-separated, from {','.join(ALL_MODES)} [all]",
    )
    parser.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help=f"comma-separated, from {','.join(ALL_WORKLOADS)} [all]",
    )
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the raw pyzmq baseline and the bare pool (no ratios)",
    )
    parser.add_argument(
        "--upstream", metavar="PYTHON", help="interpreter with upstream flowrra==0.1.8 installed"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        type=Path,
        help="py-spy record the broker and node during W1-seq, W1 submit_many and W2 into DIR "
        "(perturbs that mode's figures)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds allowed per measurement [300; 60 with --quick]",
    )
    for key in FULL_SIZES:
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=int,
            default=None,
            help=f"[{FULL_SIZES[key]:,}; {QUICK_SIZES[key]:,} with --quick]",
        )
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for m in args.modes:
        if m not in ALL_MODES:
            parser.error(f"unknown mode {m!r}")
    for w in args.workloads:
        if w not in ALL_WORKLOADS:
            parser.error(f"unknown workload {w!r}")
    sizes = dict(QUICK_SIZES if args.quick else FULL_SIZES)
    for key in sizes:
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                parser.error(f"--{key.replace('_', '-')} must be >= 1")
            sizes[key] = value
    args.sizes = sizes
    if args.timeout is None:
        args.timeout = 60.0 if args.quick else 300.0
    return args


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(SCRIPTS))  # bench_app (already there when run as a script)
    # KeyboardInterrupt right where the bench is, on Ctrl-C and SIGTERM alike. (With Python's
    # default SIGINT handler asyncio.run only cancels its main task, and a cancellation that
    # lands in asyncio.wait_for as its awaitable completes can be swallowed on 3.11.)
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    children = Children()
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "quick": args.quick,
        "sizes": args.sizes,
        "modes_run": args.modes,
        "workloads": args.workloads,
        "modes": {},
    }
    try:
        report["machine"] = machine_info()
        progress("machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()))
        if any(m != "embedded" for m in args.modes):
            report["fsync"] = probe_fsync(10 if args.quick else 100)
            progress(
                f"fsync probe: durable LMDB commit p50 {report['fsync']['p50_ms']:.3f} ms, "
                f"p99 {report['fsync']['p99_ms']:.3f} ms in {report['fsync']['dir']}"
            )
        if not args.no_baseline:
            progress(
                f"baseline: raw pyzmq, {args.sizes['baseline_messages']:,} messages "
                f"({args.sizes['baseline_window']} in flight), "
                f"{args.sizes['baseline_sequential']:,} sequential ..."
            )
            try:
                base = run_baseline(children, args.sizes, args.timeout)
                report["baseline"] = base
                progress(
                    f"baseline: {base['round_trips_per_s']:,.0f} round trips/s; sequential "
                    f"p50 {base['sequential']['p50_ms']:.3f} ms, "
                    f"p99 {base['sequential']['p99_ms']:.3f} ms"
                )
            except StepError as exc:
                report["baseline_error"] = str(exc)
                progress(f"baseline FAILED: {exc}")
            if "w3" in args.workloads:
                progress(
                    f"pool: ProcessPoolExecutor(2).map over {args.sizes['w3_tasks']} "
                    f"sum(range({args.sizes['w3_n']:,})) ..."
                )
                report["pool"] = run_bare_pool(args.sizes["w3_tasks"], args.sizes["w3_n"])
                progress(f"pool: {report['pool']['tasks_per_s']:,.1f} tasks/s")
        if args.upstream:
            progress(f"upstream: flowrra 0.1.8 via {args.upstream} ...")
            try:
                up = run_upstream(children, args.upstream, args.sizes, args.timeout)
                report["upstream"] = up
                progress(
                    f"upstream: W1-seq {up['w1_seq']['tasks_per_s']:,.0f} tasks/s; "
                    f"W1 {up['w1_gather']['tasks_per_s']:,.0f} tasks/s; W2 p50 "
                    f"{up['w2']['p50_ms']:.3f} ms, p99 {up['w2']['p99_ms']:.3f} ms"
                )
            except (StepError, OSError) as exc:
                report["upstream"] = {"error": str(exc)}
                progress(f"upstream FAILED: {exc}")
        profiler = Profiler(children, args.profile)
        for mode in args.modes:
            report["modes"][mode] = asyncio.run(
                run_mode(mode, set(args.workloads), args.sizes, children, args.timeout, profiler)
            )
    except KeyboardInterrupt:
        progress("interrupted: stopping every process the bench started")
        return 130
    finally:
        children.stop_all()
        _stop_own_multiprocessing_children()
    report["loadavg_at_end"] = _loadavg()
    report["targets"] = evaluate_targets(report)
    text = render(report)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(text)
    failed = (
        bool(report.get("baseline_error"))
        or any(m.get("errors") for m in report["modes"].values())
        or bool((report.get("upstream") or {}).get("error"))
    )
    return 1 if failed else 0


def _stop_own_multiprocessing_children() -> None:
    """The embedded node's worker processes, should an interrupted run leave any behind."""
    if "multiprocessing" not in sys.modules:
        return
    import multiprocessing

    for proc in multiprocessing.active_children():
        proc.terminate()
        proc.join(2)
        if proc.is_alive():
            proc.kill()


def dispatch_role(argv: list[str]) -> None:
    role, rest = argv[0], argv[1:]
    if role == "_baseline_broker":
        role_baseline_broker()
    elif role == "_baseline_worker":
        role_baseline_worker(rest[0])
    elif role == "_baseline_client":
        role_baseline_client(rest[0], int(rest[1]), int(rest[2]), int(rest[3]))
    elif role == "_w4_client":
        role_w4_client(rest[0], int(rest[1]))
    elif role == "_upstream":
        role_upstream(int(rest[0]), int(rest[1]), int(rest[2]))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith("_"):
        dispatch_role(sys.argv[1:])
    else:
        sys.exit(main(sys.argv[1:]))
