"""Node-wide counters, plain ints bumped on the hot path (read by $SYS and metrics)."""

from __future__ import annotations


class Stats:
    __slots__ = (
        "auth_denied",
        "bytes_received",
        "bytes_sent",
        "connect_rate_refused",
        "connections_refused",
        "connections_total",
        "delivery_denied",
        "dropped_expired",
        "dropped_no_subscribers",
        "dropped_qos0_offline",
        "dropped_queue_full",
        "dropped_queue_full_qos0",
        "dropped_queue_refused",
        "dropped_too_large",
        "flapping_banned",
        "messages_received",
        "messages_sent",
        "publish_denied",
        "publish_rate_exceeded",
        "received_qos",
        "sent_qos",
        "subscribe_denied",
    )
    auth_denied: int
    bytes_received: int
    bytes_sent: int
    connect_rate_refused: int
    connections_refused: int
    connections_total: int
    delivery_denied: int
    dropped_expired: int
    dropped_no_subscribers: int
    dropped_qos0_offline: int
    dropped_queue_full: int  # QoS 1/2 dropped to make room (drop_oldest policy)
    dropped_queue_full_qos0: int  # QoS 0 dropped from a full queue (any policy)
    dropped_queue_refused: int  # deliveries a full queue refused (refuse policy)
    dropped_too_large: int
    flapping_banned: int
    messages_received: int
    messages_sent: int
    publish_denied: int
    publish_rate_exceeded: int
    received_qos: list[int]
    sent_qos: list[int]
    subscribe_denied: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        self.received_qos = [0, 0, 0]  # messages by QoS, indexed by QoS
        self.sent_qos = [0, 0, 0]

    def as_dict(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, list):
                prefix = "messages_received" if name == "received_qos" else "messages_sent"
                for qos, n in enumerate(value):
                    out[f"{prefix}_qos{qos}"] = n
            else:
                out[name] = value
        return out
