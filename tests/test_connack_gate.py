"""Which CONNACKs wait for a store commit: a new persistent session's does (once), a resumed
one's does not (its state is already durable), and acks that promise storage still wait.

In process, with the real channel, broker, durable layer and persister in front of a store
whose commits block until the test lets them through: a commit that takes as long as the
store wants, deterministic where fsync timing under load would not be.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from roost.broker.channel import Channel
from roost.broker.durable import Durable
from roost.broker.node import Broker
from roost.config import Config
from roost.mqtt import Decoder, encode
from roost.mqtt.packets import MQTT_5, Connack, Connect, Disconnect, Puback, Publish
from roost.store.persister import Persister


class BlockingStore:
    """Commits wait on ``open``; ``writes`` counts the finished ones."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.writes = 0

    def write(self, ops: list[tuple[Any, ...]]) -> None:
        self.open.wait(10)
        self.writes += 1

    def close(self) -> None:
        pass


class Wire:
    def __init__(self) -> None:
        self.decoder = Decoder(version=MQTT_5, server_side=False)
        self.packets: list[Any] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.packets.extend(self.decoder.feed(data))

    def close(self) -> None:
        self.closed = True


async def _settle(turns: float = 0.2) -> None:
    await asyncio.sleep(turns)


async def _scenario() -> None:
    broker = Broker(Config())
    store = BlockingStore()
    persister = Persister(store, "sync")
    broker.durable = Durable(persister, broker.clock)
    broker.commits.add(persister)
    expiry = {"session_expiry_interval": 600}

    # A new persistent session: its CONNACK promises the session is stored, so it waits.
    store.open.clear()
    w1 = Wire()
    ch1 = Channel(broker, w1, "127.0.0.1:1000", "tcp:default")
    ch1.data_received(encode(Connect("gated", MQTT_5, properties=expiry), MQTT_5))
    await _settle()
    assert w1.packets == [], "a new persistent session was acknowledged before it was stored"
    store.open.set()
    await _settle()
    assert isinstance(w1.packets[0], Connack) and not w1.packets[0].session_present
    ch1.data_received(encode(Disconnect(), MQTT_5))
    ch1.connection_lost()

    # The store is stuck in a slow commit: resuming the stored session does not wait for it.
    store.open.clear()
    w2 = Wire()
    ch2 = Channel(broker, w2, "127.0.0.1:1001", "tcp:default")
    ch2.data_received(encode(Connect("gated", MQTT_5, False, properties=expiry), MQTT_5))
    await _settle()
    assert w2.packets, "the resumed session's CONNACK waited for a store commit"
    ack = w2.packets[0]
    assert isinstance(ack, Connack) and ack.reason_code == 0 and ack.session_present
    # What promises storage still waits: a retained QoS 1 message's PUBACK.
    ch2.data_received(encode(Publish("gate/r", b"x", 1, True, packet_id=7), MQTT_5))
    await _settle()
    assert not any(isinstance(p, Puback) for p in w2.packets)
    store.open.set()
    await _settle()
    assert [p.packet_id for p in w2.packets if isinstance(p, Puback)] == [7]
    await persister.drain()
    persister.close()


def test_resumed_session_connack_is_not_gated_on_a_commit():
    asyncio.run(_scenario())


def test_a_session_the_cluster_cannot_open_is_refused_with_a_connack() -> None:
    """The cluster's session registry is unavailable: the client gets CONNACK "server
    unavailable" (0x88; 3 on MQTT 3.1.1), which tells it to retry, not a bare close."""
    from roost.mqtt import reason_codes as RC
    from roost.mqtt.packets import MQTT_3_1_1

    for version, code in ((MQTT_5, 0x88), (MQTT_3_1_1, 3)):
        broker = Broker(Config())
        broker.open_session = lambda ch, *_: ch.refuse(  # type: ignore[method-assign]
            RC.SERVER_UNAVAILABLE, "session registry unavailable"
        )
        w = Wire()
        w.decoder = Decoder(version=version, server_side=False)
        ch = Channel(broker, w, "127.0.0.1:1002", "tcp:default")
        ch.data_received(encode(Connect("unopened", version), version))
        assert len(w.packets) == 1 and w.closed, w.packets
        ack = w.packets[0]
        assert isinstance(ack, Connack) and ack.reason_code == code and not ack.session_present
        if version == MQTT_5:
            assert ack.properties == {"reason_string": "session registry unavailable"}
