"""The shop's Flowrra app and its tasks, imported by the web process and by every node.

The web process imports this module once Django is set up (through the views); a node imports
it through :mod:`shop.worker`, which sets Django up first. So tasks may use the settings, the
mail framework and the ORM.
"""

from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from flowrra import Flowrra

app = Flowrra.from_urls(broker=settings.FLOWRRA_BROKER)


@app.task(max_retries=3, retry_delay=2.0)
def send_receipt(order_id: int, address: str) -> int:
    """Mail the receipt of an order; a plain ``def``, so it runs on the node's thread pool."""
    return send_mail(
        subject=f"Your receipt for order {order_id}",
        message=f"Thank you for shopping at {settings.SHOP_NAME}.",
        from_email=None,  # settings.DEFAULT_FROM_EMAIL
        recipient_list=[address],
    )


@app.task()
def render_invoice(order_id: int) -> dict[str, Any]:
    """The invoice of an order (a real shop would read the order with the ORM here)."""
    return {"order": order_id, "seller": settings.SHOP_NAME, "total_cents": 1250 * order_id}
