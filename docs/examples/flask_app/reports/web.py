"""The reports web app: Flask views that queue work with ``app.sync`` and report on it.

Run it with ``flask --app reports.web run``. The Flowrra app needs no start or stop here: the
blocking facade starts on its first call, serves every thread of the server, and stops when
the process exits.
"""

import contextlib
import math
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, request, url_for
from flask.typing import ResponseReturnValue
from flowrra import Flowrra, SerializationError, TaskResult

from reports import tasks

# A request may wait this long at most for its task to finish.
MAX_WAIT_S = 10.0

views = Blueprint("reports", __name__)


def create_app(flowrra: Flowrra | None = None) -> Flask:
    """The Flask app, using ``flowrra`` (by default the app of :mod:`reports.tasks`)."""
    web = Flask(__name__)
    web.extensions["flowrra"] = flowrra or tasks.app
    web.register_blueprint(views)
    return web


def flowrra() -> Flowrra:
    """The Flowrra app of the Flask app handling this request."""
    app: Flowrra = current_app.extensions["flowrra"]
    return app


def describe(result: TaskResult) -> dict[str, Any]:
    """A task's state as JSON."""
    return {
        "task": result.task_id,
        "status": result.status.value,
        "result": result.result,
        "error": result.error,
    }


def wait_seconds() -> float | None:
    """The ``?wait=`` of the request (0 without it), at most MAX_WAIT_S; None if invalid."""
    try:
        wait_s = float(request.args.get("wait", "0"))
    except ValueError:
        return None
    return min(max(wait_s, 0.0), MAX_WAIT_S)


def is_number(value: object) -> bool:
    """A finite JSON number (not a boolean)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@views.post("/reports")
def create_report() -> ResponseReturnValue:
    """Queue a summary of ``{"values": [...]}``; with ``?wait=5``, answer with the summary
    if it is ready within 5 seconds, else (202) with where to follow it."""
    body = request.get_json(silent=True)
    values = body.get("values") if isinstance(body, dict) else None
    if not isinstance(values, list) or not values or not all(map(is_number, values)):
        return jsonify(error='send {"values": [...]}, a non-empty list of numbers'), 400
    wait_s = wait_seconds()
    if wait_s is None:
        return jsonify(error="wait is a number of seconds"), 400
    try:
        task_id = flowrra().sync.submit(tasks.summarize, values)
    except SerializationError as exc:  # say, an integer beyond 64 bits
        return jsonify(error=str(exc)), 400
    if wait_s > 0:
        with contextlib.suppress(TimeoutError):  # not ready in time: answer 202 below
            result = flowrra().sync.wait_for_result(task_id, timeout=wait_s)
            return jsonify(describe(result)), 200 if result.success else 500
    return jsonify(task=task_id, status_url=url_for("reports.report", task_id=task_id)), 202


@views.get("/reports/<task_id>")
def report(task_id: str) -> ResponseReturnValue:
    """A report task's state (200 once it is complete, 202 before)."""
    result = flowrra().sync.get_result(task_id)
    if result is None:
        return jsonify(error=f"no task {task_id!r}"), 404
    return jsonify(describe(result)), 200 if result.is_complete else 202
