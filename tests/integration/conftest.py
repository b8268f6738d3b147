"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from flowrra import Flowrra
from tests.apps import failures
from tests.conftest import BrokerProcess, Launcher, embedded_twin, remote_twin

APP = "tests.apps.failures:app"


@pytest.fixture(scope="module")
def failures_broker(module_launcher: Launcher) -> BrokerProcess:
    """A broker with one node serving tests.apps.failures (one worker process), shared by the
    remote runs of a module: its tests use their own task ids, marker directories and
    schedules, and leave nothing running or scheduled behind."""
    broker = module_launcher.broker()
    module_launcher.node(broker, APP, processes=1)
    return broker


@pytest.fixture(params=["embedded", "remote"])
def app(request: pytest.FixtureRequest) -> Flowrra:
    """tests.apps.failures as an embedded app, and as a client of a broker with one node
    (one worker process), for the modules here that do not define their own ``app``."""
    if request.param == "embedded":
        return embedded_twin(failures.app, processes=1)
    return remote_twin(failures.app, request.getfixturevalue("failures_broker"))
