"""Small, honest local stand-ins for third-party libraries the user guide's examples use.

``httpx``, ``aiosmtplib`` and ``pandas`` are not Flowrra dependencies, so the guide's examples
cannot import them here. Each stand-in implements only the calls the examples make, for real
(HTTP/1.1 and SMTP over asyncio streams, CSV parsing with the standard library), so the
examples run against local servers on 127.0.0.1 exactly as they would against the real
libraries. When the real library is installed it is used instead.

``httpx`` and ``aiosmtplib`` are imported as ``tests.apps.standins.<name>`` by
``tests/apps/guide.py``. The guide's ``process_csv`` does ``import pandas as pd`` inside the task
function, so that stand-in lives in ``site/``, a directory the tests put on ``sys.path`` (and
on a node's ``PYTHONPATH``) only while they need it, and only when pandas is not installed.
"""

from __future__ import annotations

import os

DIRECTORY = os.path.dirname(os.path.abspath(__file__))
SITE = os.path.join(DIRECTORY, "site")  # holds the top-level ``pandas`` stand-in
