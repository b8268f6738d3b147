"""URLs of the example site."""

from django.urls import path

from shop import views

urlpatterns = [
    path("orders/<int:order_id>/receipt", views.send_order_receipt, name="order-receipt"),
    path("orders/<int:order_id>/invoice", views.order_invoice, name="order-invoice"),
    path("tasks/<str:task_id>", views.task_status, name="task-status"),
]
