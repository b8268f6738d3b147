"""CURVE keys: authentication and encryption of every ZeroMQ connection to the broker.

``flowrra keygen NAME`` writes ``NAME.key`` (the public key, safe to copy around) and
``NAME.key_secret`` (the secret key, which never leaves its machine), in ZeroMQ's ZPL
certificate format. A client or node needs the broker's public key and its own secret key
file; the broker needs its secret key file and directories of authorized public keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from flowrra.errors import FlowrraError


class CurveKeyError(FlowrraError, ValueError):
    """A key file is missing or not a CURVE certificate."""


def keygen(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write a new key pair; returns (public key file, secret key file)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad key name {name!r}")
    os.makedirs(directory, exist_ok=True)
    public, secret = (Path(directory) / f"{name}.key", Path(directory) / f"{name}.key_secret")
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite a key")
    public_file, secret_file = zmq.auth.create_certificates(os.fspath(directory), name)
    os.chmod(secret_file, 0o600)
    return Path(public_file), Path(secret_file)


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The public key (z85) in a ``.key`` or ``.key_secret`` file."""
    try:
        public, _ = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read a CURVE key from {path}: {exc}") from exc
    return public


def load_key_pair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file."""
    try:
        public, secret = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read a CURVE key from {path}: {exc}") from exc
    if secret is None:
        raise CurveKeyError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a client or node needs to reach a CURVE-protected broker."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(
        cls, server_key: str | os.PathLike[str], secret_key: str | os.PathLike[str]
    ) -> ClientKeys:
        public, secret = load_key_pair(secret_key)
        return cls(load_public_key(server_key), public, secret)

    def apply(self, socket: zmq.Socket[bytes]) -> None:
        """Make ``socket`` (before connecting) a CURVE client of the broker."""
        socket.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def client_keys(
    server_key: str | os.PathLike[str] | None, secret_key: str | os.PathLike[str] | None
) -> ClientKeys | None:
    """Keys from the two options a client or node takes; both or neither must be given."""
    if server_key is None and secret_key is None:
        return None
    if server_key is None or secret_key is None:
        raise CurveKeyError("CURVE needs both the broker's public key and our secret key file")
    return ClientKeys.from_files(server_key, secret_key)
