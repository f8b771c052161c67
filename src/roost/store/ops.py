"""The store's operations: one small typed record per kind of change.

Each is a NamedTuple whose first field is its tag, so an operation is still the plain tuple
the store and the node links have always carried: the replication batches (cluster/
replication.py) JSON-encode it at C speed as the same array, and a node of the previous
version reads it unchanged. The tag's ``Literal`` type makes mypy check it where a record is
built; ``from_wire`` turns a decoded array back into its record.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple


class MessageRow(NamedTuple):
    """A message some session's queue holds (kept once, shared by its deliveries)."""

    tag: Literal["msg"]
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: str | None  # JSON (store.sqlite.dump_props)
    sender: str
    expires_at: float | None  # wall clock
    fwd: str | None = None  # "<id> <origin node>" (store.sqlite.dump_fwd); older nodes: absent


class DeliveryAdd(NamedTuple):
    """A message queued for one session, at its place ``seq`` in the session's order."""

    tag: Literal["dlv"]
    client_id: str
    seq: int
    message_id: int
    qos: int
    retain: bool
    sub_ids: str  # JSON list


class DeliverySent(NamedTuple):
    """A delivery went out under ``packet_id``; ``state`` 1: PUBREL sent, awaiting PUBCOMP."""

    tag: Literal["dlv_pid"]
    client_id: str
    seq: int
    packet_id: int
    state: int


class DeliveryDone(NamedTuple):
    """A delivery was acknowledged (or dropped): it leaves the session."""

    tag: Literal["dlv_del"]
    client_id: str
    seq: int


class SessionRow(NamedTuple):
    """A persistent session's row: expiry, subscriptions, will, when it disconnected."""

    tag: Literal["sess"]
    client_id: str
    expiry_interval: int
    subscriptions: str  # JSON list of [filter, qos, no_local, rap, rh, sub_id]
    will: str | None  # JSON [topic, payload hex, qos, retain, props, delay]
    disconnected_at: float | None  # wall clock; None while connected


class SessionGone(NamedTuple):
    """A session ended: it goes with its deliveries and QoS 2 receive state."""

    tag: Literal["sess_del"]
    client_id: str


class RelAdd(NamedTuple):
    """A QoS 2 message received under ``packet_id``, its PUBREL not yet seen."""

    tag: Literal["rel_add"]
    client_id: str
    packet_id: int


class RelDone(NamedTuple):
    tag: Literal["rel_del"]
    client_id: str
    packet_id: int


class RetainedSet(NamedTuple):
    tag: Literal["ret_set"]
    topic: str
    payload: bytes
    qos: int
    props: str | None
    sender: str
    expires_at: float | None


class RetainedGone(NamedTuple):
    tag: Literal["ret_del"]
    topic: str


class Collect(NamedTuple):
    """Drop the messages no delivery refers to any more."""

    tag: Literal["gc"]


Op = (
    MessageRow | DeliveryAdd | DeliverySent | DeliveryDone | SessionRow | SessionGone
    | RelAdd | RelDone | RetainedSet | RetainedGone | Collect
)  # fmt: skip

#: Tag -> record class (each record's ``tag`` field holds the same string).
KINDS: dict[str, type[Any]] = {
    "msg": MessageRow, "dlv": DeliveryAdd, "dlv_pid": DeliverySent, "dlv_del": DeliveryDone,
    "sess": SessionRow, "sess_del": SessionGone, "rel_add": RelAdd, "rel_del": RelDone,
    "ret_set": RetainedSet, "ret_del": RetainedGone, "gc": Collect,
}  # fmt: skip


_RECORDS = frozenset(KINDS.values())


def from_wire(op: tuple[Any, ...] | list[Any]) -> Op:
    """The record of an operation as it comes off the wire or out of an older node: extra
    trailing fields (a newer node's) are dropped, missing optional ones take their default."""
    if type(op) in _RECORDS:
        return op  # type: ignore[return-value]  # one of Op's classes, checked just above
    cls = KINDS.get(op[0])
    if cls is None:
        raise ValueError(f"unknown store operation {op[0]!r}")
    n = len(cls._fields)
    record: Op = cls._make(op[:n]) if len(op) >= n else cls(*op)
    return record
