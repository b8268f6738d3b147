"""InprocHub.every_peer_takes_bodies is kept between link changes: opening, closing and
handing a link a body handler each make the hub look again."""

from __future__ import annotations

from typing import Any

from flowrra.inproc import InprocHub
from flowrra.protocol import Command
from flowrra.transport import Wakeup


def _handler(command: Command, body: Any) -> None:
    pass


def every(hub: InprocHub) -> bool:
    return hub.every_peer_takes_bodies  # (a call: mypy would narrow the property)


def test_every_peer_takes_bodies_follows_the_links() -> None:
    hub = InprocHub(Wakeup())
    assert every(hub)  # no peer at all
    first = hub.link(Wakeup())
    assert not every(hub)  # takes frames only, so far
    first.push_bodies_to(_handler)
    assert every(hub)
    second = hub.link(Wakeup())
    assert not every(hub)
    identities = list(hub._links)
    assert [hub.takes_bodies(identity) for identity in identities] == [True, False]
    second.close()
    assert every(hub)
    first.close()
    assert every(hub)
    third = hub.link(Wakeup())
    assert not every(hub)
    third.push_bodies_to(_handler)
    assert every(hub)
