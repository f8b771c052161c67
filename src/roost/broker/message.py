"""An application message inside the broker, with its wire encodings cached.

A PUBLISH fanned out to many subscribers is encoded once per wire variant (protocol family,
QoS, retain flag); only subscribers that need packet ids, subscription identifiers, topic
aliases or a shortened expiry get a packet of their own.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from typing import Any

from roost.mqtt.codec import encode_publish
from roost.mqtt.properties import encode_properties

_NO_PROPS = b"\x00"


class RecentIds:
    """The last ``cap`` ids seen (a set for lookup, a FIFO for eviction): duplicate detection
    over a bounded window."""

    __slots__ = ("cap", "ids", "order")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.ids: set[Hashable] = set()
        self.order: deque[Hashable] = deque()

    def add(self, key: Hashable) -> bool:
        """Remember ``key``; False if it was already there (a duplicate)."""
        ids = self.ids
        if key in ids:
            return False
        ids.add(key)
        order = self.order
        order.append(key)
        if len(order) > self.cap:
            ids.discard(order.popleft())
        return True


class Message:
    __slots__ = (
        "_props_wire",
        "_topic_wire",
        "_wire",
        "expires_at",
        "fwd_id",
        "mid",
        "order",
        "payload",
        "props",
        "qos",
        "retain",
        "sender",
        "timestamp",
        "topic",
    )

    def __init__(
        self,
        topic: str,
        payload: bytes,
        qos: int = 0,
        retain: bool = False,
        props: dict[str, Any] | None = None,
        sender: str = "",
        timestamp: float = 0.0,
    ) -> None:
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain
        self.props = props or None  # never holds topic_alias or subscription_identifier
        self.sender = sender
        self.timestamp = timestamp
        expiry = props.get("message_expiry_interval") if props else None
        self.expires_at = timestamp + expiry if expiry is not None else None
        self._topic_wire: bytes | None = None
        self._props_wire: bytes | None = None
        self._wire: dict[int, bytes] | None = None
        self.mid = 0  # id in the store, once a persistent session holds it
        #: (origin node, message id) in a cluster: the node it was published on names it once,
        #: so that its copies are recognized wherever they arrive.
        self.fwd_id: tuple[str, int] | None = None
        #: ``b"<tick hex> <publisher client id>"`` when a client published it in a cluster: a
        #: tick of the cluster's logical clock, which rises across the nodes a publisher moves
        #: between. Bytes as the link carries them; only a handoff parses them.
        self.order: bytes | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    @property
    def topic_wire(self) -> bytes:
        tw = self._topic_wire
        if tw is None:
            tw = self._topic_wire = self.topic.encode()
        return tw

    def props_wire(self, now: float, sub_ids: tuple[int, ...] = (), alias: int = 0) -> bytes:
        """MQTT 5 property block for one delivery (remaining expiry, subscription ids, alias)."""
        if not sub_ids and not alias and self.expires_at is None:
            pw = self._props_wire
            if pw is None:
                pw = self._props_wire = encode_properties(self.props) if self.props else _NO_PROPS
            return pw
        props = dict(self.props) if self.props else {}
        if self.expires_at is not None:
            props["message_expiry_interval"] = max(0, math.ceil(self.expires_at - now))
        if sub_ids:
            props["subscription_identifier"] = list(sub_ids)
        if alias:
            props["topic_alias"] = alias
        return encode_properties(props)

    def shared_wire(self, v5: bool, retain: bool) -> bytes:
        """QoS 0 bytes every plain subscriber of one variant shares (no ids, alias or expiry)."""
        key = (v5 << 1) | retain
        cache = self._wire
        if cache is None:
            cache = self._wire = {}
        else:
            data = cache.get(key)
            if data is not None:
                return data
        props = self.props_wire(0.0) if v5 else None
        data = cache[key] = encode_publish(
            self.topic_wire, self.payload, 0, retain, False, None, props
        )
        return data

    def __repr__(self) -> str:
        return (
            f"Message({self.topic!r}, {self.payload[:32]!r}, qos={self.qos}, retain={self.retain})"
        )
