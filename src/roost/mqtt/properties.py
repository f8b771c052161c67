"""MQTT 5 properties (spec 2.2.2.2): a plain ``dict`` keyed by snake_case name.

``user_property`` is a list of (name, value) pairs and ``subscription_identifier`` a list of ints,
since both may appear more than once; every other property appears at most once.
"""

from __future__ import annotations

from typing import Any

from roost.mqtt.errors import MQTTError
from roost.mqtt.primitives import (
    Buffer,
    decode_binary,
    decode_string,
    decode_varint,
    encode_binary,
    encode_string,
    encode_varint,
)
from roost.mqtt.reason_codes import MALFORMED_PACKET, PROTOCOL_ERROR

# Packet types (fixed header, high nibble). WILL stands for the will properties of a CONNECT.
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = range(8, 16)
WILL = 0

BYTE, TWO, FOUR, VARINT, STRING, BINARY, PAIR = range(7)

_ACKS = frozenset({PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK, UNSUBACK})
_ALL = frozenset(range(16))

# id -> (name, type, packet types where it is allowed)
PROPERTIES: dict[int, tuple[str, int, frozenset[int]]] = {
    0x01: ("payload_format_indicator", BYTE, frozenset({PUBLISH, WILL})),
    0x02: ("message_expiry_interval", FOUR, frozenset({PUBLISH, WILL})),
    0x03: ("content_type", STRING, frozenset({PUBLISH, WILL})),
    0x08: ("response_topic", STRING, frozenset({PUBLISH, WILL})),
    0x09: ("correlation_data", BINARY, frozenset({PUBLISH, WILL})),
    0x0B: ("subscription_identifier", VARINT, frozenset({PUBLISH, SUBSCRIBE})),
    0x11: ("session_expiry_interval", FOUR, frozenset({CONNECT, CONNACK, DISCONNECT})),
    0x12: ("assigned_client_identifier", STRING, frozenset({CONNACK})),
    0x13: ("server_keep_alive", TWO, frozenset({CONNACK})),
    0x15: ("authentication_method", STRING, frozenset({CONNECT, CONNACK, AUTH})),
    0x16: ("authentication_data", BINARY, frozenset({CONNECT, CONNACK, AUTH})),
    0x17: ("request_problem_information", BYTE, frozenset({CONNECT})),
    0x18: ("will_delay_interval", FOUR, frozenset({WILL})),
    0x19: ("request_response_information", BYTE, frozenset({CONNECT})),
    0x1A: ("response_information", STRING, frozenset({CONNACK})),
    0x1C: ("server_reference", STRING, frozenset({CONNACK, DISCONNECT})),
    0x1F: ("reason_string", STRING, _ACKS | {CONNACK, DISCONNECT, AUTH}),
    0x21: ("receive_maximum", TWO, frozenset({CONNECT, CONNACK})),
    0x22: ("topic_alias_maximum", TWO, frozenset({CONNECT, CONNACK})),
    0x23: ("topic_alias", TWO, frozenset({PUBLISH})),
    0x24: ("maximum_qos", BYTE, frozenset({CONNACK})),
    0x25: ("retain_available", BYTE, frozenset({CONNACK})),
    0x26: ("user_property", PAIR, _ALL),
    0x27: ("maximum_packet_size", FOUR, frozenset({CONNECT, CONNACK})),
    0x28: ("wildcard_subscription_available", BYTE, frozenset({CONNACK})),
    0x29: ("subscription_identifier_available", BYTE, frozenset({CONNACK})),
    0x2A: ("shared_subscription_available", BYTE, frozenset({CONNACK})),
}
BY_NAME: dict[str, tuple[int, int]] = {name: (pid, t) for pid, (name, t, _) in PROPERTIES.items()}
_MULTI = frozenset({"user_property", "subscription_identifier"})

# Properties whose value must be 0 or 1 (spec: a Protocol Error otherwise).
_BOOLEAN = frozenset(
    {
        "payload_format_indicator",
        "request_problem_information",
        "request_response_information",
        "maximum_qos",
        "retain_available",
        "wildcard_subscription_available",
        "subscription_identifier_available",
        "shared_subscription_available",
    }
)
# Properties that must not be zero.
_NONZERO = frozenset({"receive_maximum", "maximum_packet_size", "subscription_identifier"})


def decode_properties(
    buf: Buffer, pos: int, packet_type: int, limit: int | None = None
) -> tuple[dict[str, Any], int]:
    """Decode a property block at ``pos`` of a packet ending at ``limit`` (default: the end of
    ``buf``); return (properties, position after it)."""
    if limit is None:
        limit = len(buf)
    length, pos = decode_varint(buf, pos, limit)
    end = pos + length
    if end > limit:
        raise MQTTError("property length exceeds the packet", MALFORMED_PACKET)
    props: dict[str, Any] = {}
    while pos < end:
        pid, pos = decode_varint(buf, pos, end)
        entry = PROPERTIES.get(pid)
        if entry is None:
            raise MQTTError(f"unknown property id 0x{pid:02x}", MALFORMED_PACKET)
        name, ptype, allowed = entry
        if packet_type not in allowed:
            raise MQTTError(f"property {name} is not allowed in this packet", MALFORMED_PACKET)
        if ptype == BYTE:
            if pos + 1 > end:
                raise MQTTError(f"truncated property {name}")
            value: Any = buf[pos]
            pos += 1
        elif ptype == TWO:
            if pos + 2 > end:
                raise MQTTError(f"truncated property {name}")
            value = (buf[pos] << 8) | buf[pos + 1]
            pos += 2
        elif ptype == FOUR:
            if pos + 4 > end:
                raise MQTTError(f"truncated property {name}")
            value = int.from_bytes(buf[pos : pos + 4], "big")
            pos += 4
        elif ptype == VARINT:
            value, pos = decode_varint(buf, pos, end)
        elif ptype == STRING:
            value, pos = decode_string(buf, pos, end)
        elif ptype == BINARY:
            value, pos = decode_binary(buf, pos, end)
        else:
            k, pos = decode_string(buf, pos, end)
            v, pos = decode_string(buf, pos, end)
            value = (k, v)
        if name in _BOOLEAN and value > 1:
            raise MQTTError(f"property {name} must be 0 or 1", PROTOCOL_ERROR)
        if name in _NONZERO and value == 0:
            raise MQTTError(f"property {name} must not be 0", PROTOCOL_ERROR)
        if name in _MULTI:
            props.setdefault(name, []).append(value)
        elif name in props:
            raise MQTTError(f"property {name} appears twice", PROTOCOL_ERROR)
        else:
            props[name] = value
    if pos != end:
        raise MQTTError("property block overruns its length", MALFORMED_PACKET)
    return props, pos


def _encode_one(pid: int, ptype: int, value: Any) -> bytes:
    head = encode_varint(pid)
    if ptype == BYTE:
        return head + bytes((value,))
    if ptype == TWO:
        return head + int.to_bytes(value, 2, "big")
    if ptype == FOUR:
        return head + int.to_bytes(value, 4, "big")
    if ptype == VARINT:
        return head + encode_varint(value)
    if ptype == STRING:
        return head + encode_string(value)
    if ptype == BINARY:
        return head + encode_binary(value)
    return head + encode_string(value[0]) + encode_string(value[1])


def encode_properties(props: dict[str, Any] | None) -> bytes:
    """Encode a property dict, length prefix included. ``None`` or ``{}`` gives ``b"\\x00"``."""
    if not props:
        return b"\x00"
    parts: list[bytes] = []
    for name, value in props.items():
        if value is None:
            continue
        pid, ptype = BY_NAME[name]
        if name == "subscription_identifier" and isinstance(value, list | tuple):
            parts.extend(_encode_one(pid, ptype, v) for v in value)
        elif name == "user_property":
            pairs = [value] if value and isinstance(value[0], str) else value
            parts.extend(_encode_one(pid, ptype, v) for v in pairs)
        else:
            parts.append(_encode_one(pid, ptype, value))
    body = b"".join(parts)
    return encode_varint(len(body)) + body
