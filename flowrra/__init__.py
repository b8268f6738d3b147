"""Flowrra: a ZeroMQ task fabric. Run Python functions as background tasks, anywhere."""

import logging

from flowrra.app import Flowrra
from flowrra.errors import (
    BrokerUnavailable,
    FlowrraError,
    MessageTooLargeError,
    ProtocolError,
    RemoteTaskError,
    SerializationError,
    SubmitRejected,
    TaskIdConflict,
    TaskNotFoundError,
    TaskTimeoutError,
    WorkerLostError,
)
from flowrra.progress import Progress, report_progress
from flowrra.protocol import TaskStatus
from flowrra.result import TaskResult
from flowrra.workflow import Call, call

__version__ = "0.2.0"

__all__ = [
    "BrokerUnavailable",
    "Call",
    "Flowrra",
    "FlowrraError",
    "MessageTooLargeError",
    "Progress",
    "ProtocolError",
    "RemoteTaskError",
    "SerializationError",
    "SubmitRejected",
    "TaskIdConflict",
    "TaskNotFoundError",
    "TaskResult",
    "TaskStatus",
    "TaskTimeoutError",
    "WorkerLostError",
    "__version__",
    "call",
    "report_progress",
]

# A library logs only where the application asked it to.
logging.getLogger("flowrra").addHandler(logging.NullHandler())
