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
        "dropped_expired",
        "dropped_no_subscribers",
        "dropped_qos0_offline",
        "dropped_queue_full",
        "dropped_too_large",
        "messages_received",
        "messages_sent",
        "publish_denied",
        "publish_rate_exceeded",
        "subscribe_denied",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}
