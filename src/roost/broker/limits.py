"""Node-wide and per-client limits: connections per node, connect rate per listener, and the
publish message and byte rates of each client.

Rates are token buckets. A request costing more than the whole burst (one huge message
against a byte rate) passes when the bucket is full and leaves it in debt, so it is possible
after a quiet spell and the long-run rate still holds.

Over a publish rate the client is disconnected with Quota exceeded (0x97) on MQTT 5 (closed on
3.1.1), not answered PUBACK 0x97: the disconnect is the one signal every QoS gets (QoS 0 has no
ack, 3.1.1 no negative ack), nothing beyond the limit is ever acknowledged, and the abuser's
load stops at once; a client within its rate plus one burst never sees it.

The connect rate is checked at CONNECT, before any password work, and refused with CONNACK
Connection rate exceeded (0x9F; Server unavailable on 3.1.1) so a client learns why and backs off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from roost.mqtt import reason_codes as RC

if TYPE_CHECKING:
    from roost.broker.stats import Stats
    from roost.config import Listeners, MqttSettings, NodeSettings


class TokenBucket:
    __slots__ = ("burst", "clock", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self.clock = clock
        self.last = clock()

    def take(self, cost: float = 1.0) -> bool:
        now = self.clock()
        tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        # A cost above the whole burst passes only from a full bucket (and leaves it in debt).
        if tokens < min(cost, self.burst):
            self.tokens = tokens
            return False
        self.tokens = tokens - cost
        return True


class PublishLimiter:
    """One client's PUBLISH message and byte rates."""

    __slots__ = ("bytes", "messages")

    def __init__(
        self, msg_rate: float, byte_rate: float, burst_s: float, clock: Callable[[], float]
    ) -> None:
        self.messages = TokenBucket(msg_rate, msg_rate * burst_s, clock) if msg_rate else None
        self.bytes = TokenBucket(byte_rate, byte_rate * burst_s, clock) if byte_rate else None

    def allow(self, size: int) -> bool:
        if self.messages is not None and not self.messages.take():
            return False
        return self.bytes is None or self.bytes.take(size)


class Limits:
    """The node's limits. The ``node``, ``listeners`` and ``mqtt`` callables return the config
    sections in force (hot config replaces them); ``open_connections`` counts the node's live
    channels; refusals are counted in ``stats``."""

    def __init__(
        self,
        node: Callable[[], NodeSettings],
        listeners: Callable[[], Listeners],
        mqtt: Callable[[], MqttSettings],
        stats: Stats,
        open_connections: Callable[[], int],
        clock: Callable[[], float],
    ) -> None:
        self._node = node
        self._listeners = listeners
        self._mqtt = mqtt
        self._stats = stats
        self._open_connections = open_connections
        self._clock = clock
        self._conn_buckets: dict[str, TokenBucket] = {}

    def admit_socket(self) -> bool:
        """May one more connection be open on this node (``node.max_connections``)?"""
        limit = self._node().max_connections
        if limit and self._open_connections() >= limit:
            self._stats.connections_refused += 1
            return False
        return True

    def connect_refusal(self, listener: str) -> tuple[int, str] | None:
        """A CONNECT on ``listener`` ("kind:name") over its ``max_conn_rate``: the refusal."""
        kind, _, name = listener.partition(":")
        lst = getattr(self._listeners(), kind, {}).get(name)
        rate = lst.max_conn_rate if lst is not None else 0
        if not rate:
            return None
        bucket = self._conn_buckets.get(listener)
        if bucket is None or bucket.rate != rate:
            bucket = self._conn_buckets[listener] = TokenBucket(rate, rate, self._clock)
        if bucket.take():
            return None
        self._stats.connect_rate_refused += 1
        return RC.CONNECTION_RATE_EXCEEDED, "connection rate exceeded"

    def publish_limiter(self) -> PublishLimiter | None:
        cfg = self._mqtt()
        if not cfg.max_publish_rate and not cfg.max_publish_bytes_rate:
            return None
        return PublishLimiter(
            cfg.max_publish_rate, cfg.max_publish_bytes_rate, cfg.publish_rate_burst,
            self._clock,
        )  # fmt: skip
