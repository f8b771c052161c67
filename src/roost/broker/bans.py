"""A ban list checked at CONNECT: by client id, username or peer address, with an optional end."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

Kind = Literal["clientid", "username", "peerhost"]
KINDS: tuple[str, ...] = ("clientid", "username", "peerhost")


@dataclass
class Ban:
    kind: str
    who: str
    reason: str = ""
    by: str = ""
    at: float = 0.0  # wall-clock seconds
    until: float | None = None  # wall-clock seconds; None: forever

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["as"] = d.pop("kind")
        return d


class Bans:
    """Kept in memory per node; the cluster layer replicates it (``on_add``, ``put``)."""

    def __init__(self, clock: Any = time.time) -> None:
        self._bans: dict[tuple[str, str], Ban] = {}
        self.clock = clock
        #: Told of each ban this node makes by itself (flapping detection): set by the cluster
        #: layer, which shares it with the other nodes (REST API bans go through that layer).
        self.on_add: Callable[[Ban], None] | None = None

    def __len__(self) -> int:
        return len(self._bans)

    def add(self, ban: Ban) -> None:
        self.put(ban)
        if self.on_add is not None:
            self.on_add(ban)

    def put(self, ban: Ban) -> None:
        """Add or replace a ban without telling ``on_add`` (one that came from the cluster)."""
        if ban.kind not in KINDS:
            raise ValueError(f"unknown ban kind {ban.kind!r}")
        ban.at = ban.at or self.clock()
        self._bans[(ban.kind, ban.who)] = ban

    def remove(self, kind: str, who: str) -> bool:
        return self._bans.pop((kind, who), None) is not None

    def list(self) -> list[Ban]:
        self._purge()
        return sorted(self._bans.values(), key=lambda b: (b.kind, b.who))

    def match(self, client_id: str, username: str | None, peerhost: str) -> Ban | None:
        """The ban that applies to this connection, if any (expired bans are dropped)."""
        if not self._bans:
            return None
        now = self.clock()
        for kind, who in (("clientid", client_id), ("username", username), ("peerhost", peerhost)):
            if who is None:
                continue
            key = (kind, who)
            ban = self._bans.get(key)
            if ban is None:
                continue
            if ban.until is not None and ban.until <= now:
                del self._bans[key]
                continue
            return ban
        return None

    def _purge(self) -> None:
        now = self.clock()
        for key, ban in list(self._bans.items()):
            if ban.until is not None and ban.until <= now:
                del self._bans[key]


def peer_host(peer: str) -> str:
    """``1.2.3.4:5678`` or ``::1:5678`` -> the address part."""
    host, sep, port = peer.rpartition(":")
    return host.strip("[]") if sep and port.isdigit() else peer
