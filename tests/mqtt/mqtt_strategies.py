"""Hypothesis strategies and helpers shared by the codec tests.

The property table here is written from the MQTT 5.0 specification (section 2.2.2.2), not
from ``roost.mqtt.properties``, so the tests check the codec against the spec.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import strategies as st

from roost.mqtt import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Decoder,
    Disconnect,
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
)

VERSIONS = (MQTT_3_1, MQTT_3_1_1, MQTT_5)

# Scale every max_examples by ROOST_HYPOTHESIS_SCALE (CI or a long fuzz run may raise it).
_SCALE = float(os.environ.get("ROOST_HYPOTHESIS_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, int(n * _SCALE))


# Boundaries of the 1-, 2-, 3- and 4-byte variable byte integer encodings (spec 1.5.5).
VARINT_BOUNDARIES = (0, 127, 128, 16383, 16384, 2097151, 2097152, 268435455)

# Packet type names as the spec's property table uses them; "WILL" is the will properties.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)
WILL = 0
_ACKS = {PUBACK, PUBREC, PUBREL, PUBCOMP}

# name -> (id, wire type, packet types it may appear in), from the spec's table 2-4.
SPEC_PROPERTIES: dict[str, tuple[int, str, frozenset[int]]] = {
    "payload_format_indicator": (0x01, "byte", frozenset({PUBLISH, WILL})),
    "message_expiry_interval": (0x02, "four", frozenset({PUBLISH, WILL})),
    "content_type": (0x03, "string", frozenset({PUBLISH, WILL})),
    "response_topic": (0x08, "string", frozenset({PUBLISH, WILL})),
    "correlation_data": (0x09, "binary", frozenset({PUBLISH, WILL})),
    "subscription_identifier": (0x0B, "varint", frozenset({PUBLISH, SUBSCRIBE})),
    "session_expiry_interval": (0x11, "four", frozenset({CONNECT, CONNACK, DISCONNECT})),
    "assigned_client_identifier": (0x12, "string", frozenset({CONNACK})),
    "server_keep_alive": (0x13, "two", frozenset({CONNACK})),
    "authentication_method": (0x15, "string", frozenset({CONNECT, CONNACK, AUTH})),
    "authentication_data": (0x16, "binary", frozenset({CONNECT, CONNACK, AUTH})),
    "request_problem_information": (0x17, "byte", frozenset({CONNECT})),
    "will_delay_interval": (0x18, "four", frozenset({WILL})),
    "request_response_information": (0x19, "byte", frozenset({CONNECT})),
    "response_information": (0x1A, "string", frozenset({CONNACK})),
    "server_reference": (0x1C, "string", frozenset({CONNACK, DISCONNECT})),
    "reason_string": (
        0x1F,
        "string",
        frozenset(_ACKS | {CONNACK, SUBACK, UNSUBACK, DISCONNECT, AUTH}),
    ),
    "receive_maximum": (0x21, "two", frozenset({CONNECT, CONNACK})),
    "topic_alias_maximum": (0x22, "two", frozenset({CONNECT, CONNACK})),
    "topic_alias": (0x23, "two", frozenset({PUBLISH})),
    "maximum_qos": (0x24, "byte", frozenset({CONNACK})),
    "retain_available": (0x25, "byte", frozenset({CONNACK})),
    "user_property": (0x26, "pair", frozenset(range(16)) - {PINGREQ, PINGRESP}),
    "maximum_packet_size": (0x27, "four", frozenset({CONNECT, CONNACK})),
    "wildcard_subscription_available": (0x28, "byte", frozenset({CONNACK})),
    "subscription_identifier_available": (0x29, "byte", frozenset({CONNACK})),
    "shared_subscription_available": (0x2A, "byte", frozenset({CONNACK})),
}

# Reason codes each MQTT 5 packet may carry (spec 3.2.2.2, 3.4.2.1, ..., 3.15.2.1).
CONNACK_CODES = (0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A,
                 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F)  # fmt: skip
PUBACK_CODES = (0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99)
PUBREL_CODES = (0x00, 0x92)
SUBACK_CODES = (0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2)
UNSUBACK_CODES = (0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91)
DISCONNECT_CODES = (0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F,
                    0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D,
                    0x9E, 0x9F, 0xA0, 0xA1, 0xA2)  # fmt: skip
AUTH_CODES = (0x00, 0x18, 0x19)

# ------------------------------------------------------------------------------ primitives

# Valid MQTT UTF-8 text: no U+0000 and no surrogates (spec 1.5.4).
_CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
text = st.text(_CHARS, max_size=20)
binary = st.binary(max_size=40)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
packet_id = st.integers(1, 0xFFFF)
varint_nonzero = st.one_of(
    st.sampled_from([v for v in VARINT_BOUNDARIES if v]), st.integers(1, 268_435_455)
)


def _value(name: str, wire: str) -> st.SearchStrategy[Any]:
    """Valid values of one property."""
    if wire == "byte":
        return st.integers(0, 1)  # every byte property is a 0/1 flag
    if wire == "two":
        return st.integers(1, 0xFFFF) if name in ("receive_maximum", "topic_alias") else u16
    if wire == "four":
        return st.integers(1, 0xFFFF_FFFF) if name == "maximum_packet_size" else u32
    if wire == "varint":
        return varint_nonzero
    if wire == "string":
        return text
    if wire == "binary":
        return binary
    return st.tuples(text, text)


def properties(packet_type: int, exclude: tuple[str, ...] = ()) -> st.SearchStrategy[dict]:
    """Property dicts valid for ``packet_type``, in the codec's Python shape."""
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for name, (_, wire, allowed) in SPEC_PROPERTIES.items():
        if packet_type not in allowed or name in exclude:
            continue
        if name == "user_property":
            fields[name] = st.lists(_value(name, wire), min_size=1, max_size=3)
        elif name == "subscription_identifier":
            # A SUBSCRIBE carries at most one; a PUBLISH to a client may carry several.
            most = 1 if packet_type == SUBSCRIBE else 3
            fields[name] = st.lists(_value(name, wire), min_size=1, max_size=most)
        else:
            fields[name] = _value(name, wire)
    return st.fixed_dictionaries({}, optional=fields)


def full_properties(packet_type: int) -> dict[str, Any]:
    """One valid value for every property allowed in ``packet_type``."""
    samples: dict[str, Any] = {
        "byte": 1,
        "two": 0xFFFF,
        "four": 0xFFFF_FFFF,
        "varint": [268_435_455],
        "string": "zürich/😀",
        "binary": b"\x00\xff",
        "pair": [("k", "v"), ("k", "v2"), ("", "")],
    }
    return {
        name: samples[wire]
        for name, (_, wire, allowed) in SPEC_PROPERTIES.items()
        if packet_type in allowed
    }


# --------------------------------------------------------------------------------- packets


def _props(version: int, packet_type: int) -> st.SearchStrategy[dict]:
    return properties(packet_type) if version == MQTT_5 else st.just({})


@st.composite
def wills(draw: st.DrawFn, version: int) -> Will:
    return Will(
        draw(text),
        draw(binary),
        draw(st.integers(0, 2)),
        draw(st.booleans()),
        draw(_props(version, WILL)),
    )


@st.composite
def connects(draw: st.DrawFn, version: int) -> Connect:
    username = draw(st.none() | text)
    password = draw(st.none() | binary)
    if version != MQTT_5 and username is None:
        password = None  # MQTT 3.x: a password needs a user name
    return Connect(
        client_id=draw(text),
        protocol_version=version,
        clean_start=draw(st.booleans()),
        keepalive=draw(u16),
        username=username,
        password=password,
        will=draw(st.none() | wills(version)),
        properties=draw(_props(version, CONNECT)),
    )


@st.composite
def connacks(draw: st.DrawFn, version: int) -> Connack:
    codes = st.sampled_from(CONNACK_CODES) if version == MQTT_5 else st.integers(0, 5)
    return Connack(draw(codes), draw(st.booleans()), draw(_props(version, CONNACK)))


@st.composite
def publishes(draw: st.DrawFn, version: int, payload: st.SearchStrategy[bytes] = binary) -> Publish:
    qos = draw(st.integers(0, 2))
    return Publish(
        draw(text),
        draw(payload),
        qos,
        draw(st.booleans()),
        dup=qos > 0 and draw(st.booleans()),
        packet_id=draw(packet_id) if qos else None,
        properties=draw(_props(version, PUBLISH)),
    )


def acks(cls: type, version: int) -> st.SearchStrategy[Packet]:
    codes = PUBREL_CODES if cls in (Pubrel, Pubcomp) else PUBACK_CODES
    if version != MQTT_5:
        return st.builds(cls, packet_id)
    return st.builds(cls, packet_id, st.sampled_from(codes), properties(cls.type))


@st.composite
def subscriptions(draw: st.DrawFn, version: int) -> Subscription:
    if version != MQTT_5:
        return Subscription(draw(text), draw(st.integers(0, 2)))
    return Subscription(
        draw(text),
        draw(st.integers(0, 2)),
        draw(st.booleans()),
        draw(st.booleans()),
        draw(st.integers(0, 2)),
    )


def subscribes(version: int) -> st.SearchStrategy[Subscribe]:
    subs = st.lists(subscriptions(version), min_size=1, max_size=4)
    return st.builds(Subscribe, packet_id, subs, _props(version, SUBSCRIBE))


def subacks(version: int) -> st.SearchStrategy[Suback]:
    codes = st.sampled_from(SUBACK_CODES if version == MQTT_5 else (0, 1, 2, 0x80))
    return st.builds(
        Suback, packet_id, st.lists(codes, min_size=1, max_size=4), _props(version, SUBACK)
    )


def unsubscribes(version: int) -> st.SearchStrategy[Unsubscribe]:
    filters = st.lists(text, min_size=1, max_size=4)
    return st.builds(Unsubscribe, packet_id, filters, _props(version, UNSUBSCRIBE))


def unsubacks(version: int) -> st.SearchStrategy[Unsuback]:
    if version != MQTT_5:
        return st.builds(Unsuback, packet_id, st.just([]))  # 3.x UNSUBACK has no payload
    codes = st.lists(st.sampled_from(UNSUBACK_CODES), min_size=1, max_size=4)
    return st.builds(Unsuback, packet_id, codes, properties(UNSUBACK))


def disconnects(version: int) -> st.SearchStrategy[Disconnect]:
    if version != MQTT_5:
        return st.just(Disconnect())
    return st.builds(Disconnect, st.sampled_from(DISCONNECT_CODES), properties(DISCONNECT))


def auths() -> st.SearchStrategy[Auth]:
    return st.builds(Auth, st.sampled_from(AUTH_CODES), properties(AUTH))


def client_packets(version: int) -> st.SearchStrategy[Packet]:
    """Any packet a client sends after its CONNECT."""
    options = [
        publishes(version),
        acks(Puback, version),
        acks(Pubrec, version),
        acks(Pubrel, version),
        acks(Pubcomp, version),
        subscribes(version),
        unsubscribes(version),
        st.just(Pingreq()),
        disconnects(version),
    ]
    if version == MQTT_5:
        options.append(auths())
    return st.one_of(options)


def server_packets(version: int) -> st.SearchStrategy[Packet]:
    """Any packet a server sends."""
    options = [
        connacks(version),
        publishes(version),
        acks(Puback, version),
        acks(Pubrec, version),
        acks(Pubrel, version),
        acks(Pubcomp, version),
        subacks(version),
        unsubacks(version),
        st.just(Pingresp()),
        disconnects(version),
    ]
    if version == MQTT_5:
        options.append(auths())
    return st.one_of(options)


# --------------------------------------------------------------------------------- helpers


def server_decoder(version: int, max_packet_size: int = 268_435_460) -> Decoder:
    """A server-side decoder that has already accepted a CONNECT of ``version``."""
    dec = Decoder(max_packet_size)
    assert dec.feed(encode(Connect("c", protocol_version=version), version))
    assert dec.version == version
    return dec


def client_decoder(version: int) -> Decoder:
    return Decoder(version=version, server_side=False)


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError if the block runs longer than ``seconds`` (main thread only)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"took longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
