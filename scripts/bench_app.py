"""The tasks that ``scripts/bench.py`` runs, importable by a ``flowrra-node`` process.

``flowrra-node --app bench_app:app`` (with ``scripts/`` on ``PYTHONPATH``) serves them; the
bench registers the same functions on its own client apps with :func:`register`, so task
names (``bench_app.add``, ``bench_app.cpu_sum``) agree between client and node.
"""

from __future__ import annotations

from typing import Any

from flowrra import Flowrra


async def add(x: int, y: int) -> int:
    """W1/W2/W4: the smallest useful async task."""
    return x + y


async def total(values: list[int]) -> int:
    """The bench chord's callback."""
    return sum(values)


def cpu_sum(n: int) -> int:
    """W3: pure CPU work (``sum(range(200_000))`` takes a few milliseconds)."""
    return sum(range(n))


def register(app: Flowrra) -> Flowrra:
    """Register the bench tasks on ``app`` (the functions are shared by every app)."""
    app.task()(add)
    app.task()(total)
    app.task(cpu_bound=True)(cpu_sum)
    return app


def make_app(broker: str | None = None, **options: Any) -> Flowrra:
    """A Flowrra app with the bench tasks: embedded when ``broker`` is None."""
    return register(Flowrra.from_urls(broker, **options))


# What `flowrra-node --app bench_app:app` serves (only its task registry is used there).
app = make_app()
