"""Incremental decoding of split and coalesced frames, and the maximum packet size."""

from __future__ import annotations

import gc
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_strategies import (
    VERSIONS,
    client_packets,
    examples,
    server_decoder,
    server_packets,
)

from roost.mqtt import (
    MQTT_3_1_1,
    MQTT_5,
    Connect,
    Decoder,
    MQTTError,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    encode,
)
from roost.mqtt.codec import PINGRESP_BYTES, encode_ack

FRAMING = settings(
    max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def feed_chunks(dec: Decoder, data: bytes, cuts: list[int]) -> list[Packet]:
    """Feed ``data`` split at the sorted offsets ``cuts``; collect every packet."""
    out: list[Packet] = []
    start = 0
    for cut in [*cuts, len(data)]:
        out += dec.feed(data[start:cut])
        start = cut
    return out


@st.composite
def client_streams(draw: st.DrawFn) -> tuple[int, list[Packet], bytes]:
    """A CONNECT followed by client packets, encoded back to back."""
    version = draw(st.sampled_from(VERSIONS))
    packets: list[Packet] = [Connect("me", version)]
    packets += draw(st.lists(client_packets(version), min_size=1, max_size=12))
    return version, packets, b"".join(encode(p, version) for p in packets)


@FRAMING
@given(stream=client_streams(), data=st.data())
def test_whole_bytewise_and_random_splits_agree(
    stream: tuple[int, list[Packet], bytes], data: st.DataObject
) -> None:
    version, packets, wire = stream
    whole = Decoder()
    assert whole.feed(wire) == packets  # all coalesced frames come out of one chunk
    assert whole.version == version
    assert whole.buffered == 0

    bytewise = Decoder()
    assert feed_chunks(bytewise, wire, list(range(1, len(wire)))) == packets
    assert bytewise.buffered == 0

    cuts = sorted(data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=20)))
    split = Decoder()
    assert feed_chunks(split, wire, cuts) == packets
    assert split.buffered == 0


@FRAMING
@given(version=st.sampled_from(VERSIONS), data=st.data())
def test_client_side_splits(version: int, data: st.DataObject) -> None:
    packets = data.draw(st.lists(server_packets(version), min_size=1, max_size=12))
    wire = b"".join(encode(p, version) for p in packets)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(wire) - 1)), max_size=20)))
    dec = Decoder(version=version, server_side=False)
    assert feed_chunks(dec, wire, [c for c in cuts if c < len(wire)]) == packets
    assert dec.buffered == 0


def test_partial_frame_is_held_until_complete() -> None:
    dec = server_decoder(MQTT_3_1_1)
    frame = encode(Publish("a/b", b"hello", 1, packet_id=5), MQTT_3_1_1)
    for i in range(1, len(frame)):
        assert dec.feed(frame[i - 1 : i]) == []
        assert dec.buffered == i
    assert dec.feed(frame[-1:]) == [Publish("a/b", b"hello", 1, packet_id=5)]
    assert dec.buffered == 0


def test_many_coalesced_frames_with_a_split_tail() -> None:
    dec = server_decoder(MQTT_5)
    pubs = [Publish(f"t/{i}", bytes([i % 256]) * (i % 300), 0) for i in range(1000)]
    wire = b"".join(encode(p, MQTT_5) for p in pubs) + encode(Pingreq(), MQTT_5)
    first = dec.feed(wire[:-1])
    assert first == pubs
    assert dec.buffered == 1
    assert dec.feed(wire[-1:]) == [Pingreq()]
    assert dec.buffered == 0


def test_empty_feed_is_harmless() -> None:
    dec = server_decoder(MQTT_5)
    assert dec.feed(b"") == []
    assert dec.feed(b"\xc0") == []
    assert dec.feed(b"") == []
    assert dec.feed(b"\x00") == [Pingreq()]


# ---------------------------------------------------------------------- maximum packet size

LIMIT = 1000


def _header(remaining: int) -> bytes:
    out = bytearray([0x30])
    while True:
        byte, remaining = remaining & 0x7F, remaining >> 7
        out.append(byte | (0x80 if remaining else 0))
        if not remaining:
            return bytes(out)


@pytest.mark.parametrize("remaining", [LIMIT - 1, LIMIT * 10, 268_435_455])
def test_oversize_frame_rejected_from_its_header_alone(remaining: int) -> None:
    dec = server_decoder(MQTT_5, max_packet_size=LIMIT)
    header = _header(remaining)
    # Only the header is fed: the error comes before any of the body exists.
    with pytest.raises(MQTTError) as err:
        dec.feed(header)
    assert err.value.reason_code == 0x95
    assert dec.buffered <= len(header)


def test_oversize_header_split_across_reads_rejected_when_complete() -> None:
    dec = server_decoder(MQTT_5, max_packet_size=LIMIT)
    header = _header(2_000_000)  # 0x30 + 3 length bytes
    for i in range(len(header) - 1):
        assert dec.feed(header[i : i + 1]) == []
    with pytest.raises(MQTTError) as err:
        dec.feed(header[-1:])
    assert err.value.reason_code == 0x95
    assert dec.buffered <= len(header)


def test_oversize_frame_in_one_chunk_is_not_kept() -> None:
    """The body of a refused frame must not end up buffered past the limit."""
    dec = server_decoder(MQTT_5, max_packet_size=LIMIT)
    body = b"\x00\x01t\x00" + b"x" * (3 * LIMIT)
    with pytest.raises(MQTTError) as err:
        dec.feed(_header(len(body)) + body)
    assert err.value.reason_code == 0x95
    assert dec.buffered <= LIMIT


def test_oversize_after_buffered_data_is_not_kept() -> None:
    dec = server_decoder(MQTT_5, max_packet_size=LIMIT)
    assert dec.feed(b"\xc0") == []  # half a PINGREQ already buffered
    body = b"\x00\x01t\x00" + b"x" * (3 * LIMIT)
    with pytest.raises(MQTTError) as err:
        dec.feed(b"\x00" + _header(len(body)) + body)
    assert err.value.reason_code == 0x95
    assert dec.buffered <= LIMIT


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_frame_of_exactly_the_limit_is_accepted(version: int) -> None:
    """The limit counts the whole frame: fixed header, remaining length and body."""
    overhead = len(encode(Publish("t"), version))
    exact = Publish("t", b"p" * (LIMIT - overhead - 1))  # the remaining length grows one byte
    wire = encode(exact, version)
    assert len(wire) == LIMIT
    assert server_decoder(version, LIMIT).feed(wire) == [exact]

    over = encode(Publish("t", exact.payload + b"p"), version)
    assert len(over) == LIMIT + 1
    dec = server_decoder(version, LIMIT)
    with pytest.raises(MQTTError) as err:
        dec.feed(over[:5])
    assert err.value.reason_code == 0x95


def test_connect_is_subject_to_the_limit() -> None:
    dec = Decoder(max_packet_size=64)
    wire = encode(Connect("x" * 100, MQTT_5), MQTT_5)
    with pytest.raises(MQTTError) as err:
        dec.feed(wire[:3])
    assert err.value.reason_code == 0x95


# ------------------------------------------------------------------------- linear framing


def _decode_time(frame: bytes, count: int) -> float:
    dec = server_decoder(MQTT_5)
    chunk = frame * count
    gc.disable()  # a collection over the many new packets would skew one timing
    try:
        start = time.perf_counter()
        assert len(dec.feed(chunk)) == count
        return time.perf_counter() - start
    finally:
        gc.enable()


def test_one_big_chunk_decodes_in_linear_time() -> None:
    """Frames with properties cost no more per frame in a big chunk than in a small one.

    Splitting must not copy the rest of the chunk per frame (quadratic in the chunk size).
    """
    frame = encode(Publish("t", b"", 0, properties={"message_expiry_interval": 1}), MQTT_5)
    small, big = 5_000, 160_000  # a per-frame copy of the chunk makes big ~12x slower
    per_frame_small = min(_decode_time(frame, small) for _ in range(3)) / small
    per_frame_big = _decode_time(frame, big) / big
    assert per_frame_big < 4 * per_frame_small, (per_frame_small, per_frame_big)


@pytest.mark.parametrize("cls", [Puback, Pubrec, Pubrel, Pubcomp])
@pytest.mark.parametrize("pid", [1, 0x1234, 0xFFFF])
@pytest.mark.parametrize("code", [0, 0x10, 0x80, 0x92])
def test_encode_ack_is_the_generic_encoding(cls: type, pid: int, code: int) -> None:
    """The broker's hand-fast acks are byte for byte what ``encode`` makes (MQTT 5; a 3.1.1
    ack is the code-0 one)."""
    assert encode_ack(cls.type, pid, code) == encode(cls(pid, code), MQTT_5)
    assert encode_ack(cls.type, pid) == encode(cls(pid), MQTT_3_1_1)


def test_pingresp_bytes() -> None:
    assert PINGRESP_BYTES == encode(Pingresp(), MQTT_5) == encode(Pingresp(), MQTT_3_1_1)
