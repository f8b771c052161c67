"""What the broker asks of the cluster layer (roost.cluster implements it; the broker never
imports it). A lone node has none, and every call site then does what a single node does."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from roost.broker.channel import Channel
    from roost.broker.message import Message
    from roost.broker.session import Session


class ClusterHooks(Protocol):
    def open_session(
        self,
        channel: Channel,
        client_id: str,
        clean_start: bool,
        expiry: int,
        done: Callable[[Session, bool], None],
    ) -> None:
        """Make this node the session's home in the registry (taking it over from another
        node if it lives there), attach it and call ``done(session, present)``."""

    def name_message(self, msg: Message) -> None:
        """Give a message published on this node its cluster-wide ``fwd_id``."""

    def forward(self, msg: Message, local_groups: list[tuple[str, str]]) -> int:
        """Send ``msg`` to every other node with a matching route (shared groups not served
        locally go to one node each); the number of nodes it went to."""

    def retained_changed(self, msg: Message) -> None:
        """A retained message was set (payload) or cleared (empty) on this node."""

    def session_changed(self, session: Session) -> None:
        """A session's subscriptions, expiry or connection changed (the registry entry)."""

    def session_ended(self, session: Session) -> None:
        """A session ended on this node (its registry entry goes)."""

    def status(self) -> dict[str, Any]:
        """Counters and state for metrics and the REST API."""
