"""Broker memory with a deep queue: submit N small tasks with no node running, report RSS.

    python scripts/measure_memory.py --tasks 1000000 [--durability fast]

Starts a real ``flowrra-broker`` (with ``flowrra.processes``) on free loopback ports with a
temporary data directory, submits the tasks with ``submit_many`` and prints the broker's
resident set size (VmRSS, and its anonymous part RssAnon) before and after, then restarts the
broker on the same data and reports the RSS and the time recovery took (until a client is
welcomed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time

from flowrra import Flowrra
from flowrra.processes import Launcher

app = Flowrra.from_urls()


@app.task()
async def noop(i: int) -> int:
    return i


def rss_mb(pid: int) -> tuple[float, float]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["RssAnon"].split()[0]) / 1024


async def submit_all(url: str, total: int, batch: int) -> float:
    client = Flowrra.from_urls(broker=url, request_timeout=120)
    client.task(name=noop.__module__ + ".noop")(noop)  # same name as the node would use
    started = time.perf_counter()
    async with client:
        for start in range(0, total, batch):
            await client.submit_many(noop, [(i,) for i in range(start, min(total, start + batch))])
            if start % (batch * 20) == 0:
                print(f"  submitted {start + batch:>9,}", file=sys.stderr)
        return time.perf_counter() - started


async def wait_ready(url: str) -> float:
    started = time.perf_counter()
    client = Flowrra.from_urls(broker=url, connect_timeout=300)
    async with client:
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=5_000)
    parser.add_argument("--durability", choices=["full", "fast"], default="fast")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="flowrra-mem-")
    # Recovery of a deep queue can take minutes; only the last log lines are kept.
    launcher = Launcher(workdir, durability=args.durability, keep_lines=200)
    try:
        broker = launcher.broker(timeout=300)
        before, _ = rss_mb(broker.pid)
        seconds = asyncio.run(submit_all(broker.url, args.tasks, args.batch))
        after, after_anon = rss_mb(broker.pid)
        print(f"queued {args.tasks:,} tasks in {seconds:.1f}s ({args.tasks / seconds:,.0f}/s)")
        print(
            f"broker RSS: {before:.0f} MB before, {after:.0f} MB after ({after_anon:.0f} MB anon)"
        )
        broker.process.terminate(60)
        size = sum(e.stat().st_size for e in os.scandir(broker.data_dir)) / 2**20
        print(f"data directory: {size:.0f} MB")
        started = time.perf_counter()
        broker = launcher.broker(
            port=broker.port,
            publish_port=broker.publish_port,
            data_dir=broker.data_dir,
            wait=False,  # recovery is timed until a client is welcomed
        )
        asyncio.run(wait_ready(broker.url))
        recovery = time.perf_counter() - started
        rss, anon = rss_mb(broker.pid)
        print(f"after restart: recovered in {recovery:.1f}s; RSS {rss:.0f} MB ({anon:.0f} MB anon)")
    finally:
        for problem in launcher.close():
            print(f"teardown: {problem}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
