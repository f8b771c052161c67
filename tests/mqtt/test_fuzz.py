"""Fuzz: random and mutated frames raise nothing but MQTTError, never hang, never over-buffer."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_strategies import (
    VERSIONS,
    client_packets,
    examples,
    server_decoder,
    server_packets,
    time_limit,
)

from roost.mqtt import (
    MQTT_5,
    Connect,
    Decoder,
    MQTTError,
    Packet,
    Publish,
    Subscribe,
    Subscription,
    Will,
    encode,
)
from roost.mqtt.reason_codes import NAMES

FUZZ = settings(
    max_examples=examples(250),
    deadline=None,  # each example is bounded by time_limit() instead, which also stops a hang
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PER_EXAMPLE_SECONDS = 2.0


def feed_all(dec: Decoder, chunks: list[bytes]) -> tuple[list[Packet], MQTTError | None]:
    """Feed chunks until one raises; check the buffer bound after every call."""
    out: list[Packet] = []
    with time_limit(PER_EXAMPLE_SECONDS):
        for chunk in chunks:
            try:
                out += dec.feed(chunk)
            except MQTTError as err:
                assert err.reason_code in NAMES and err.reason_code >= 0x80, err.reason_code
                assert dec.buffered <= dec.max_packet_size
                return out, err
            assert dec.buffered <= dec.max_packet_size
    return out, None


def assert_reencodes(packets: list[Packet], version: int) -> None:
    """Whatever the decoder accepts, the encoder can write back and the decoder re-reads."""
    dec = server_decoder(version)
    for packet in packets:
        again = dec.feed(encode(packet, version))
        assert again == [packet]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@st.composite
def mutated(draw: st.DrawFn, version: int) -> bytes:
    """A valid stream of client packets with a few bit flips, truncations and insertions."""
    packets = draw(st.lists(client_packets(version), min_size=1, max_size=6))
    data = bytearray(b"".join(encode(p, version) for p in packets))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "byte"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif data:
            data[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF]))
    return bytes(data)


@FUZZ
@given(
    version=st.sampled_from(VERSIONS),
    limit=st.integers(32, 2048),
    data=st.binary(max_size=600),
    cuts=st.lists(st.integers(0, 600), max_size=10),
)
def test_random_bytes_after_connect(version: int, limit: int, data: bytes, cuts: list[int]) -> None:
    dec = server_decoder(version, max_packet_size=limit)
    packets, _ = feed_all(dec, chunked(data, cuts))
    assert_reencodes(packets, version)


@FUZZ
@given(version=st.sampled_from(VERSIONS), limit=st.integers(32, 2048), data=st.data())
def test_mutated_frames_after_connect(version: int, limit: int, data: st.DataObject) -> None:
    wire = data.draw(mutated(version))
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=10))
    dec = server_decoder(version, max_packet_size=limit)
    packets, _ = feed_all(dec, chunked(wire, cuts))
    assert_reencodes(packets, version)


@FUZZ
@given(data=st.binary(max_size=400), limit=st.integers(32, 2048))
def test_random_bytes_before_connect(data: bytes, limit: int) -> None:
    feed_all(Decoder(max_packet_size=limit), [data])


@FUZZ
@given(version=st.sampled_from(VERSIONS), data=st.data())
def test_mutated_connect(version: int, data: st.DataObject) -> None:
    will = Will("w/t", b"m", 1, True, {"will_delay_interval": 5} if version == MQTT_5 else {})
    props = {"session_expiry_interval": 10, "user_property": [("a", "b")]}
    connect = Connect(
        "client", version, username="u", password=b"p", will=will,
        properties=props if version == MQTT_5 else {},
    )  # fmt: skip
    wire = bytearray(encode(connect, version))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(wire) - 1))
        wire[at] = data.draw(st.integers(0, 255))
    feed_all(Decoder(max_packet_size=4096), [bytes(wire)])


@FUZZ
@given(version=st.sampled_from(VERSIONS), data=st.data())
def test_mutated_server_packets_on_a_client(version: int, data: st.DataObject) -> None:
    packets = data.draw(st.lists(server_packets(version), min_size=1, max_size=6))
    wire = bytearray(b"".join(encode(p, version) for p in packets))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(wire) - 1))
        wire[at] ^= 1 << data.draw(st.integers(0, 7))
    feed_all(Decoder(4096, version=version, server_side=False), [bytes(wire)])


# ------------------------------------------- exhaustive single-defect sweeps of a few frames

_SWEEP_FRAMES = [
    (MQTT_5, Publish("a/b", b"xyz", 2, True, False, 300, {"message_expiry_interval": 60,
                                                          "user_property": [("k", "v")],
                                                          "subscription_identifier": [200]})),
    (MQTT_5, Subscribe(9, [Subscription("s/+", 1, True, False, 1), Subscription("#", 2)],
                       {"subscription_identifier": [16384]})),
    (4, Subscribe(9, [Subscription("s/+", 1), Subscription("#", 2)])),
    (4, Publish("topic", b"payload", 1, packet_id=1)),
]  # fmt: skip


@pytest.mark.parametrize(("version", "packet"), _SWEEP_FRAMES)
def test_every_bit_flip_and_truncation(version: int, packet: Packet) -> None:
    wire = encode(packet, version)
    for i in range(len(wire)):
        for bit in range(8):
            bad = bytearray(wire)
            bad[i] ^= 1 << bit
            feed_all(server_decoder(version, 256), [bytes(bad)])
        dec = server_decoder(version, 256)
        packets, err = feed_all(dec, [wire[:i]])
        assert packets == [] and err is None  # a prefix is just incomplete
        assert dec.buffered == i
