"""Forwards that were on their way to a node when it died, for the sessions it held.

A forward is acknowledged on the link only once its receiver (and the session's store cores)
stored it, and its publisher's PUBACK waits for that ack. When the receiver dies first, the
sender still has the forward: it replays it along the current routes, and sends a copy of it
to every live node, addressed to the dead node's sessions (group ``"\\x02" + dead``, plus
``"\\x00" + client id`` for a relay to one session). Its routes are of no use for those
sessions: they went with its lease, and the node that adopts a session re-adds them only later,
while other nodes may route the topic already (and drop a replay as a duplicate).

Each node holds the copies until it has adopted what it adopts of the dead node's sessions
("settled"), gives each copy to the sessions it holds that came from the dead node (adopted, or
fetched from a store core by a client that reconnected first) whose subscriptions match, and
only then acknowledges them. A session that arrives from the dead node later gets the held ones
too. Each session takes a message once: the ids it brought along (the store keeps them, so a
copy of what the dead node had stored and replicated is recognised) and those it was given.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from roost.broker.message import RecentIds
from roost.mqtt.topics import matches

if TYPE_CHECKING:
    from roost.broker.message import Message
    from roost.broker.session import Session

KEEP = 60.0  # seconds a dead node's copies stay for sessions that arrive from it late
WAIT = 15.0  # at most this long an acknowledgement waits for the adoption to settle
_SEEN = 100_000


class _Dead:
    __slots__ = ("msgs", "seen", "sessions", "settled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        #: (message, the one client it is for, or None: any matching session).
        self.msgs: list[tuple[Message, str | None]] = []
        self.settled: asyncio.Future[None] = loop.create_future()
        #: Client id -> the session here that came from the dead node.
        self.sessions: dict[str, Session] = {}
        self.seen: dict[str, RecentIds] = {}


class Orphans:
    def __init__(self) -> None:
        self._dead: dict[str, _Dead] = {}
        #: Set while a batch of link input carried a copy that must wait for settling.
        self.waiting = False

    def _of(self, dead: str) -> _Dead:
        d = self._dead.get(dead)
        if d is None:
            loop = asyncio.get_running_loop()
            d = self._dead[dead] = _Dead(loop)
            loop.call_later(KEEP, self._dead.pop, dead, None)
        return d

    def arrived(self, dead: str, msg: Message, client_id: str | None) -> None:
        """A copy of a forward the dead node never acknowledged."""
        d = self._of(dead)
        d.msgs.append((msg, client_id))
        if d.settled.done():
            for session in list(d.sessions.values()):
                self._give(d, session, [(msg, client_id)])
        else:
            self.waiting = True

    def session_from(self, dead: str, session: Session) -> None:
        """``session`` is here now, taken from the dead node's store cores."""
        d = self._of(dead)
        d.sessions[session.client_id] = session
        seen = d.seen[session.client_id] = RecentIds(_SEEN)
        for delivery in (*session.inflight.values(), *session.queue):
            if delivery.msg.fwd_id is not None:
                seen.add(delivery.msg.fwd_id)
        if d.settled.done():
            self._give(d, session, d.msgs)

    def settle(self, dead: str) -> None:
        """This node adopted what it adopts of the dead node's sessions: copies go now."""
        d = self._of(dead)
        if d.settled.done():
            return
        d.settled.set_result(None)
        for session in list(d.sessions.values()):
            self._give(d, session, d.msgs)

    def unsettled(self) -> list[asyncio.Future[None]]:
        return [d.settled for d in self._dead.values() if not d.settled.done()]

    def _give(self, d: _Dead, session: Session, items: list[tuple[Message, str | None]]) -> None:
        cid = session.client_id
        if d.sessions.get(cid) is not session:
            return  # it moved on (what it had went with it)
        seen = d.seen[cid]
        for msg, only in items:
            if only is not None and only != cid:
                continue
            fid = msg.fwd_id
            if fid is None or not seen.add(fid):
                continue
            best = None
            sub_ids: list[int] = []
            for f, opts in session.subscriptions.items():
                if opts.group is None and matches(f, msg.topic):
                    best = opts if best is None or opts.qos > best.qos else best
                    if opts.sub_id:
                        sub_ids.append(opts.sub_id)
            if best is None:
                continue
            session.deliver(msg, min(best.qos, msg.qos), msg.retain and best.rap,
                            tuple(sub_ids), None, True)  # fmt: skip
