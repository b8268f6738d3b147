"""The Django recipe (docs/examples/django_site) against a real broker and node.

``django.test.Client`` drives the views in this process, and ``call_command`` the management
command; a ``flowrra-node --app shop.worker:app`` started from the project directory (as
docs/frameworks/django.md says) runs the tasks with Django set up. Django's settings are
process-wide, so they are configured once (guarded) from the example's own settings module,
with the test broker's URL, and nothing else in the suite configures Django.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import django
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import Client

from tests.conftest import Launcher, NodeProcess
from tests.examples.conftest import Example, example

pytestmark = pytest.mark.timeout(60)

SHOP_NAME = "The Example Shop"


@dataclass
class Site:
    tasks: ModuleType  # shop.tasks: the app the views and the command use
    node: NodeProcess


def configure_django(site: Example, broker_url: str) -> None:
    """Django settings from ``mysite.settings``, pointed at ``broker_url`` (once per process)."""
    if settings.configured:
        if getattr(settings, "FLOWRRA_BROKER", None) != broker_url:
            raise AssertionError("Django's settings were configured before, not for this test")
        return
    values = site.module("mysite.settings")
    options = {name: getattr(values, name) for name in dir(values) if name.isupper()}
    options["FLOWRRA_BROKER"] = broker_url
    options["ALLOWED_HOSTS"] = [*options["ALLOWED_HOSTS"], "testserver"]  # the test Client's
    settings.configure(**options)
    django.setup()


@pytest.fixture(scope="module")
def site(module_launcher: Launcher) -> Iterator[Site]:
    broker = module_launcher.broker()
    with example("django_site") as project:
        node = module_launcher.node(
            broker,
            "shop.worker:app",
            cwd=project.directory,  # the node imports from its working directory
            repo_on_path=False,
            env={"DJANGO_SETTINGS_MODULE": "mysite.settings"},
            processes=0,
        )
        configure_django(project, broker.url)
        tasks = project.module("shop.tasks")
        assert tasks.app.broker_url == broker.url
        try:
            yield Site(tasks, node)
        finally:
            tasks.app.sync.close()  # before the broker stops


def test_a_view_queues_a_receipt_that_the_node_mails(site: Site) -> None:
    client = Client()
    mark = site.node.process.mark()

    response = client.post("/orders/7/receipt", {"email": "ada@example.com"})
    assert response.status_code == 202
    assert response.json() == {"task": "receipt-7", "status_url": "/tasks/receipt-7"}

    status = client.get("/tasks/receipt-7", {"wait": "10"})
    assert status.status_code == 200
    assert status.json() == {
        "task": "receipt-7",
        "status": "success",
        "result": 1,  # messages sent
        "error": None,
        "retries": 0,
    }
    # The console mail backend of the node's Django printed it.
    site.node.process.wait_for(r"^Subject: Your receipt for order 7$", since=mark)
    site.node.process.wait_for(r"^To: ada@example\.com$", since=mark)


def test_a_repeated_request_gets_the_same_task_and_another_address_a_conflict(
    site: Site,
) -> None:
    client = Client()
    first = client.post("/orders/8/receipt", {"email": "bob@example.com"})
    again = client.post("/orders/8/receipt", {"email": "bob@example.com"})
    assert first.status_code == again.status_code == 202
    assert first.json()["task"] == again.json()["task"] == "receipt-8"

    other = client.post("/orders/8/receipt", {"email": "eve@example.com"})
    assert other.status_code == 409

    result = site.tasks.app.sync.wait_for_result("receipt-8", timeout=10)
    assert result.success and result.result == 1


def test_the_status_view_refuses_unknown_tasks_and_bad_waits(site: Site) -> None:
    client = Client()
    assert client.get("/tasks/no-such-task").status_code == 404
    assert client.get("/tasks/receipt-7", {"wait": "soon"}).status_code == 400
    assert client.post("/orders/9/receipt", {"email": "nobody"}).status_code == 400
    assert client.get("/orders/9/receipt").status_code == 405


def test_an_async_view_waits_for_the_invoice_rendered_on_the_node(site: Site) -> None:
    response = Client().post("/orders/3/invoice")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "success"
    # The seller comes from the settings of the node's Django.
    assert body["result"] == {"order": 3, "seller": SHOP_NAME, "total_cents": 3750}


def test_the_command_queues_invoices_and_waits_for_them(site: Site) -> None:
    out = io.StringIO()
    call_command("send_invoices", "1", "2", "--wait", "10", stdout=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    queued = [re.fullmatch(r"order (\d+): task (\S+)", line) for line in lines[:2]]
    assert [m and m[1] for m in queued] == ["1", "2"]
    assert lines[2:] == [
        f"order 1: {{'order': 1, 'seller': '{SHOP_NAME}', 'total_cents': 1250}}",
        f"order 2: {{'order': 2, 'seller': '{SHOP_NAME}', 'total_cents': 2500}}",
    ]
    for match in queued:
        assert match is not None
        result = site.tasks.app.sync.get_result(match[2])
        assert result is not None and result.success


def test_a_task_the_command_queued_is_followed_through_the_status_view(site: Site) -> None:
    out = io.StringIO()
    call_command("send_invoices", "5", stdout=out)
    match = re.fullmatch(r"order 5: task (\S+)\n", out.getvalue())
    assert match is not None

    status = Client().get(f"/tasks/{match[1]}", {"wait": "10"})
    assert status.status_code == 200
    assert status.json()["result"] == {"order": 5, "seller": SHOP_NAME, "total_cents": 6250}


def test_the_command_refuses_what_is_not_an_order_id(site: Site) -> None:
    with pytest.raises(CommandError, match="invalid int value"):
        call_command("send_invoices", "five")
