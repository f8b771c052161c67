"""Round trips: encode -> feed -> the same packet, for every packet type in every version."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_strategies import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    PUBLISH,
    SPEC_PROPERTIES,
    SUBSCRIBE,
    VARINT_BOUNDARIES,
    VERSIONS,
    WILL,
    acks,
    auths,
    client_decoder,
    connacks,
    connects,
    disconnects,
    examples,
    full_properties,
    publishes,
    server_decoder,
    subacks,
    subscribes,
    unsubacks,
    unsubscribes,
)

from roost.mqtt import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    MQTTError,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    Will,
    encode,
    encode_publish,
)
from roost.mqtt.primitives import decode_varint, encode_varint
from roost.mqtt.properties import encode_properties

RT = settings(
    max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def via_server(packet: Packet, version: int) -> Packet:
    """Encode a client-to-server packet; decode it on a server (past its CONNECT if not one)."""
    dec = Decoder() if isinstance(packet, Connect) else server_decoder(version)
    data = encode(packet, version)
    out = dec.feed(data)
    assert len(out) == 1, out
    assert dec.buffered == 0
    return out[0]


def via_client(packet: Packet, version: int) -> Packet:
    """Encode a server-to-client packet and decode it on a client."""
    dec = client_decoder(version)
    out = dec.feed(encode(packet, version))
    assert len(out) == 1, out
    assert dec.buffered == 0
    return out[0]


# ------------------------------------------------------------------------ property-based


@pytest.mark.parametrize("version", VERSIONS)
@RT
@given(data=st.data())
def test_connect(version: int, data: st.DataObject) -> None:
    packet = data.draw(connects(version))
    dec = Decoder()
    assert dec.feed(encode(packet, version)) == [packet]
    assert dec.version == version


@pytest.mark.parametrize("version", VERSIONS)
@RT
@given(data=st.data())
def test_connack(version: int, data: st.DataObject) -> None:
    packet = data.draw(connacks(version))
    assert via_client(packet, version) == packet


@pytest.mark.parametrize("version", VERSIONS)
@RT
@given(data=st.data())
def test_publish_both_directions(version: int, data: st.DataObject) -> None:
    packet = data.draw(publishes(version))
    assert via_server(packet, version) == packet
    assert via_client(packet, version) == packet


@pytest.mark.parametrize("cls", [Puback, Pubrec, Pubrel, Pubcomp])
@pytest.mark.parametrize("version", VERSIONS)
@RT
@given(data=st.data())
def test_acks_both_directions(cls: type, version: int, data: st.DataObject) -> None:
    packet = data.draw(acks(cls, version))
    assert via_server(packet, version) == packet
    assert via_client(packet, version) == packet


@pytest.mark.parametrize("version", VERSIONS)
@RT
@given(data=st.data())
def test_subscribe(version: int, data: st.DataObject) -> None:
    packet = data.draw(subscribes(version))
    assert via_server(packet, version) == packet


@pytest.mark.parametrize("version", VERSIONS)
@RT
@given(data=st.data())
def test_suback(version: int, data: st.DataObject) -> None:
    packet = data.draw(subacks(version))
    assert via_client(packet, version) == packet


@pytest.mark.parametrize("version", VERSIONS)
@RT
@given(data=st.data())
def test_unsubscribe(version: int, data: st.DataObject) -> None:
    packet = data.draw(unsubscribes(version))
    assert via_server(packet, version) == packet


@pytest.mark.parametrize("version", VERSIONS)
@RT
@given(data=st.data())
def test_unsuback(version: int, data: st.DataObject) -> None:
    packet = data.draw(unsubacks(version))
    assert via_client(packet, version) == packet


@pytest.mark.parametrize("version", VERSIONS)
@RT
@given(data=st.data())
def test_disconnect_both_directions(version: int, data: st.DataObject) -> None:
    packet = data.draw(disconnects(version))
    assert via_server(packet, version) == packet
    assert via_client(packet, version) == packet


@RT
@given(packet=auths())
def test_auth_both_directions(packet: Auth) -> None:
    assert via_server(packet, MQTT_5) == packet
    assert via_client(packet, MQTT_5) == packet


@pytest.mark.parametrize("version", VERSIONS)
def test_pings(version: int) -> None:
    assert encode(Pingreq(), version) == b"\xc0\x00"
    assert encode(Pingresp(), version) == b"\xd0\x00"
    assert via_server(Pingreq(), version) == Pingreq()
    assert via_client(Pingresp(), version) == Pingresp()


# ------------------------------------------------------------- every property, all at once


def _with_all_properties() -> list[tuple[Packet, bool]]:
    """One packet per MQTT 5 type carrying every property the spec allows in it."""
    will = Will("w/t", b"bye", 2, True, full_properties(WILL))
    return [
        (Connect("id", MQTT_5, username="u", will=will, properties=full_properties(CONNECT)),
         True),
        (Connack(0, True, full_properties(CONNACK)), False),
        (Publish("t", b"p", 1, packet_id=7, properties={**full_properties(PUBLISH),
                                                        "subscription_identifier": [1, 268435455]}),
         True),
        (Puback(1, 0x10, full_properties(4)), True),
        (Pubrec(2, 0x80, full_properties(5)), True),
        (Pubrel(3, 0x92, full_properties(6)), True),
        (Pubcomp(4, 0x92, full_properties(7)), True),
        (Subscribe(5, [Subscription("a/#", 2, True, True, 2)], full_properties(SUBSCRIBE)), True),
        (Suback(5, [0, 1, 2, 0x80], full_properties(9)), False),
        (Unsubscribe(6, ["a/#", "b"], full_properties(10)), True),
        (Unsuback(6, [0, 0x11], full_properties(11)), False),
        (Disconnect(0x04, full_properties(DISCONNECT)), True),
        (Auth(0x18, full_properties(AUTH)), True),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("packet", "from_client"), _with_all_properties(), ids=lambda p: type(p).__name__
)
def test_every_allowed_property_round_trips(packet: Packet, from_client: bool) -> None:
    decoded = via_server(packet, MQTT_5) if from_client else via_client(packet, MQTT_5)
    assert decoded == packet
    assert decoded.properties  # type: ignore[attr-defined]


def test_the_all_properties_cases_cover_every_property() -> None:
    used: set[str] = set()
    for packet, _ in _with_all_properties():
        used |= set(packet.properties)  # type: ignore[attr-defined]
        if isinstance(packet, Connect) and packet.will:
            used |= set(packet.will.properties)
    assert used == set(SPEC_PROPERTIES)
    assert len(used) == 27


def _packet_with(packet_type: int, props: dict[str, Any]) -> tuple[Packet, bool]:
    """A minimal MQTT 5 packet of ``packet_type`` carrying ``props``; (packet, from client)."""
    if packet_type == WILL:
        return Connect("c", MQTT_5, will=Will("w", properties=props)), True
    return {
        CONNECT: lambda: (Connect("c", MQTT_5, properties=props), True),
        CONNACK: lambda: (Connack(0, properties=props), False),
        PUBLISH: lambda: (Publish("t", qos=1, packet_id=1, properties=props), True),
        4: lambda: (Puback(1, 0, props), True),
        5: lambda: (Pubrec(1, 0, props), True),
        6: lambda: (Pubrel(1, 0, props), True),
        7: lambda: (Pubcomp(1, 0, props), True),
        SUBSCRIBE: lambda: (Subscribe(1, [Subscription("a")], props), True),
        9: lambda: (Suback(1, [0], props), False),
        10: lambda: (Unsubscribe(1, ["a"], props), True),
        11: lambda: (Unsuback(1, [0], props), False),
        DISCONNECT: lambda: (Disconnect(0, props), True),
        AUTH: lambda: (Auth(0, props), True),
    }[packet_type]()


_SAMPLE = {k: v for t in range(16) for k, v in full_properties(t).items()}
_TYPES_WITH_PROPERTIES = (WILL, CONNECT, CONNACK, PUBLISH, 4, 5, 6, 7, SUBSCRIBE, 9, 10, 11,
                          DISCONNECT, AUTH)  # fmt: skip


@pytest.mark.parametrize("name", sorted(SPEC_PROPERTIES))
@pytest.mark.parametrize("packet_type", _TYPES_WITH_PROPERTIES)
def test_property_accepted_exactly_where_the_spec_allows(packet_type: int, name: str) -> None:
    value = {name: _SAMPLE[name]}
    packet, from_client = _packet_with(packet_type, value)
    decode = via_server if from_client else via_client
    if packet_type in SPEC_PROPERTIES[name][2]:
        assert decode(packet, MQTT_5) == packet
    else:
        with pytest.raises(MQTTError) as err:
            decode(packet, MQTT_5)
        # Spec 2.2.2.2: an identifier not valid for its packet type is a Malformed Packet.
        assert err.value.reason_code == 0x81


# ------------------------------------------------------------- variable byte integers


_VARINT_WIRE = {
    0: b"\x00",
    127: b"\x7f",
    128: b"\x80\x01",
    16383: b"\xff\x7f",
    16384: b"\x80\x80\x01",
    2097151: b"\xff\xff\x7f",
    2097152: b"\x80\x80\x80\x01",
    268435455: b"\xff\xff\xff\x7f",
}


@pytest.mark.parametrize("value", VARINT_BOUNDARIES)
def test_varint_boundaries(value: int) -> None:
    wire = _VARINT_WIRE[value]
    assert encode_varint(value) == wire
    assert decode_varint(wire, 0) == (value, len(wire))


def test_varint_out_of_range_is_refused_by_the_encoder() -> None:
    for bad in (-1, 268_435_456):
        with pytest.raises(ValueError):
            encode_varint(bad)


@pytest.mark.parametrize("value", [v for v in VARINT_BOUNDARIES if v])
def test_subscription_identifier_boundaries(value: int) -> None:
    sub = Subscribe(1, [Subscription("a/b", 1)], {"subscription_identifier": [value]})
    assert via_server(sub, MQTT_5) == sub
    pub = Publish("a/b", b"x", properties={"subscription_identifier": [value, 1]})
    assert via_client(pub, MQTT_5) == pub


@pytest.mark.parametrize("length", [0, 127, 128, 16383, 16384, 2097151, 2097152])
@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_remaining_length_boundaries(length: int, version: int) -> None:
    """A QoS 0 PUBLISH whose remaining length is exactly ``length`` (topic "" uses 2 bytes)."""
    if length == 0:
        # The smallest frames: PINGREQ, and a DISCONNECT in either version.
        assert via_server(Disconnect(), version) == Disconnect()
        assert encode(Disconnect(), version) == b"\xe0\x00"
        return
    overhead = 2 + (1 if version == MQTT_5 else 0)
    pub = Publish("", b"\xa5" * (length - overhead))
    wire = encode(pub, version)
    header = b"\x30" + _VARINT_WIRE[length]
    assert wire[: len(header)] == header
    assert len(wire) == len(header) + length
    assert via_server(pub, version) == pub


def test_largest_remaining_length_header_is_accepted_and_waits() -> None:
    """268435455 is the largest remaining length: the decoder waits for the body."""
    dec = server_decoder(MQTT_3_1_1)
    header = b"\x30\xff\xff\xff\x7f"
    assert dec.feed(header + b"\x00\x01t") == []
    assert dec.buffered == len(header) + 3


@pytest.mark.parametrize("version", [MQTT_3_1_1, MQTT_5])
def test_encode_publish_matches_encode(version: int) -> None:
    props = {"user_property": [("a", "b")], "message_expiry_interval": 9}
    pub = Publish("x/y", b"payload", 2, True, True, 513, props if version == MQTT_5 else {})
    parts = encode_publish(
        b"x/y", b"payload", 2, True, True, 513,
        encode_properties(props) if version == MQTT_5 else None,
    )  # fmt: skip
    assert parts == encode(pub, version)
    assert via_server(pub, version) == pub


def test_mqtt31_connect_uses_mqisdp() -> None:
    wire = encode(Connect("c", MQTT_3_1), MQTT_3_1)
    assert wire[2:11] == b"\x00\x06MQIsdp\x03"
    assert Decoder().feed(wire) == [Connect("c", MQTT_3_1)]
