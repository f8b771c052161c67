"""A session's state as bytes, for handing it from one node to another (takeover) and for the
registry entry in etcd (subscriptions, expiry and will, what a node needs to adopt a session
whose home died).

Times travel as remaining seconds, never as one node's monotonic clock.
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

from roost.broker.message import Message
from roost.broker.router import SessionSubscription
from roost.broker.session import AWAIT_ACK, AWAIT_COMP, Delivery, Session
from roost.store.sqlite import StoredDelivery, StoredSession, dump_props, load_props

if TYPE_CHECKING:
    from roost.broker.node import Broker


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def dump_message(msg: Message, now: float) -> list[Any]:
    left = None if msg.expires_at is None else max(0.0, msg.expires_at - now)
    out = [msg.topic, _b64(msg.payload), msg.qos, msg.retain, dump_props(msg.props), msg.sender,
           left]  # fmt: skip
    if msg.fwd_id is not None:  # its identity: the new home tells a relayed copy by it
        out.append(list(msg.fwd_id))
    return out


def load_message(data: list[Any], now: float) -> Message:
    topic, payload, qos, retain, props, sender, left, *ident = data
    msg = Message(topic, base64.b64decode(payload), qos, retain, load_props(props), sender, now)
    msg.expires_at = None if left is None else now + left
    if ident:
        msg.fwd_id = (str(ident[0][0]), int(ident[0][1]))
    return msg


def dump_subscriptions(session: Session) -> list[list[Any]]:
    return [[o.topic_filter, o.qos, o.no_local, o.rap, o.retain_handling, o.sub_id]
            for o in session.subscriptions.values()]  # fmt: skip


def restore_subscriptions(broker: Broker, session: Session, subs: list[list[Any]]) -> None:
    for f, qos, nl, rap, rh, sub_id in subs:
        broker.subscribe(SessionSubscription(session, f, qos, nl, rap, rh, sub_id))


def _delivery(d: Delivery, now: float) -> list[Any]:
    return [dump_message(d.msg, now), d.qos, d.retain, list(d.sub_ids), d.state]


def dump_session(session: Session, now: float) -> bytes:
    """Everything a session holds: subscriptions, inflight window with packet ids and QoS 2
    states, queue, QoS 2 ids awaiting PUBREL, expiry."""
    state = {
        "client_id": session.client_id,
        "expiry": session.expiry_interval,
        "subs": dump_subscriptions(session),
        "inflight": [[pid, *_delivery(d, now)] for pid, d in session.inflight.items()],
        "queue": [_delivery(d, now) for d in session.queue],
        "rel": list(session.awaiting_rel),
        "next_pid": session._next_pid,
    }
    return json.dumps(state, separators=(",", ":")).encode()


def load_session(broker: Broker, data: bytes) -> Session:
    """Rebuild a handed-over session on this node (not yet in ``broker.registry``); its
    subscriptions go into the local router, its deliveries into the local store if durable."""
    state = json.loads(data)
    now = broker.clock()
    session = broker.new_session(state["client_id"])
    session.expiry_interval = state["expiry"]
    durable = broker.durable if session.expiry_interval else None
    session.durable = durable
    restore_subscriptions(broker, session, state["subs"])

    def delivery(item: list[Any]) -> Delivery:
        m, qos, retain, sub_ids, dstate = item
        d = Delivery(load_message(m, now), qos, retain, tuple(sub_ids), None)
        d.state = AWAIT_COMP if dstate == AWAIT_COMP else AWAIT_ACK
        if durable is not None and qos:
            durable.add_delivery(session, d)
        return d

    for pid, *item in state["inflight"]:
        d = delivery(item)
        session.inflight[pid] = d
        if durable is not None and d.seq:
            durable.delivery_sent(session, d, pid)
    for item in state["queue"]:
        session.requeue(delivery(item))
    for pid in state["rel"]:
        session.awaiting_rel[pid] = now
        if durable is not None:
            durable.rel_add(session, pid)
    session._next_pid = state.get("next_pid", 1)
    return session


# ------------------------------------------------------------------------- registry entries


def registry_entry(
    node: str, session: Session | None, expiry: int, will: Message | None, will_delay: int,
    connected: bool, now: float,
) -> bytes:  # fmt: skip
    """``sessions/<client id>``: where the session lives and what adopting it needs."""
    entry: dict[str, Any] = {"node": node, "expiry": expiry, "connected": connected}
    if session is not None and expiry:
        entry["subs"] = dump_subscriptions(session)
    if will is not None:
        entry["will"] = dump_message(will, now)
        entry["will_delay"] = will_delay
    return json.dumps(entry, separators=(",", ":")).encode()


def parse_entry(value: bytes) -> dict[str, Any]:
    try:
        entry = json.loads(value)
    except ValueError:
        return {"node": ""}
    return entry if isinstance(entry, dict) else {"node": ""}


def stored_to_state(s: StoredSession, wall_now: float) -> bytes:
    """A session kept by a store core (SQLite rows) in the hand-over format of
    :func:`dump_session`, for :func:`load_session` on the node that takes it."""

    def msg(d: StoredDelivery) -> list[Any]:
        left = None if d.expires_at is None else max(0.0, d.expires_at - wall_now)
        out = [d.topic, _b64(d.payload), d.msg_qos, False, dump_props(d.props), d.sender, left]
        if d.fwd_id is not None:
            out.append(list(d.fwd_id))
        return out

    inflight, queue = [], []
    for d in s.deliveries:
        item = [msg(d), d.qos, d.retain, list(d.sub_ids), d.state]
        if d.packet_id is not None:
            inflight.append([d.packet_id, *item])
        else:
            queue.append(item)
    state = {"client_id": s.client_id, "expiry": s.expiry_interval, "subs": s.subscriptions,
             "inflight": inflight, "queue": queue, "rel": list(s.awaiting_rel)}  # fmt: skip
    return json.dumps(state, separators=(",", ":")).encode()
