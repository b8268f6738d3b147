"""Flowrra on the embedded default: no broker to run, no configuration.

Shows async and cpu_bound tasks, retries with exponential backoff, and priorities.
Run it with:  python scripts/demo.py
"""

from __future__ import annotations

import asyncio
import time

from flowrra import Flowrra

# No URL: the broker and a node run inside this process (cpu_bound tasks still get their own
# worker processes). Four async slots keep the priority demo easy to follow.
app = Flowrra.from_urls(concurrency=4, processes=2)

_attempts: dict[str, int] = {}


@app.task()
async def fetch_page(page: int) -> dict[str, int]:
    """An I/O-bound task: it waits, as a network call would."""
    await asyncio.sleep(0.2)
    return {"page": page, "items": page * 10}


@app.task(cpu_bound=True)
def count_primes(limit: int) -> int:
    """A CPU-bound task: it runs in a worker process, not on the event loop."""
    sieve = bytearray([1]) * (limit + 1)
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    return sum(sieve)


@app.task(max_retries=3, retry_delay=0.2)
async def flaky_call(key: str) -> str:
    """Fails twice, then succeeds: the broker retries it after 0.2 s, then 0.4 s."""
    _attempts[key] = _attempts.get(key, 0) + 1
    if _attempts[key] < 3:
        raise ConnectionError(f"attempt {_attempts[key]}: service unavailable")
    return f"succeeded on attempt {_attempts[key]}"


@app.task(max_retries=1, retry_delay=0.1)
async def always_fails() -> None:
    raise ValueError("this task always fails")


@app.task()
async def hold(seconds: float) -> None:
    await asyncio.sleep(seconds)


@app.task()
async def job(label: str) -> str:
    await asyncio.sleep(0.05)
    return label


async def main() -> None:
    async with app:
        print("1. async tasks run concurrently on the event loop")
        started = time.perf_counter()
        ids = [await app.submit(fetch_page, page) for page in range(1, 5)]
        for task_id in ids:
            result = await app.wait_for_result(task_id, timeout=10)
            print(f"   {result.task_name}: {result.result}")
        print(f"   4 x 0.2 s of waiting took {time.perf_counter() - started:.2f} s\n")

        print("2. cpu_bound tasks run in worker processes")
        ids = [await app.submit(count_primes, limit) for limit in (2_000_000, 3_000_000)]
        for task_id in ids:
            result = await app.wait_for_result(task_id, timeout=60)
            print(f"   count_primes -> {result.result} primes")
        print()

        print("3. retries with exponential backoff")
        result = await app.wait_for_result(await app.submit(flaky_call, "demo"), timeout=10)
        print(
            f"   flaky_call: {result.status.value} after {result.retries} retries: {result.result}"
        )
        result = await app.wait_for_result(await app.submit(always_fails), timeout=10)
        print(
            f"   always_fails: {result.status.value} after {result.retries} retry: {result.error}\n"
        )

        print("4. priorities: higher runs first, FIFO within a priority")
        blockers = [await app.submit(hold, 0.3) for _ in range(4)]  # fill the 4 slots
        jobs = [
            await app.submit(job, label, priority=priority)
            for label, priority in [
                ("background-1", -10),
                ("normal-1", 0),
                ("urgent-1", 100),
                ("normal-2", 0),
                ("background-2", -10),
                ("urgent-2", 100),
            ]
        ]
        for task_id in blockers:
            await app.wait_for_result(task_id, timeout=10)
        results = [await app.wait_for_result(task_id, timeout=10) for task_id in jobs]
        order = sorted(results, key=lambda r: (r.started_at, r.submitted_at))
        print("   submitted: " + ", ".join(r.result for r in results))
        print("   started:   " + ", ".join(r.result for r in order))

        status = await app.get_result(jobs[0])
        assert status is not None
        print(f"\nget_result({jobs[0][:8]}...) -> {status.status.value}; done.")


if __name__ == "__main__":
    asyncio.run(main())
