"""The dashboard tests' app: the fleet's tasks, plus one that fails on every attempt."""

from __future__ import annotations

from flowrra import Flowrra
from flowrra.testing import copy_tasks
from tests.apps import fleet

app = Flowrra.from_urls(processes=1)
copy_tasks(fleet.app, app)


@app.task(max_retries=2, retry_delay=0.01)
async def always_fails(message: str) -> None:
    """Three attempts (two retries), each raising ``ValueError(message)``."""
    raise ValueError(message)
