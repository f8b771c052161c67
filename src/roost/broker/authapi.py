"""What the sans-IO channel asks of authentication, and nothing that does I/O.

The backends (PBKDF2 in worker threads, the HTTP hook on aiohttp, the password file on disk)
live in ``roost.broker.authn``, which the node builds and runs on its event loop; the channel
sees only :class:`AuthService`, so importing the channel loads no asyncio, threads or config
loader (``tests/test_layers.py`` checks it in a fresh interpreter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

#: None: accepted; else (reason code, reason string) for the CONNACK.
Refusal = tuple[int, str] | None
Done = Callable[[Refusal], None]


@dataclass(frozen=True)
class AuthRequest:
    client_id: str
    username: str | None
    password: bytes | None
    peer: str  # "host:port"
    listener: str
    protocol_version: int = 4
    #: The username comes from a verified client certificate (it is the credential).
    from_certificate: bool = False


@dataclass
class Step:
    """One answer of an enhanced authentication exchange, carried by CONNECT/AUTH/CONNACK."""

    status: Literal["continue", "success", "failure"]
    data: bytes = b""
    reason: str = ""


class EnhancedAuthMethod(Protocol):
    #: The authenticated identity, set on success (becomes the client's username).
    username: str | None

    def start(self, data: bytes, username: str | None) -> Step: ...
    def next(self, data: bytes) -> Step: ...


class AuthService(Protocol):
    def authenticate(self, req: AuthRequest, done: Done) -> None:
        """Answer through ``done``, at once or later (from the node's event loop); until then
        the channel holds the client's further packets."""

    def enhanced(self, method: str) -> EnhancedAuthMethod | None:
        """A new exchange of the named method, or None if it is not offered here."""
