"""Named exit codes of the ``flowrra-broker``, ``flowrra-node`` and ``flowrra`` commands."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes (values follow BSD sysexits where one fits)."""

    OK = 0  # finished, or shut down cleanly on SIGINT/SIGTERM
    FAILURE = 1  # a command ran and reported a failure (e.g. ``flowrra result`` of an unknown id)
    USAGE = 2  # bad command line (click's own code)
    UNAVAILABLE = 69  # cannot bind, or the broker cannot be reached
    SOFTWARE = 70  # an internal error ended the process
    CONFIG = 78  # the configuration is invalid (e.g. ``--app`` cannot be imported)
