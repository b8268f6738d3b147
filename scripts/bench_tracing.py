#!/usr/bin/env python3
"""What tracing (flowrra/tracing.py) costs, off and on.

    .venv/bin/python scripts/bench_tracing.py            # a few seconds
    .venv/bin/python scripts/bench_tracing.py --n 20000

* the check the hooks make while tracing is off (``tracing.tracer is None``), timed alone;
* W1-seq in the embedded default: ``await app.submit(noop)`` one at a time, then every result
  awaited; per-task time with tracing off (no provider), and on (an SDK TracerProvider with
  a span processor that drops everything, so only making the spans and carrying the context
  is counted). Runs alternate, best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import timeit

from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider

from flowrra import Flowrra, tracing

app = Flowrra.from_urls()


@app.task(max_retries=0)
async def noop(i: int) -> int:
    return i


class Drop(SpanProcessor):
    def on_end(self, span: ReadableSpan) -> None:
        pass


async def w1_seq(n: int) -> float:
    """Seconds per task: n sequential submits, then all results."""
    async with app:
        start = time.perf_counter()
        ids = [await app.submit(noop, i) for i in range(n)]
        await asyncio.gather(*(app.wait_for_result(i, timeout=60) for i in ids))
        return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    options = parser.parse_args()

    tracing.use_tracer_provider(None)
    check = timeit.Timer("tracing.tracer is None", globals={"tracing": tracing})
    loops, _ = check.autorange()
    per_check = min(check.repeat(5, loops)) / loops
    print(f"disabled check (tracing.tracer is None): {per_check * 1e9:.1f} ns")

    provider = TracerProvider()
    provider.add_span_processor(Drop())
    off: list[float] = []
    on: list[float] = []
    for _ in range(options.repeat):
        tracing.use_tracer_provider(None)
        off.append(asyncio.run(w1_seq(options.n)))
        tracing.use_tracer_provider(provider)
        on.append(asyncio.run(w1_seq(options.n)))
    tracing.use_tracer_provider(None)
    print(f"W1-seq embedded, tracing off: {min(off) * 1e6:.1f} us/task (best of {len(off)})")
    print(f"W1-seq embedded, tracing on:  {min(on) * 1e6:.1f} us/task (best of {len(on)})")
    # The off path runs three such checks per task (submit, start and end of the run).
    print(f"disabled-path share of a task: {3 * per_check / min(off) * 100:.3f} %")


if __name__ == "__main__":
    main()
