"""A session that just moved to this node, while its old home still relays what reached it there.

The old home relays every message for the session until every node routes it here; some of those
also come here directly. Each message is delivered once, whichever way comes first (its
cluster-wide id is remembered), and each publisher's messages stay in order: one that came
directly waits until a relayed message of the same publisher at least as recent arrives (its own
relayed copy, or a later one), which shows that everything relayed before it from that publisher
is here too, or until the old home says it relays no more. A publisher is its client id, its
messages ordered by the cluster's logical clock, which rises across a move between nodes; a
message without one (a will, an API publish, a peer of an older version) is ordered by its
origin node's message id instead.
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import TYPE_CHECKING

from roost.broker.message import RecentIds

if TYPE_CHECKING:
    from roost.broker.message import Message
    from roost.broker.router import SessionSubscription
    from roost.broker.session import Session

#: What Session.deliver takes: message, qos, retain, subscription ids, shared subscription.
DeliverArgs = tuple["Message", int, bool, tuple[int, ...], "SessionSubscription | None"]

SEEN_CAP = 100_000  # message ids remembered while relays may come


class Handoff:
    __slots__ = ("held", "home", "seen")

    def __init__(self, home: str, cap: int = SEEN_CAP) -> None:
        self.home = home  # the old home, which relays
        self.seen = RecentIds(cap)
        #: Per publisher: (its order, deliver arguments) of what came directly, in order.
        self.held: dict[tuple[str, str], deque[tuple[int, DeliverArgs]]] = {}

    def direct(self, msg: Message, args: DeliverArgs) -> None:
        fid = msg.fwd_id
        assert fid is not None
        if self.seen.add(fid):
            key, tick = _publisher(msg, fid)
            self.held.setdefault(key, deque()).append((tick, args))

    def relayed(self, session: Session, msg: Message) -> None:
        fid = msg.fwd_id
        assert fid is not None
        first = self.seen.add(fid)
        # What came directly from the same publisher before it may go now, then it (unless its
        # direct copy is among those).
        key, tick = _publisher(msg, fid)
        held = self.held.get(key)
        ready = []
        while held and held[0][0] <= tick:
            ready.append(held.popleft()[1])
        if first:
            ready.append((msg, msg.qos, False, (), None))
        _deliver(session, ready)

    def end(self, session: Session) -> None:
        """The old home relays no more (or it is too late to wait): everything held goes."""
        if session.handoff is self:
            session.handoff = None
        for held in self.held.values():
            _deliver(session, [args for _, args in held])
        self.held.clear()

    def remember(self, msg: Message) -> None:
        """A message the session brought with it (queued or in flight at its old home)."""
        if msg.fwd_id is not None:
            self.seen.add(msg.fwd_id)


def _publisher(msg: Message, fid: tuple[str, int]) -> tuple[tuple[str, str], int]:
    order = msg.order
    if order is not None:
        tick, _, client = order.partition(b" ")
        with contextlib.suppress(ValueError):
            return ("client", client.decode("utf-8", "replace")), int(tick, 16)
    return ("node", fid[0]), fid[1]


def _deliver(session: Session, items: list[DeliverArgs]) -> None:
    if not items:
        return
    h, session.handoff = session.handoff, None
    try:
        for args in items:
            session.deliver(*args, force=True)  # acknowledged already: past a full queue
    finally:
        if session.handoff is None:
            session.handoff = h
