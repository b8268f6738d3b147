"""The Flowrra app and the tasks of the reports service.

The web app imports this module, and so does every node, run from the directory that holds
the ``reports`` package::

    flowrra-node --app reports.tasks:app --broker tcp://broker-host:5555
"""

import math
import os
import statistics

from flowrra import Flowrra

# FLOWRRA_BROKER names the broker ("tcp://broker-host:5555"). Unset, the broker and a node
# run inside the web process: fine for `flask run`, wrong for several web processes.
app = Flowrra.from_urls(broker=os.environ.get("FLOWRRA_BROKER") or None)


@app.task(max_retries=2)
def summarize(values: list[float]) -> dict[str, float]:
    """Summary figures of a series (a plain ``def``: it runs on the node's thread pool)."""
    return {
        "count": len(values),
        "total": math.fsum(values),
        "mean": statistics.fmean(values),
        "max": max(values),
    }
