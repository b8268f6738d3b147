"""Views that queue work with Flowrra and report on it.

Plain (``def``) views use the blocking facade, ``app.sync``: it is thread-safe, starts on the
first call and stops when the process exits. The one ``async def`` view runs inside the
server's event loop, where a blocking call would stall every other request (``app.sync``
refuses with ``SyncCallInLoopError``), so it hands the blocking calls to a thread.
"""

import contextlib
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, JsonResponse
from django.urls import reverse
from django.views.decorators.http import require_GET, require_POST
from flowrra import TaskIdConflict, TaskResult

from shop.tasks import app, render_invoice, send_receipt

# A status request may wait this long at most for the task to finish.
MAX_WAIT_S = 10.0


def describe(result: TaskResult) -> dict[str, Any]:
    """A task's state as JSON."""
    return {
        "task": result.task_id,
        "status": result.status.value,
        "result": result.result,
        "error": result.error,
        "retries": result.retries,
    }


@require_POST
def send_order_receipt(request: HttpRequest, order_id: int) -> JsonResponse:
    """Queue the receipt mail and answer at once (202) with where to follow it."""
    address = request.POST.get("email", "")
    if "@" not in address:
        return JsonResponse({"error": "an email address is required"}, status=400)
    try:
        # One receipt per order: a repeated request (a double click, a client retry) gets
        # the same task instead of a second mail.
        task_id = app.sync.submit(send_receipt, order_id, address, task_id=f"receipt-{order_id}")
    except TaskIdConflict:
        return JsonResponse({"error": "this order's receipt went to another address"}, status=409)
    status_url = reverse("task-status", args=[task_id])
    return JsonResponse({"task": task_id, "status_url": status_url}, status=202)


@require_GET
def task_status(request: HttpRequest, task_id: str) -> JsonResponse:
    """A task's state; ``?wait=5`` waits up to 5 seconds for it to finish first."""
    try:
        wait_s = min(float(request.GET.get("wait", "0")), MAX_WAIT_S)
    except ValueError:
        return JsonResponse({"error": "wait is a number of seconds"}, status=400)
    result = app.sync.get_result(task_id)
    if result is None:
        return JsonResponse({"error": f"no task {task_id!r}"}, status=404)
    if not result.is_complete and wait_s > 0:
        # Not finished in time: answer with the state we have (202).
        with contextlib.suppress(TimeoutError):
            result = app.sync.wait_for_result(task_id, timeout=wait_s)
    return JsonResponse(describe(result), status=200 if result.is_complete else 202)


@require_POST
async def order_invoice(request: HttpRequest, order_id: int) -> JsonResponse:
    """An async view: render the invoice on a node and wait up to 5 seconds for it."""
    task_id = await sync_to_async(app.sync.submit)(render_invoice, order_id)
    # Not thread_sensitive: the wait must not hold the one thread that Django runs
    # thread-sensitive code (such as the ORM) in while it waits.
    wait = sync_to_async(app.sync.wait_for_result, thread_sensitive=False)
    try:
        result = await wait(task_id, timeout=5.0)
    except TimeoutError:
        status_url = reverse("task-status", args=[task_id])
        return JsonResponse({"task": task_id, "status_url": status_url}, status=202)
    return JsonResponse(describe(result), status=200 if result.success else 500)
