"""Malformed and forbidden input: each case raises MQTTError with its MQTT 5 reason code.

Every case is a pair: a valid frame that decodes, and the same frame with one defect. The valid
twin proves the error comes from that defect and not from a mistake in the test's bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from mqtt_strategies import server_decoder

from roost.mqtt import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    Connect,
    Decoder,
    MQTTError,
    Publish,
    encode,
)

MALFORMED = 0x81
PROTOCOL = 0x82
UNSUPPORTED = 0x84


def vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + vbi(len(body)) + body


def s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def props(raw: bytes) -> bytes:
    return vbi(len(raw)) + raw


def connect(
    *,
    name: bytes = b"MQTT",
    level: int = 4,
    flags: int = 0x02,
    properties: bytes = b"\x00",
    payload: bytes = s("cid"),
    first: int = 0x10,
) -> bytes:
    body = s(name) + bytes([level, flags]) + b"\x00\x3c"
    if level == 5:
        body += properties
    return frame(first, body + payload)


@dataclass
class Case:
    good: bytes
    bad: bytes
    code: int
    version: int | None = MQTT_3_1_1  # None: a fresh server decoder (no CONNECT yet)
    client_side: bool = False


def _pub5(properties: bytes, topic: bytes = s("t")) -> bytes:
    return frame(0x32, topic + b"\x00\x01" + props(properties) + b"payload")


CASES: dict[str, Case] = {
    # ----------------------------------------------------------------------- fixed header
    "remaining length of 5 bytes": Case(
        b"\x30\xff\x7f" + s("t") + b"x" * 16380, b"\x30\xff\xff\xff\xff\x01" + s("t"), MALFORMED
    ),
    "remaining length of 5 bytes in CONNECT": Case(
        connect(), b"\x10\x80\x80\x80\x80\x01", MALFORMED, version=None
    ),
    "reserved packet type 0": Case(b"\xc0\x00", b"\x00\x00", MALFORMED),
    "PUBACK flags": Case(frame(0x40, b"\x00\x01"), frame(0x41, b"\x00\x01"), MALFORMED),
    "PUBREC flags": Case(frame(0x50, b"\x00\x01"), frame(0x58, b"\x00\x01"), MALFORMED),
    "PUBREL flags": Case(frame(0x62, b"\x00\x01"), frame(0x60, b"\x00\x01"), MALFORMED),
    "PUBCOMP flags": Case(frame(0x70, b"\x00\x01"), frame(0x72, b"\x00\x01"), MALFORMED),
    "SUBSCRIBE flags": Case(
        frame(0x82, b"\x00\x01" + s("a") + b"\x00"),
        frame(0x80, b"\x00\x01" + s("a") + b"\x00"),
        MALFORMED,
    ),
    "UNSUBSCRIBE flags": Case(
        frame(0xA2, b"\x00\x01" + s("a")), frame(0xA3, b"\x00\x01" + s("a")), MALFORMED
    ),
    "PINGREQ flags": Case(b"\xc0\x00", b"\xc4\x00", MALFORMED),
    "DISCONNECT flags": Case(b"\xe0\x00", b"\xe1\x00", MALFORMED),
    "AUTH flags": Case(b"\xf0\x00", b"\xf2\x00", MALFORMED, version=MQTT_5),
    "CONNECT flags": Case(connect(), connect(first=0x12), MALFORMED, version=None),
    # --------------------------------------------------------------------------- PUBLISH
    "PUBLISH QoS 3": Case(
        frame(0x34, s("t") + b"\x00\x01"), frame(0x36, s("t") + b"\x00\x01"), MALFORMED
    ),
    "PUBLISH QoS 3 with DUP and retain": Case(
        frame(0x3D, s("t") + b"\x00\x01"), frame(0x3F, s("t") + b"\x00\x01"), MALFORMED
    ),
    "PUBLISH DUP at QoS 0": Case(frame(0x30, s("t") + b"x"), frame(0x38, s("t") + b"x"), MALFORMED),
    "PUBLISH packet id 0": Case(
        frame(0x32, s("t") + b"\x00\x01"), frame(0x32, s("t") + b"\x00\x00"), PROTOCOL
    ),
    "PUBLISH QoS 2 packet id 0": Case(
        frame(0x34, s("t") + b"\x01\x00"), frame(0x34, s("t") + b"\x00\x00"), PROTOCOL
    ),
    "PUBLISH topic invalid UTF-8": Case(
        frame(0x30, s(b"a\xc3\xa9")), frame(0x30, s(b"a\xc3\x28")), MALFORMED
    ),
    "PUBLISH topic UTF-16 surrogate": Case(
        frame(0x30, s(b"\xee\x80\x80")), frame(0x30, s(b"\xed\xa0\x80")), MALFORMED
    ),
    "PUBLISH topic overlong NUL": Case(
        frame(0x30, s(b"ab")), frame(0x30, s(b"a\xc0\x80")), MALFORMED
    ),
    "PUBLISH topic U+0000": Case(frame(0x30, s("a\x01b")), frame(0x30, s("a\x00b")), MALFORMED),
    "PUBLISH truncated packet id": Case(
        frame(0x32, s("t") + b"\x00\x01"), frame(0x32, s("t") + b"\x00"), MALFORMED
    ),
    "PUBLISH topic longer than the packet": Case(
        frame(0x30, b"\x00\x03abc"), frame(0x30, b"\x00\x04abc"), MALFORMED
    ),
    "PUBLISH v5 without a property length": Case(
        frame(0x30, s("t") + b"\x00"), frame(0x30, s("t")), MALFORMED, version=MQTT_5
    ),
    # ---------------------------------------------------------------------------- CONNECT
    "bad protocol name": Case(connect(), connect(name=b"MQTX"), PROTOCOL, version=None),
    "bad protocol name for 3.1": Case(
        connect(name=b"MQIsdp", level=3), connect(name=b"MQIsdq", level=3), PROTOCOL, version=None
    ),
    "unsupported protocol level 6": Case(
        connect(level=5), connect(level=6), UNSUPPORTED, version=None
    ),
    "unsupported protocol level 3 with MQTT": Case(
        connect(), connect(level=3), UNSUPPORTED, version=None
    ),
    "unsupported protocol level 4 with MQIsdp": Case(
        connect(name=b"MQIsdp", level=3),
        connect(name=b"MQIsdp", level=4),
        UNSUPPORTED,
        version=None,
    ),
    "CONNECT reserved flag": Case(
        connect(flags=0x02), connect(flags=0x03), MALFORMED, version=None
    ),
    "will QoS 3": Case(
        connect(flags=0x14, payload=s("c") + s("w") + s("m")),
        connect(flags=0x1C, payload=s("c") + s("w") + s("m")),
        MALFORMED,
        version=None,
    ),
    "will QoS without will flag": Case(
        connect(flags=0x00), connect(flags=0x08), MALFORMED, version=None
    ),
    "will retain without will flag": Case(
        connect(flags=0x00), connect(flags=0x20), MALFORMED, version=None
    ),
    "password without user name in 3.1.1": Case(
        connect(flags=0xC0, payload=s("c") + s("u") + s("p")),
        connect(flags=0x40, payload=s("c") + s("p")),
        PROTOCOL,
        version=None,
    ),
    "password without user name in 3.1": Case(
        connect(name=b"MQIsdp", level=3, flags=0xC0, payload=s("c") + s("u") + s("p")),
        connect(name=b"MQIsdp", level=3, flags=0x40, payload=s("c") + s("p")),
        PROTOCOL,
        version=None,
    ),
    "client id invalid UTF-8": Case(
        connect(payload=s(b"\xc3\xa9")), connect(payload=s(b"\xc3")), MALFORMED, version=None
    ),
    "client id U+0000": Case(
        connect(payload=s("a")), connect(payload=s("\x00")), MALFORMED, version=None
    ),
    "user name U+0000": Case(
        connect(flags=0x80, payload=s("c") + s("u")),
        connect(flags=0x80, payload=s("c") + s("u\x00")),
        MALFORMED,
        version=None,
    ),
    "will topic invalid UTF-8": Case(
        connect(flags=0x04, payload=s("c") + s("w") + s("m")),
        connect(flags=0x04, payload=s("c") + s(b"\xff") + s("m")),
        MALFORMED,
        version=None,
    ),
    "CONNECT trailing byte": Case(
        connect(), connect(payload=s("cid") + b"\x00"), MALFORMED, version=None
    ),
    "CONNECT truncated after the protocol name": Case(
        connect(), frame(0x10, s("MQTT")), MALFORMED, version=None
    ),
    "CONNECT truncated keepalive": Case(
        connect(), frame(0x10, s("MQTT") + b"\x04\x02\x00"), MALFORMED, version=None
    ),
    "CONNECT missing client id": Case(connect(), connect(payload=b""), MALFORMED, version=None),
    "CONNECT will without payload": Case(
        connect(flags=0x04, payload=s("c") + s("w") + s("m")),
        connect(flags=0x04, payload=s("c") + s("w")),
        MALFORMED,
        version=None,
    ),
    "second CONNECT with another version": Case(
        b"\xc0\x00", connect(level=5), PROTOCOL, version=MQTT_3_1_1
    ),
    "second CONNECT": Case(b"\xc0\x00", connect(), PROTOCOL, version=MQTT_3_1_1),
    "second CONNECT in 5": Case(b"\xc0\x00", connect(level=5), PROTOCOL, version=MQTT_5),
    "second CONNECT with an unsupported level": Case(
        b"\xc0\x00", connect(level=6), PROTOCOL, version=MQTT_5
    ),
    # ------------------------------------------------------------------------ first packet
    "PUBLISH first": Case(connect(), frame(0x30, s("t")), PROTOCOL, version=None),
    "PINGREQ first": Case(connect(), b"\xc0\x00", PROTOCOL, version=None),
    "SUBSCRIBE first": Case(
        connect(), frame(0x82, b"\x00\x01" + s("a") + b"\x00"), PROTOCOL, version=None
    ),
    "DISCONNECT first": Case(connect(), b"\xe0\x00", PROTOCOL, version=None),
    "PUBACK first": Case(connect(), frame(0x40, b"\x00\x01"), PROTOCOL, version=None),
    # ---------------------------------------------------------------------------- SUBSCRIBE
    "SUBSCRIBE without filters": Case(
        frame(0x82, b"\x00\x01" + s("a") + b"\x01"), frame(0x82, b"\x00\x01"), PROTOCOL
    ),
    "SUBSCRIBE v5 without filters": Case(
        frame(0x82, b"\x00\x01\x00" + s("a") + b"\x01"),
        frame(0x82, b"\x00\x01\x00"),
        PROTOCOL,
        version=MQTT_5,
    ),
    "SUBSCRIBE packet id 0": Case(
        frame(0x82, b"\x00\x01" + s("a") + b"\x01"),
        frame(0x82, b"\x00\x00" + s("a") + b"\x01"),
        PROTOCOL,
    ),
    "SUBSCRIBE reserved option bits in 3.1.1": Case(
        frame(0x82, b"\x00\x01" + s("a") + b"\x02"),
        frame(0x82, b"\x00\x01" + s("a") + b"\x06"),
        MALFORMED,
    ),
    "SUBSCRIBE reserved option bits in 5": Case(
        frame(0x82, b"\x00\x01\x00" + s("a") + b"\x2e"),
        frame(0x82, b"\x00\x01\x00" + s("a") + b"\x42"),
        MALFORMED,
        version=MQTT_5,
    ),
    "SUBSCRIBE option bit 7 in 5": Case(
        frame(0x82, b"\x00\x01\x00" + s("a") + b"\x02"),
        frame(0x82, b"\x00\x01\x00" + s("a") + b"\x82"),
        MALFORMED,
        version=MQTT_5,
    ),
    "SUBSCRIBE QoS 3": Case(
        frame(0x82, b"\x00\x01" + s("a") + b"\x02"),
        frame(0x82, b"\x00\x01" + s("a") + b"\x03"),
        MALFORMED,
    ),
    "SUBSCRIBE retain handling 3": Case(
        frame(0x82, b"\x00\x01\x00" + s("a") + b"\x20"),
        frame(0x82, b"\x00\x01\x00" + s("a") + b"\x30"),
        PROTOCOL,
        version=MQTT_5,
    ),
    "SUBSCRIBE filter without options": Case(
        frame(0x82, b"\x00\x01" + s("a") + b"\x00"), frame(0x82, b"\x00\x01" + s("a")), MALFORMED
    ),
    "SUBSCRIBE filter invalid UTF-8": Case(
        frame(0x82, b"\x00\x01" + s("a") + b"\x00"),
        frame(0x82, b"\x00\x01" + s(b"\x80") + b"\x00"),
        MALFORMED,
    ),
    "SUBSCRIBE two subscription identifiers": Case(
        frame(0x82, b"\x00\x01" + props(b"\x0b\x01") + s("a") + b"\x00"),
        frame(0x82, b"\x00\x01" + props(b"\x0b\x01\x0b\x02") + s("a") + b"\x00"),
        PROTOCOL,
        version=MQTT_5,
    ),
    "UNSUBSCRIBE without filters": Case(
        frame(0xA2, b"\x00\x01" + s("a")), frame(0xA2, b"\x00\x01"), PROTOCOL
    ),
    "UNSUBSCRIBE packet id 0": Case(
        frame(0xA2, b"\x00\x01" + s("a")), frame(0xA2, b"\x00\x00" + s("a")), PROTOCOL
    ),
    "UNSUBSCRIBE truncated filter": Case(
        frame(0xA2, b"\x00\x01" + s("ab")), frame(0xA2, b"\x00\x01" + s("ab")[:-1]), MALFORMED
    ),
    # -------------------------------------------------------------------------------- acks
    "PUBACK packet id 0": Case(frame(0x40, b"\x00\x01"), frame(0x40, b"\x00\x00"), PROTOCOL),
    "PUBREL packet id 0": Case(frame(0x62, b"\x00\x01"), frame(0x62, b"\x00\x00"), PROTOCOL),
    "PUBREC packet id 0": Case(frame(0x50, b"\x00\x01"), frame(0x50, b"\x00\x00"), PROTOCOL),
    "PUBCOMP packet id 0": Case(frame(0x70, b"\x00\x01"), frame(0x70, b"\x00\x00"), PROTOCOL),
    "PUBACK truncated": Case(frame(0x40, b"\x00\x01"), frame(0x40, b"\x01"), MALFORMED),
    "PUBACK trailing byte in 3.1.1": Case(
        frame(0x40, b"\x00\x01"), frame(0x40, b"\x00\x01\x00"), MALFORMED
    ),
    "PUBACK v5 trailing byte": Case(
        frame(0x40, b"\x00\x01\x10\x00"),
        frame(0x40, b"\x00\x01\x10\x00\x00"),
        MALFORMED,
        version=MQTT_5,
    ),
    "PUBACK v5 reason code not allowed": Case(
        frame(0x40, b"\x00\x01\x10"), frame(0x40, b"\x00\x01\x04"), PROTOCOL, version=MQTT_5
    ),
    "PUBREL v5 reason code not allowed": Case(
        frame(0x62, b"\x00\x01\x92"), frame(0x62, b"\x00\x01\x10"), PROTOCOL, version=MQTT_5
    ),
    "PINGREQ with a body": Case(b"\xc0\x00", b"\xc0\x01\x00", MALFORMED),
    "DISCONNECT with a body in 3.1.1": Case(b"\xe0\x00", b"\xe0\x01\x00", MALFORMED),
    "DISCONNECT v5 reason code not allowed": Case(
        b"\xe0\x01\x04", b"\xe0\x01\x05", PROTOCOL, version=MQTT_5
    ),
    "AUTH in 3.1.1": Case(b"\xc0\x00", b"\xf0\x00", PROTOCOL),
    "AUTH reason code not allowed": Case(
        b"\xf0\x01\x18", b"\xf0\x01\x01", PROTOCOL, version=MQTT_5
    ),
    # -------------------------------------------------------------------------- properties
    "duplicate property": Case(
        _pub5(b"\x02\x00\x00\x00\x05"),
        _pub5(b"\x02\x00\x00\x00\x05\x02\x00\x00\x00\x06"),
        PROTOCOL,
        version=MQTT_5,
    ),
    "duplicate property in CONNECT": Case(
        connect(level=5, properties=props(b"\x11\x00\x00\x00\x0a")),
        connect(level=5, properties=props(b"\x11\x00\x00\x00\x0a\x11\x00\x00\x00\x0a")),
        PROTOCOL,
        version=None,
    ),
    "duplicate property in DISCONNECT": Case(
        frame(0xE0, b"\x00" + props(b"\x1f" + s("r"))),
        frame(0xE0, b"\x00" + props(b"\x1f" + s("r") + b"\x1f" + s("r"))),
        PROTOCOL,
        version=MQTT_5,
    ),
    "property not allowed in PUBLISH": Case(
        _pub5(b"\x23\x00\x01"), _pub5(b"\x11\x00\x00\x00\x01"), MALFORMED, version=MQTT_5
    ),
    "property not allowed in CONNECT": Case(
        connect(level=5, properties=props(b"\x21\x00\x0a")),
        connect(level=5, properties=props(b"\x13\x00\x0a")),
        MALFORMED,
        version=None,
    ),
    "will delay interval in CONNECT properties": Case(
        connect(
            level=5, flags=0x04, payload=s("c") + props(b"\x18\x00\x00\x00\x01") + s("w") + s("m")
        ),
        connect(level=5, properties=props(b"\x18\x00\x00\x00\x01")),
        MALFORMED,
        version=None,
    ),
    "unknown property id": Case(_pub5(b"\x01\x01"), _pub5(b"\x04\x01"), MALFORMED, version=MQTT_5),
    "unknown property id 0x7f": Case(
        _pub5(b"\x03" + s("x")), _pub5(b"\x7f" + s("x")), MALFORMED, version=MQTT_5
    ),
    "boolean property of 2": Case(_pub5(b"\x01\x01"), _pub5(b"\x01\x02"), PROTOCOL, version=MQTT_5),
    "receive maximum 0": Case(
        connect(level=5, properties=props(b"\x21\x00\x01")),
        connect(level=5, properties=props(b"\x21\x00\x00")),
        PROTOCOL,
        version=None,
    ),
    "subscription identifier 0": Case(
        frame(0x82, b"\x00\x01" + props(b"\x0b\x01") + s("a") + b"\x00"),
        frame(0x82, b"\x00\x01" + props(b"\x0b\x00") + s("a") + b"\x00"),
        PROTOCOL,
        version=MQTT_5,
    ),
    "property length past the packet": Case(
        frame(0x30, s("t") + b"\x02\x01\x01"),
        frame(0x30, s("t") + b"\x05\x01\x01"),
        MALFORMED,
        version=MQTT_5,
    ),
    "truncated four-byte property": Case(
        frame(0x30, s("t") + props(b"\x02\x00\x00\x00\x01")),
        frame(0x30, s("t") + props(b"\x02\x00\x00")),
        MALFORMED,
        version=MQTT_5,
    ),
    "truncated user property": Case(
        _pub5(b"\x26" + s("k") + s("v")), _pub5(b"\x26" + s("k")), MALFORMED, version=MQTT_5
    ),
    "property string invalid UTF-8": Case(
        _pub5(b"\x03" + s("text")), _pub5(b"\x03" + s(b"te\xffxt")), MALFORMED, version=MQTT_5
    ),
    "user property U+0000": Case(
        _pub5(b"\x26" + s("k") + s("v")),
        _pub5(b"\x26" + s("k") + s("v\x00")),
        MALFORMED,
        version=MQTT_5,
    ),
    # ----------------------------------------------------------------- server-to-client
    "CONNACK reserved flags": Case(
        b"\x20\x02\x01\x00", b"\x20\x02\x02\x00", MALFORMED, client_side=True
    ),
    "CONNACK truncated": Case(b"\x20\x02\x00\x00", b"\x20\x01\x00", MALFORMED, client_side=True),
    "CONNACK trailing byte in 3.1.1": Case(
        b"\x20\x02\x00\x00", b"\x20\x03\x00\x00\x00", MALFORMED, client_side=True
    ),
    "UNSUBACK trailing byte in 3.1.1": Case(
        b"\xb0\x02\x00\x01", b"\xb0\x03\x00\x01\x00", MALFORMED, client_side=True
    ),
    "PINGRESP with a body": Case(b"\xd0\x00", b"\xd0\x01\x00", MALFORMED, client_side=True),
    "CONNECT sent to a client": Case(b"\xd0\x00", connect(), PROTOCOL, client_side=True),
    "CONNACK property not allowed": Case(
        b"\x20\x03\x00\x00\x00",
        frame(0x20, b"\x00\x00" + props(b"\x17\x01")),
        MALFORMED,
        version=MQTT_5,
        client_side=True,
    ),
}


def _decoder(case: Case) -> Decoder:
    if case.client_side:
        return Decoder(version=case.version, server_side=False)
    if case.version is None:
        return Decoder()
    return server_decoder(case.version)


@pytest.mark.parametrize("name", list(CASES))
def test_valid_twin_decodes(name: str) -> None:
    case = CASES[name]
    dec = _decoder(case)
    assert len(dec.feed(case.good)) == 1
    assert dec.buffered == 0


@pytest.mark.parametrize("name", list(CASES))
def test_defect_raises_its_reason_code(name: str) -> None:
    case = CASES[name]
    with pytest.raises(MQTTError) as err:
        _decoder(case).feed(case.bad)
    assert err.value.reason_code == case.code, err.value


@pytest.mark.parametrize("name", list(CASES))
def test_defect_raises_when_fed_byte_by_byte(name: str) -> None:
    """The same error surfaces when the bad frame arrives split, and only at its last byte."""
    case = CASES[name]
    dec = _decoder(case)
    bad = case.bad
    with pytest.raises(MQTTError) as err:
        for i in range(len(bad)):
            dec.feed(bad[i : i + 1])
    assert err.value.reason_code == case.code
    if not bad.startswith(b"\x10\x80\x80\x80\x80") and not bad.startswith(b"\x30\xff\xff\xff"):
        assert i == len(bad) - 1  # a frame is judged only once it is complete


def test_unsupported_level_still_sets_a_version_for_the_reply() -> None:
    """The caller answers a bad level with CONNACK 0x84 (5.0) or return code 1 (3.1.1)."""
    dec = Decoder()
    with pytest.raises(MQTTError) as err:
        dec.feed(connect(level=6))
    assert err.value.reason_code == UNSUPPORTED
    assert dec.version == MQTT_5
    dec = Decoder()
    with pytest.raises(MQTTError):
        dec.feed(connect(level=2))
    assert dec.version == MQTT_3_1_1


def test_password_without_user_name_is_allowed_in_5() -> None:
    wire = connect(level=5, flags=0x42, payload=s("c") + s(b"secret"))
    (pkt,) = Decoder().feed(wire)
    assert isinstance(pkt, Connect)
    assert pkt.username is None
    assert pkt.password == b"secret"


def test_repeated_user_property_and_subscription_identifier_are_not_duplicates() -> None:
    pub = _pub5(b"\x26" + s("k") + s("1") + b"\x26" + s("k") + s("2") + b"\x0b\x05\x0b\x07")
    (pkt,) = server_decoder(MQTT_5).feed(pub)
    assert isinstance(pkt, Publish)
    assert pkt.properties == {
        "user_property": [("k", "1"), ("k", "2")],
        "subscription_identifier": [5, 7],
    }


def test_bad_frame_after_good_ones_in_one_chunk_raises() -> None:
    """A bad frame after good ones in one chunk still raises (the connection must close)."""
    dec = server_decoder(MQTT_3_1_1)
    good = encode(Publish("a", b"1"), MQTT_3_1_1)
    with pytest.raises(MQTTError) as err:
        dec.feed(good + good + frame(0x36, s("t") + b"\x00\x01"))
    assert err.value.reason_code == MALFORMED


@pytest.mark.parametrize("version", [MQTT_3_1, MQTT_3_1_1, MQTT_5])
def test_first_connect_sets_version(version: int) -> None:
    dec = Decoder()
    assert dec.version is None
    dec.feed(encode(Connect("x", version), version))
    assert dec.version == version
