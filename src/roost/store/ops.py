"""The store's operations: one small typed record per kind of change.

Each is a NamedTuple whose first field is its tag, so an operation is still the plain tuple
the store and the node links have always carried: the replication batches (cluster/
replication.py) JSON-encode it at C speed as the same array, and a node of the previous
version reads it unchanged. The tag's ``Literal`` type makes mypy check it where a record is
built; ``from_wire`` turns a decoded array back into its record.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeVar

T = TypeVar("T")


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


def _same(item: Any) -> Any:
    return item


def coalesce(
    items: list[T], op_of: Callable[[T], Any] = _same, messages: bool = False
) -> list[T]:
    """A batch without the writes a later operation of it undoes: a delivery added and
    acknowledged within the batch keeps only its ``DeliveryDone`` (which deletes whatever the
    store had under that key, so the result does not depend on what came before). With
    ``messages``, also the message rows that only such deliveries of the batch referred to:
    right where every delivery travels in the same batch as its message row (the local store
    and replication both make sure it does).
    ``op_of`` gives an item's operation (replication batches hold (client id, epoch, op))."""
    open_: dict[tuple[str, int], list[int]] = {}  # delivery key -> its add and sends, by index
    drop: set[int] = set()
    for i, item in enumerate(items):
        op = op_of(item)
        tag = op[0]
        if tag == "dlv":
            open_[(op[1], op[2])] = [i]
        elif tag == "dlv_pid":
            held = open_.get((op[1], op[2]))
            if held is not None:
                held.append(i)
        elif tag == "dlv_del":
            held = open_.pop((op[1], op[2]), None)
            if held is not None:
                drop.update(held)
    if not drop:
        return items
    if messages:
        refs: dict[int, int] = {}  # message id -> deliveries of the batch still written
        for i, item in enumerate(items):
            op = op_of(item)
            if op[0] == "dlv":
                refs[op[3]] = refs.get(op[3], 0) + (i not in drop)
        for i, item in enumerate(items):
            op = op_of(item)
            if op[0] == "msg" and refs.get(op[1]) == 0:
                drop.add(i)
    return [item for i, item in enumerate(items) if i not in drop]
