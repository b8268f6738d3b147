"""Command-line options shared by ``flowrra``, ``flowrra-broker`` and ``flowrra-node``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from flowrra.logs import LOG_LEVELS

F = TypeVar("F", bound=Callable[..., Any])


def log_options(command: F) -> F:
    """``--log-level`` and ``--log-format``."""
    command = click.option("--log-format", default="text", type=click.Choice(["text", "json"]))(
        command
    )
    return click.option("--log-level", default="INFO", type=click.Choice(LOG_LEVELS))(command)


def curve_client_options(command: F) -> F:
    """``--curve-server-key`` and ``--curve-secret-key``: a client's or node's CURVE keys."""
    command = click.option(
        "--curve-secret-key",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="Our own secret key file, from 'flowrra keygen'.",
    )(command)
    return click.option(
        "--curve-server-key",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="The broker's public key file: enables CURVE (with --curve-secret-key).",
    )(command)
