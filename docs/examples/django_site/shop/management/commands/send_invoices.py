"""``python manage.py send_invoices 1 2 3 [--wait 30]``: queue the invoices of some orders."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from shop.tasks import app, render_invoice


class Command(BaseCommand):
    help = "Queue the invoice of each order given; with --wait, wait for them and print them."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("order_ids", nargs="+", type=int)
        parser.add_argument(
            "--wait", type=float, default=0.0, help="seconds to wait for each invoice"
        )

    def handle(self, *args: Any, order_ids: list[int], wait: float, **options: Any) -> None:
        # One acknowledgement for all of them. The command needs no cleanup: at exit the
        # facade waits (briefly) until the broker has stored what was submitted, then stops.
        task_ids = app.sync.submit_many(render_invoice, [(order_id,) for order_id in order_ids])
        for order_id, task_id in zip(order_ids, task_ids, strict=True):
            self.stdout.write(f"order {order_id}: task {task_id}")
        if wait <= 0:
            return
        for order_id, task_id in zip(order_ids, task_ids, strict=True):
            try:
                result = app.sync.wait_for_result(task_id, timeout=wait)
            except TimeoutError as exc:
                raise CommandError(f"order {order_id}: no invoice after {wait}s") from exc
            if not result.success:
                raise CommandError(f"order {order_id}: {result.status.value}: {result.error}")
            self.stdout.write(f"order {order_id}: {result.result}")
