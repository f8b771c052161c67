"""A session that just moved to this node, while its old home still relays what reached it there.

The old home relays every message for the session until every node routes it here; some of those
also come here directly. Each message is delivered once, whichever way comes first (its
cluster-wide id is remembered), and each publisher's messages stay in order: one that came
directly waits until its relayed copy arrives, which shows that everything relayed before it
from the same publisher is here too (one link keeps its order), or until the old home says it
relays no more.
"""

from __future__ import annotations

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
        #: Per publishing node: (message id, deliver arguments) that came directly, in order.
        self.held: dict[str, deque[tuple[int, DeliverArgs]]] = {}

    def direct(self, msg: Message, args: DeliverArgs) -> None:
        fid = msg.fwd_id
        assert fid is not None
        if self.seen.add(fid):
            self.held.setdefault(fid[0], deque()).append((fid[1], args))

    def relayed(self, session: Session, msg: Message) -> None:
        fid = msg.fwd_id
        assert fid is not None
        if self.seen.add(fid):
            _deliver(session, [(msg, msg.qos, False, (), None)])
            return
        # Its direct copy is held: it and what came directly before it may go now.
        held = self.held.get(fid[0])
        ready = []
        while held and held[0][0] <= fid[1]:
            ready.append(held.popleft()[1])
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
