"""What a channel (and its QUIC stream subclass) asks of its node; ``roost.broker.node.Broker``
implements it.

The channel is typed against this, not the node, so it does not import the node module and a
test can drive it with anything that answers these. Members are read-only properties here so
the node may hold narrower types (its ``Authenticator`` is an ``AuthService``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from roost.broker.acl import Acl
    from roost.broker.authapi import AuthService
    from roost.broker.channel import Channel
    from roost.broker.commits import Commits
    from roost.broker.limits import Limits
    from roost.broker.message import Message
    from roost.broker.router import SessionSubscription
    from roost.broker.session import Session
    from roost.broker.sessions import SessionRegistry
    from roost.broker.stats import Stats
    from roost.config import Config


class Node(Protocol):
    @property
    def config(self) -> Config:
        """The config in force (hot config replaces it: read it at each use)."""

    @property
    def clock(self) -> Callable[[], float]:
        """The node's monotonic clock."""

    @property
    def stats(self) -> Stats: ...

    @property
    def acl(self) -> Acl: ...

    @property
    def acl_active(self) -> bool: ...

    @property
    def authn(self) -> AuthService: ...

    @property
    def limits(self) -> Limits: ...

    @property
    def commits(self) -> Commits:
        """What gated replies wait for."""

    @property
    def registry(self) -> SessionRegistry:
        """The node's sessions and live channels: a channel adds itself when admitted and
        leaves when closed."""

    @property
    def refused(self) -> list[Session]:
        """After ``publish``: the sessions whose full queue refused the message."""

    @property
    def over(self) -> list[Session]:
        """After ``publish``: the sessions a forced message took past their queue limits."""

    def new_client_id(self) -> str: ...

    def new_session(self, client_id: str) -> Session:
        """A fresh session with the node's queue limits (a QUIC stream's own session)."""

    def admit(self, client_id: str, username: str | None, peer: str) -> tuple[int, str] | None:
        """The refusal of a CONNECT (bans, evacuation), or None."""

    def open_session(
        self,
        channel: Channel,
        client_id: str,
        clean_start: bool,
        expiry: int,
        done: Callable[[Session, bool], None],
    ) -> None: ...

    def channel_closed(self, channel: Channel) -> None: ...

    def subscribe(self, opts: SessionSubscription) -> bool:
        """Add or replace a subscription; True if the client already had this filter."""

    def send_retained(self, opts: SessionSubscription, existed: bool) -> None: ...

    def unsubscribe(self, session: Session, topic_filter: str) -> bool: ...

    def publish(self, msg: Message, force: bool = False) -> int:
        """Route a message; the number of sessions it matched."""
