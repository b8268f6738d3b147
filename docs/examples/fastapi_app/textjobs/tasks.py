"""The Flowrra app and the tasks of the text-jobs service.

The API imports this module, and so does every node, run from the directory that holds the
``textjobs`` package::

    flowrra-node --app textjobs.tasks:app --broker tcp://broker-host:5555
"""

import asyncio
import os

from flowrra import Flowrra

# FLOWRRA_BROKER names the broker ("tcp://broker-host:5555"). Unset, the broker and a node
# run inside the API's own process: fine for one uvicorn process, wrong for several workers.
app = Flowrra.from_urls(broker=os.environ.get("FLOWRRA_BROKER") or None)


@app.task(max_retries=2, timeout=30.0)
async def word_count(text: str) -> dict[str, int]:
    """Counts of a text's words (an ``async def``: it runs in the node's event loop)."""
    await asyncio.sleep(0)  # a real task would await I/O here
    words = text.split()
    return {
        "words": len(words),
        "distinct": len({word.casefold() for word in words}),
        "characters": len(text),
    }
