"""What the broker persists, as store operations; and how it comes back after a restart.

Persistent sessions (expiry > 0) write their subscriptions, will, undelivered QoS 1/2 messages
and QoS 2 receive state; retained messages are always written. Times go to the store as
wall-clock seconds and come back as the broker's monotonic clock.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from roost.broker.message import Message
from roost.broker.router import SessionSubscription
from roost.broker.session import AWAIT_COMP, Delivery, Session
from roost.store.ops import (
    DeliveryAdd,
    DeliveryDone,
    DeliverySent,
    MessageRow,
    Op,
    RelAdd,
    RelDone,
    RetainedGone,
    RetainedSet,
    SessionGone,
    SessionRow,
)
from roost.store.sqlite import StoredDelivery, StoredState, dump_fwd, dump_props, load_props

if TYPE_CHECKING:
    from roost.store.persister import Persister
    from roost.store.sqlite import SqliteStore

log = logging.getLogger("roost.store")


@dataclass
class RestoredSession:
    """A session read back from the store, not yet installed on the broker."""

    session: Session
    subscriptions: list[SessionSubscription]
    expires_in: float  # seconds from now
    will: Message | None
    will_delay: float


@dataclass
class Restored:
    sessions: list[RestoredSession]
    retained: list[Message]


class Durable:
    def __init__(
        self,
        persister: Persister,
        clock: Callable[[], float],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.persister = persister
        self.clock = clock
        self.wall = wall
        self._next_mid = 1
        #: Set by the cluster layer: also called with every session operation (client id, op)
        #: so that the session's store cores on other nodes apply it too.
        self.replicate: Callable[[str, Op, bool], None] | None = None

    def _op(self, client_id: str, op: Op, gate: bool = True) -> None:
        self.persister.op(op, gate)
        if self.replicate is not None:
            self.replicate(client_id, op, gate)

    def new_mid_space(self, base: int) -> None:
        """Draw message ids from ``base`` on (unless already past it): a cluster node starts
        each run in a random space, so ids never repeat in the replicas other nodes keep."""
        self._next_mid = max(self._next_mid, base)

    def after(self, callback: Callable[[], None]) -> None:
        self.persister.after(callback)

    def _wall(self, mono: float | None) -> float | None:
        return None if mono is None else self.wall() + (mono - self.clock())

    def _mono(self, wall: float | None) -> float | None:
        return None if wall is None else self.clock() + (wall - self.wall())

    # --------------------------------------------------------------------------- sessions

    def save_session(
        self,
        session: Session,
        will: Message | None,
        will_delay: int,
        connected: bool,
        gate: bool = True,
    ) -> None:
        """Write the session's row; ``gate=False`` when no reply need wait for it (a resumed
        session, already in the store: its CONNACK promises nothing new)."""
        self._op(session.client_id, self._session_op(session, will, will_delay, connected), gate)

    def _session_op(
        self, session: Session, will: Message | None, will_delay: int, connected: bool
    ) -> SessionRow:
        subs = [
            [o.topic_filter, o.qos, o.no_local, o.rap, o.retain_handling, o.sub_id]
            for o in session.subscriptions.values()
        ]
        will_json = None
        if will is not None:
            will_json = json.dumps([will.topic, will.payload.hex(), will.qos, will.retain,
                                    dump_props(will.props), will_delay])  # fmt: skip
        return SessionRow("sess", session.client_id, session.expiry_interval, json.dumps(subs),
                          will_json, None if connected else self.wall())  # fmt: skip

    def _message_op(self, msg: Message) -> MessageRow:
        return MessageRow("msg", msg.mid, msg.topic, msg.payload, msg.qos, msg.retain,
                          dump_props(msg.props), msg.sender, self._wall(msg.expires_at),
                          dump_fwd(msg.fwd_id))  # fmt: skip

    @staticmethod
    def _delivery_op(cid: str, d: Delivery) -> DeliveryAdd:
        return DeliveryAdd("dlv", cid, d.seq, d.msg.mid, d.qos, d.retain, json.dumps(d.sub_ids))

    def session_ops(self, session: Session) -> list[Op]:
        """The whole stored state of a session as operations (for a new replica)."""
        cid = session.client_id
        ops: list[Op] = [SessionGone("sess_del", cid),
                         self._session_op(session, None, 0, session.connected)]  # fmt: skip
        for pid, d in session.inflight.items():
            if d.seq:
                ops += [self._message_op(d.msg), self._delivery_op(cid, d),
                        DeliverySent("dlv_pid", cid, d.seq, pid, d.state)]  # fmt: skip
        for d in session.queue:
            if d.seq:
                ops += [self._message_op(d.msg), self._delivery_op(cid, d)]
        ops += [RelAdd("rel_add", cid, pid) for pid in session.awaiting_rel]
        return ops

    def spilled_ops(self, session: Session, done: Callable[[list[Op]], None]) -> None:
        """The spilled part of a session's queue as operations (for a new replica, after
        ``session_ops``), read from the store; the caller holds the session's refills."""
        cid = session.client_id

        def ops(got: list[Delivery]) -> None:
            out: list[Op] = []
            for d in got:
                out += [self._message_op(d.msg), self._delivery_op(cid, d)]
            done(out)

        self.read_spilled(session, session.spilled_after(), 0, ops)

    def delete_session(self, client_id: str) -> None:
        self._op(client_id, SessionGone("sess_del", client_id))

    # ------------------------------------------------------------------------- deliveries

    def add_delivery(self, session: Session, d: Delivery) -> None:
        msg = d.msg
        if not msg.mid:
            msg.mid = self._next_mid
            self._next_mid += 1
        # Every batch that adds a delivery also writes its message's row: the store deletes a
        # message with its last delivery, so a row written by an earlier batch may be gone (a
        # retained message held again, a fan-out spread over several batches).
        local = not self.persister.holds_message(msg.mid)
        if local or self.replicate is not None:
            # Every session's store cores need the message, not only the first session's.
            op = self._message_op(msg)
            if local:
                self.persister.op(op)
            if self.replicate is not None:
                self.replicate(session.client_id, op, True)
        session.seq += 1
        d.seq = session.seq
        cid = session.client_id
        self._op(cid, self._delivery_op(cid, d))

    def delivery_sent(self, session: Session, d: Delivery, pid: int) -> None:
        self._op(session.client_id, DeliverySent("dlv_pid", session.client_id, d.seq, pid, d.state))

    def delivery_done(self, session: Session, d: Delivery) -> None:
        self._op(session.client_id, DeliveryDone("dlv_del", session.client_id, d.seq))

    def rel_add(self, session: Session, pid: int) -> None:
        self._op(session.client_id, RelAdd("rel_add", session.client_id, pid))

    def rel_del(self, session: Session, pid: int) -> None:
        self._op(session.client_id, RelDone("rel_del", session.client_id, pid))

    # ------------------------------------------------------------------- disk-backed queue

    def read_spilled(
        self, session: Session, after_seq: int, limit: int, done: Callable[[list[Delivery]], None]
    ) -> None:
        """Read back up to ``limit`` (0: all) of the session's deliveries only in the store
        (past ``after_seq``), oldest first, once what was submitted before is written."""
        store: SqliteStore = self.persister.store  # type: ignore[assignment]
        cid = session.client_id

        def deliveries(rows: list[StoredDelivery]) -> None:
            messages: dict[int, Message] = {}
            done([self._delivery(sd, messages) for sd in rows])

        self.persister.read(lambda: store.load_spilled(cid, after_seq, limit), deliveries)

    async def unspill(self, session: Session) -> None:
        """Bring the whole queue into memory and keep it there (``pinned``): the session is
        about to be serialized for another node. ``session.pinned = False`` undoes it."""
        session.pinned = True
        while session.spilled and session.durable is self:
            got: asyncio.Future[list[Delivery]] = asyncio.get_running_loop().create_future()
            self.read_spilled(session, session.spilled_after(), 0, got.set_result)
            session.take_spilled(await got, everything=True)

    # --------------------------------------------------------------------------- retained

    def retained_set(self, msg: Message) -> None:
        op = RetainedSet("ret_set", msg.topic, msg.payload, msg.qos, dump_props(msg.props),
                         msg.sender, self._wall(msg.expires_at))  # fmt: skip
        self.persister.op(op)

    def retained_delete(self, topic: str) -> None:
        self.persister.op(RetainedGone("ret_del", topic))

    # ---------------------------------------------------------------------------- restore

    def _message(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        props: dict[str, Any] | None,
        sender: str,
        expires_wall: float | None,
    ) -> Message:
        msg = Message(topic, payload, qos, retain, props, sender, self.clock())
        msg.expires_at = self._mono(expires_wall)
        return msg

    def _delivery(self, sd: StoredDelivery, messages: dict[int, Message]) -> Delivery:
        """A delivery read back from the store; ``messages`` shares one Message per id."""
        msg = messages.get(sd.message_id)
        if msg is None:
            msg = messages[sd.message_id] = self._message(
                sd.topic, sd.payload, sd.msg_qos, False, sd.props, sd.sender, sd.expires_at
            )
            msg.mid = sd.message_id
            msg.fwd_id = sd.fwd_id
        d = Delivery(msg, sd.qos, sd.retain, sd.sub_ids, None)
        d.seq = sd.seq
        return d

    def rebuild(self, state: StoredState, new_session: Callable[[str], Session]) -> Restored:
        """The offline sessions (queues, inflight, QoS 2 state, wills) and retained messages
        of what the store read back, for the broker to install; what expired meanwhile is
        deleted from the store instead."""
        now_wall = self.wall()
        self._next_mid = state.max_message_id + 1
        out = Restored([], [])
        for r in state.retained:
            if r.expires_at is not None and r.expires_at <= now_wall:
                self.retained_delete(r.topic)
                continue
            out.retained.append(
                self._message(r.topic, r.payload, r.qos, True, r.props, r.sender, r.expires_at)
            )
        for s in state.sessions:
            # A session connected when the node stopped counts as disconnected from now.
            since = s.disconnected_at if s.disconnected_at is not None else now_wall
            left = since + s.expiry_interval - now_wall
            if left <= 0:
                self.delete_session(s.client_id)
                continue
            session = new_session(s.client_id)
            session.expiry_interval = s.expiry_interval
            session.durable = self
            subs = [SessionSubscription(session, f, qos, nl, rap, rh, sub_id)
                    for f, qos, nl, rap, rh, sub_id in s.subscriptions]  # fmt: skip
            messages: dict[int, Message] = {}
            for sd in s.deliveries:
                d = self._delivery(sd, messages)
                if sd.packet_id is not None and sd.packet_id not in session.inflight:
                    d.state = AWAIT_COMP if sd.state else 0
                    session.inflight[sd.packet_id] = d
                else:
                    session.requeue(d)
                session.seq = max(session.seq, sd.seq)
            if s.spilled:  # the rest of its queue stays in the store until there is room
                session.restore_spilled(s.spilled, s.spilled_bytes, s.spill_after)
                session.seq = max(session.seq, s.max_seq)
            session.trim()
            for pid in s.awaiting_rel:
                session.awaiting_rel[pid] = self.clock()
            will, will_delay = None, 0.0
            if s.will is not None:
                topic, payload_hex, qos, retain, props_json, delay = s.will
                will = self._message(topic, bytes.fromhex(payload_hex), qos, retain,
                                     load_props(props_json), s.client_id, None)  # fmt: skip
                # The connection was lost with the node: the will is due as after any drop.
                will_delay = min(delay, left)
            out.sessions.append(RestoredSession(session, subs, left, will, will_delay))
        return out
