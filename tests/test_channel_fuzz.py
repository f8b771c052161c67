"""Fuzz the broker channel in-process (it is sans-IO): no input may raise out of it or hurt others.

Random bytes and mutations of valid frames go to one channel after a valid CONNECT; each example
must end with that channel either alive or closed, never an exception escaping, and a bystander
channel on the same broker must still get its messages.
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roost.broker.channel import Channel
from roost.broker.node import Broker
from roost.config import Config
from roost.mqtt import (
    MQTT_5,
    Connect,
    Decoder,
    Disconnect,
    Publish,
    Pubrel,
    Subscribe,
    Subscription,
    Unsubscribe,
    encode,
)


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.closed:  # as real transports do, drop writes after close
            self.out += data

    def close(self) -> None:
        self.closed = True


VALID = [
    encode(Publish("a/b", b"x", 1, packet_id=1), MQTT_5),
    encode(Publish("a/b", b"y", 2, packet_id=2, properties={"topic_alias": 1}), MQTT_5),
    encode(Publish("", b"z", 0, properties={"topic_alias": 1}), MQTT_5),
    encode(Subscribe(3, [Subscription("a/#", 2, retain_handling=1)]), MQTT_5),
    encode(Subscribe(4, [Subscription("$share/g/a/+", 1)]), MQTT_5),
    encode(Unsubscribe(5, ["a/#"]), MQTT_5),
    encode(Pubrel(2), MQTT_5),
    b"\xc0\x00",
    encode(Disconnect(0x04), MQTT_5),
]


@st.composite
def chunks(draw: st.DrawFn) -> list[bytes]:
    frames = draw(st.lists(st.sampled_from(VALID) | st.binary(max_size=40), max_size=8))
    data = bytearray(b"".join(frames))
    for _ in range(draw(st.integers(0, 4))):
        if data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    out, prev = [], 0
    for c in [*cuts, len(data)]:
        out.append(bytes(data[prev:c]))
        prev = c
    return out


def _connect(broker: Broker, client_id: str) -> tuple[Channel, FakeTransport]:
    t = FakeTransport()
    ch = Channel(broker, t, "127.0.0.1:1", "tcp:default")
    ch.data_received(encode(Connect(client_id, MQTT_5, keepalive=0), MQTT_5))
    assert ch.connected
    return ch, t


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks())
def test_channel_survives_anything(data):
    async def run() -> None:
        broker = Broker(Config())
        watcher, wt = _connect(broker, "watcher")
        watcher.data_received(encode(Subscribe(1, [Subscription("a/#", 0)]), MQTT_5))
        victim, vt = _connect(broker, "victim")
        for chunk in data:
            victim.data_received(chunk)  # must not raise
            if vt.closed:
                victim.connection_lost()
                break
        broker.tick()
        # The bystander is untouched and still receives.
        other, _ = _connect(broker, "other")
        other.data_received(encode(Publish("a/ok", b"still here", 0), MQTT_5))
        got = Decoder(version=MQTT_5, server_side=False).feed(bytes(wt.out))
        assert watcher.connected and not wt.closed
        assert any(isinstance(p, Publish) and p.payload == b"still here" for p in got)
        assert victim.decoder.buffered <= broker.config.mqtt.max_packet_size

    asyncio.run(run())
