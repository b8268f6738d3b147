"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from flowrra import Flowrra
from tests.apps import failures
from tests.conftest import BrokerProcess, Launcher, embedded_twin, remote_twin

APP = "tests.apps.failures:app"


@pytest.fixture(params=["embedded", "remote"])
def app(request: pytest.FixtureRequest, launcher: Launcher) -> Flowrra:
    """tests.apps.failures as an embedded app, and as a client of a broker with one node
    (one worker process), for the modules here that do not define their own ``app``."""
    if request.param == "embedded":
        return embedded_twin(failures.app, processes=1)
    broker: BrokerProcess = launcher.broker()
    launcher.node(broker, APP, processes=1)
    return remote_twin(failures.app, broker)
