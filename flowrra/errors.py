"""Every error Flowrra raises derives from :class:`FlowrraError`."""

from __future__ import annotations


class FlowrraError(Exception):
    """Root of all Flowrra errors."""


class TaskNotFoundError(FlowrraError, LookupError):
    """The function was not registered with ``@app.task`` on this app."""


class SerializationError(FlowrraError, TypeError):
    """A value cannot travel as msgpack (arguments or a result)."""


class MessageTooLargeError(FlowrraError, ValueError):
    """An encoded message is larger than the broker accepts."""


class ProtocolError(FlowrraError):
    """A peer sent frames that do not follow the Flowrra wire protocol."""


class BrokerUnavailable(FlowrraError, ConnectionError):
    """The broker did not answer within the configured wait."""


class SubmitRejected(FlowrraError):
    """The broker refused a submitted task (the message says why).

    For ``submit_many``, ``task_ids`` lists every id of the call: the calls that were not
    refused were accepted and will run.
    """

    task_ids: list[str] | None = None


class TaskIdConflict(SubmitRejected):
    """The task id is already used by a different call (another task or other arguments).

    Submitting the same call again under its id is idempotent; another call is refused.
    """


class AdminError(FlowrraError):
    """The broker refused an operator command (the message says why)."""


class TaskTimeoutError(FlowrraError, TimeoutError):
    """A task attempt ran longer than its ``timeout``."""


class WorkerLostError(FlowrraError):
    """The process running a task attempt died before reporting a result."""


class RemoteTaskError(FlowrraError):
    """A task raised an exception; carries its type name, message and traceback."""

    def __init__(self, exc_type: str, message: str, traceback: str | None = None) -> None:
        super().__init__(f"{exc_type}: {message}")
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback
