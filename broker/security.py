"""The broker's side of CURVE: its key pair, and which public keys may connect as what.

Authentication runs in pyzmq's ZAP thread. A key found in the node key directory gets the
user id ``node:<key>``, one in the client directory ``client:<key>``; any other key is refused
and logged. The transport then drops (and logs) node commands that arrive from a client
key, so a client can never take tasks or post results.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from flowrra.protocol import NODE_ONLY_COMMANDS
from flowrra.security import load_key_pair, load_public_key

log = logging.getLogger("flowrra.broker.security")

NODE_ROLE = "node"
CLIENT_ROLE = "client"

_NODE_ONLY_FRAMES = frozenset(bytes([c]) for c in NODE_ONLY_COMMANDS)


def node_command_allowed(user_id: str, frames: list[bytes]) -> bool:
    """The role policy for one message (``frames`` after the routing id) from the CURVE
    ``user_id`` the authenticator gave its key: node commands come only from node keys."""
    if user_id.startswith(NODE_ROLE + ":"):
        return True
    return len(frames) <= 1 or frames[1] not in _NODE_ONLY_FRAMES


def _public_keys(directory: Path) -> set[bytes]:
    keys = set()
    for path in sorted(directory.glob("*.key")):
        try:
            keys.add(load_public_key(path))
        except ValueError as exc:
            log.warning("ignoring %s: %s", path, exc)
    return keys


class _RoleAuthenticator(ThreadAuthenticator):
    def __init__(self, context: zmq.Context[Any], access: BrokerAccess) -> None:
        super().__init__(context, log=logging.getLogger("flowrra.broker.zap"))
        self.access = access

    def curve_user_id(self, client_public_key: bytes) -> str:
        key = z85.encode(client_public_key)
        return f"{self.access.role_of(key)}:{key.decode()}"


class BrokerAccess:
    """Key directories for nodes and clients; re-read when they change, no restart needed."""

    def __init__(
        self,
        secret_key_file: str | os.PathLike[str],
        node_keys: str | os.PathLike[str],
        client_keys: str | os.PathLike[str],
    ) -> None:
        self.public, self.secret = load_key_pair(secret_key_file)
        self.node_dir, self.client_dir = Path(node_keys), Path(client_keys)
        for directory in (self.node_dir, self.client_dir):
            if not directory.is_dir():
                raise ValueError(f"{directory} is not a directory of public keys")
        self._stamp: tuple[float, float] | None = None
        self._nodes: set[bytes] = set()
        self._clients: set[bytes] = set()
        self._auth: _RoleAuthenticator | None = None

    def _refresh(self) -> None:
        stamp = (self.node_dir.stat().st_mtime, self.client_dir.stat().st_mtime)
        if stamp != self._stamp:
            self._stamp = stamp
            self._nodes, self._clients = _public_keys(self.node_dir), _public_keys(self.client_dir)
            log.info("authorized keys: %d nodes, %d clients", len(self._nodes), len(self._clients))

    def role_of(self, key: bytes) -> str:
        self._refresh()
        return NODE_ROLE if key in self._nodes else CLIENT_ROLE

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: may this public key (z85) connect at all?"""
        self._refresh()
        if key in self._nodes or key in self._clients:
            return True
        log.warning("refused a connection with an unknown CURVE key %s", key.decode())
        return False

    def start(self, context: zmq.Context[Any]) -> None:
        self._auth = _RoleAuthenticator(context, self)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def apply(self, socket: zmq.Socket[bytes]) -> None:
        """Make ``socket`` (before binding) a CURVE server with this broker's keys."""
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
