"""This node's sessions and live channels: the one place that holds them.

The node, the durable store, the management service, the cluster layer and evacuation reach
sessions only through a :class:`SessionRegistry` (``broker.registry``): a lookup by client id,
a snapshot to walk, and named changes (install, remove) instead of writes into a shared dict,
so what a change implies has one place to live. In a cluster the registry of record is in etcd
(roost.cluster); this is the node's own part of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from roost.broker.channel import Channel
    from roost.broker.session import Session


class SessionRegistry:
    __slots__ = ("_channels", "_sessions")

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._channels: set[Channel] = set()  # every live channel, connected or not

    # sessions ---------------------------------------------------------------------------

    def get(self, client_id: str) -> Session | None:
        return self._sessions.get(client_id)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        """The sessions as they are now: a snapshot, so a walk may change the registry."""
        return iter(list(self._sessions.values()))

    def client_ids(self) -> list[str]:
        return list(self._sessions)

    def holds(self, session: Session) -> bool:
        """Whether ``session`` itself (not a newer one of its client id) is installed."""
        return self._sessions.get(session.client_id) is session

    def install(self, session: Session) -> Session | None:
        """Make ``session`` its client id's session here; the one it replaces, if any."""
        old = self._sessions.get(session.client_id)
        self._sessions[session.client_id] = session
        return old

    def remove(self, client_id: str) -> Session | None:
        """Take the client id's session off this node (ending it is the caller's business)."""
        return self._sessions.pop(client_id, None)

    def remove_if(self, session: Session) -> bool:
        """Remove ``session`` if it is still the installed one; whether it was."""
        if self._sessions.get(session.client_id) is session:
            del self._sessions[session.client_id]
            return True
        return False

    def connected_count(self) -> int:
        return sum(1 for s in self._sessions.values() if s.connected)

    # channels ---------------------------------------------------------------------------

    def channel_opened(self, channel: Channel) -> None:
        self._channels.add(channel)

    def channel_closed(self, channel: Channel) -> None:
        self._channels.discard(channel)

    def channels(self) -> list[Channel]:
        """The live channels as they are now (a snapshot)."""
        return list(self._channels)

    def channel_count(self) -> int:
        return len(self._channels)

    def connected_channels(self) -> list[Channel]:
        return [ch for ch in self._channels if ch.connected and not ch.closed]
