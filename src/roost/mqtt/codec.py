"""Sans-IO MQTT codec: feed bytes, get packets; give packets, get bytes.

``Decoder.feed`` splits every complete frame of a chunk in one pass and keeps the tail of a
split frame for the next call. The maximum packet size is checked from the fixed header, before
the body is buffered. Everything malformed raises :class:`MQTTError` with an MQTT 5 reason code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from roost.mqtt import properties as P
from roost.mqtt import reason_codes as RC
from roost.mqtt.errors import MQTTError
from roost.mqtt.packets import (
    MQTT_3_1,
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
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
)
from roost.mqtt.primitives import (
    decode_binary,
    decode_string,
    encode_binary,
    encode_string,
    encode_varint,
)
from roost.mqtt.properties import decode_properties, encode_properties

_EMPTY: dict[str, Any] = {}
_PINGREQ = Pingreq()
_PINGRESP = Pingresp()
_PINGREQ_BYTES = b"\xc0\x00"
_PINGRESP_BYTES = b"\xd0\x00"
#: A PINGRESP on the wire (the same on every version): the broker's answer to each PINGREQ.
PINGRESP_BYTES = _PINGRESP_BYTES

# Fixed-header flags every packet but PUBLISH must carry exactly (spec 2.1.3).
_REQUIRED_FLAGS = {1: 0, 2: 0, 4: 0, 5: 0, 6: 2, 7: 0, 8: 2, 9: 0, 10: 2, 11: 0, 12: 0,
                   13: 0, 14: 0, 15: 0}  # fmt: skip


class Decoder:
    """Incremental decoder for one connection.

    ``version`` is None until a CONNECT is decoded; it is set as soon as the CONNECT's protocol
    level is read, so a caller can answer a bad CONNECT in the client's own version.
    ``server_side`` decoders expect client-to-server packets (the first must be CONNECT).
    """

    __slots__ = ("_buf", "max_packet_size", "server_side", "version")

    def __init__(
        self,
        max_packet_size: int = 268_435_460,
        version: int | None = None,
        server_side: bool = True,
    ) -> None:
        # Only while a frame is incomplete: an idle connection holds no buffer.
        self._buf: bytearray | None = None
        self.max_packet_size = max_packet_size
        self.version = version
        self.server_side = server_side

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf) if self._buf else 0

    def feed(self, data: bytes) -> list[Packet]:
        buf = self._buf
        if buf:
            buf += data
            view: bytes | bytearray = buf
        else:
            view = data
        packets: list[Packet] = []
        pos = 0
        n = len(view)
        try:
            while n - pos >= 2:
                first = view[pos]
                # Remaining length: inline the common one- and two-byte cases.
                b = view[pos + 1]
                if b < 0x80:
                    length = b
                    body = pos + 2
                else:
                    length, body = _remaining_length(view, pos + 1, n)
                    if body < 0:
                        break  # the header itself is split across reads
                end = body + length
                if end - pos > self.max_packet_size:
                    raise MQTTError(
                        f"packet of {end - pos} bytes exceeds the maximum of "
                        f"{self.max_packet_size}",
                        RC.PACKET_TOO_LARGE,
                    )
                if end > n:
                    break
                packets.append(self._decode(first, view, body, end))
                pos = end
        except MQTTError as e:
            # The stream cannot be re-framed after an error: keep none of it (the rest of
            # the chunk may be a refused oversize frame, which must not stay buffered).
            # The good packets before the bad one travel with the error, to be handled first.
            self._buf = None
            e.packets = packets
            raise
        if buf:
            if pos == n:
                self._buf = None
            else:
                del buf[:pos]
        elif pos < n:
            self._buf = bytearray(view[pos:])
        return packets

    def _decode(self, first: int, buf: bytes | bytearray, pos: int, end: int) -> Packet:
        ptype = first >> 4
        flags = first & 0x0F
        version = self.version
        if ptype == 3:
            if version is None:
                raise MQTTError("the first packet must be CONNECT", RC.PROTOCOL_ERROR)
            return _decode_publish(flags, buf, pos, end, version)
        if ptype == 0:
            raise MQTTError("reserved packet type 0")
        if _REQUIRED_FLAGS[ptype] != flags:
            raise MQTTError(f"invalid fixed header flags 0x{flags:x} for packet type {ptype}")
        if ptype == 1:
            if version is not None:
                what = "second CONNECT" if self.server_side else "CONNECT sent by a server"
                raise MQTTError(what, RC.PROTOCOL_ERROR)
            return _decode_connect(self, buf, pos, end)
        if version is None:
            if self.server_side:
                raise MQTTError("the first packet must be CONNECT", RC.PROTOCOL_ERROR)
            version = MQTT_5 if ptype == 2 and end - pos > 2 else MQTT_3_1_1
        if ptype == 12:
            if end != pos:
                raise MQTTError("PINGREQ with a body")
            return _PINGREQ
        if ptype == 13:
            if end != pos:
                raise MQTTError("PINGRESP with a body")
            return _PINGRESP
        decoder = _DECODERS.get(ptype)
        if decoder is None:
            raise MQTTError(f"unexpected packet type {ptype}", RC.PROTOCOL_ERROR)
        return decoder(buf, pos, end, version)


def _remaining_length(view: bytes | bytearray, start: int, n: int) -> tuple[int, int]:
    """Decode the fixed header's remaining length; (0, -1) when it is not all here yet."""
    length = 0
    for i in range(4):
        if start + i >= n:
            return 0, -1
        byte = view[start + i]
        length |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return length, start + i + 1
    raise MQTTError("remaining length longer than 4 bytes")


def _u16(buf: bytes | bytearray, pos: int, end: int) -> int:
    if pos + 2 > end:
        raise MQTTError("truncated packet")
    return (buf[pos] << 8) | buf[pos + 1]


def _decode_publish(
    flags: int, buf: bytes | bytearray, pos: int, end: int, version: int
) -> Publish:
    qos = (flags >> 1) & 3
    if qos == 3:
        raise MQTTError("PUBLISH with QoS 3")
    dup = bool(flags & 8)
    if dup and qos == 0:
        raise MQTTError("PUBLISH with DUP set at QoS 0")
    topic, pos = decode_string(buf, pos, end)
    packet_id = None
    if qos:
        packet_id = _u16(buf, pos, end)
        if packet_id == 0:
            raise MQTTError("PUBLISH with packet identifier 0", RC.PROTOCOL_ERROR)
        pos += 2
    props = _EMPTY
    if version == MQTT_5:
        if pos < end and buf[pos] == 0:
            pos += 1
        else:
            props, pos = decode_properties(buf, pos, P.PUBLISH, end)
    pkt = Publish.__new__(Publish)
    pkt.topic = topic
    pkt.payload = bytes(buf[pos:end])
    pkt.qos = qos
    pkt.retain = bool(flags & 1)
    pkt.dup = dup
    pkt.packet_id = packet_id
    pkt.properties = props
    return pkt


def _decode_connect(dec: Decoder, buf: bytes | bytearray, pos: int, end: int) -> Connect:
    name, pos = decode_string(buf, pos, end)
    if pos >= end:
        raise MQTTError("truncated CONNECT")
    level = buf[pos]
    pos += 1
    if name not in ("MQTT", "MQIsdp"):
        raise MQTTError(f"unknown protocol name {name!r}", RC.PROTOCOL_ERROR)
    if (name, level) not in (("MQTT", MQTT_3_1_1), ("MQTT", MQTT_5), ("MQIsdp", MQTT_3_1)):
        dec.version = MQTT_3_1_1 if level < MQTT_5 else MQTT_5
        raise MQTTError(
            f"unsupported protocol {name!r} level {level}", RC.UNSUPPORTED_PROTOCOL_VERSION
        )
    dec.version = level
    if pos + 3 > end:
        raise MQTTError("truncated CONNECT")
    flags = buf[pos]
    keepalive = (buf[pos + 1] << 8) | buf[pos + 2]
    pos += 3
    if flags & 1:
        raise MQTTError("CONNECT reserved flag set")
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 3
    will_retain = bool(flags & 0x20)
    if will_qos == 3:
        raise MQTTError("will QoS 3")
    if not will_flag and (will_qos or will_retain):
        raise MQTTError("will QoS or retain set without a will")
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if has_password and not has_username and level != MQTT_5:
        raise MQTTError("password without user name", RC.PROTOCOL_ERROR)
    props = _EMPTY
    if level == MQTT_5:
        props, pos = decode_properties(buf, pos, P.CONNECT, end)
    client_id, pos = decode_string(buf, pos, end)
    will = None
    if will_flag:
        will_props = _EMPTY
        if level == MQTT_5:
            will_props, pos = decode_properties(buf, pos, P.WILL, end)
        will_topic, pos = decode_string(buf, pos, end)
        will_payload, pos = decode_binary(buf, pos, end)
        will = Will(will_topic, will_payload, will_qos, will_retain, dict(will_props))
    username = password = None
    if has_username:
        username, pos = decode_string(buf, pos, end)
    if has_password:
        password, pos = decode_binary(buf, pos, end)
    if pos != end:
        raise MQTTError("trailing bytes after CONNECT payload")
    return Connect(
        client_id=client_id,
        protocol_version=level,
        clean_start=bool(flags & 0x02),
        keepalive=keepalive,
        username=username,
        password=password,
        will=will,
        properties=dict(props),
        protocol_name=name,
    )


def _reason_and_props(
    buf: bytes | bytearray, pos: int, end: int, version: int, ptype: int, allowed: frozenset[int]
) -> tuple[int, dict[str, Any]]:
    """Optional reason code and properties of acks, DISCONNECT and AUTH (MQTT 5 only)."""
    if version != MQTT_5 or pos == end:
        if pos != end:
            raise MQTTError("trailing bytes")
        return 0, _EMPTY
    code = buf[pos]
    if code not in allowed:
        raise MQTTError(f"reason code 0x{code:02x} not allowed here", RC.PROTOCOL_ERROR)
    pos += 1
    props = _EMPTY
    if pos < end:
        props, pos = decode_properties(buf, pos, ptype, end)
    if pos != end:
        raise MQTTError("trailing bytes")
    return code, props


_BodyDecoder = Callable[[bytes | bytearray, int, int, int], Packet]


def _ack_decoder(
    cls: type[Puback | Pubrec | Pubrel | Pubcomp], allowed: frozenset[int]
) -> _BodyDecoder:
    def decode(buf: bytes | bytearray, pos: int, end: int, version: int) -> Packet:
        packet_id = _u16(buf, pos, end)
        if packet_id == 0:
            raise MQTTError("packet identifier 0", RC.PROTOCOL_ERROR)
        code, props = _reason_and_props(buf, pos + 2, end, version, cls.type, allowed)
        return cls(packet_id, code, props)

    return decode


def _decode_connack(buf: bytes | bytearray, pos: int, end: int, version: int) -> Connack:
    if pos + 2 > end:
        raise MQTTError("truncated CONNACK")
    if buf[pos] & 0xFE:
        raise MQTTError("CONNACK reserved flags set")
    props = _EMPTY
    if version == MQTT_5:
        props, after = decode_properties(buf, pos + 2, P.CONNACK, end)
    else:
        after = pos + 2
    if after != end:
        raise MQTTError("trailing bytes after CONNACK")
    return Connack(buf[pos + 1], bool(buf[pos] & 1), props)


def _decode_subscribe(buf: bytes | bytearray, pos: int, end: int, version: int) -> Subscribe:
    packet_id = _u16(buf, pos, end)
    if packet_id == 0:
        raise MQTTError("SUBSCRIBE with packet identifier 0", RC.PROTOCOL_ERROR)
    pos += 2
    props = _EMPTY
    if version == MQTT_5:
        props, pos = decode_properties(buf, pos, P.SUBSCRIBE, end)
        if len(props.get("subscription_identifier", ())) > 1:
            raise MQTTError("more than one subscription identifier", RC.PROTOCOL_ERROR)
    subs = []
    while pos < end:
        topic_filter, pos = decode_string(buf, pos, end)
        if pos >= end:
            raise MQTTError("topic filter without subscription options")
        opts = buf[pos]
        pos += 1
        qos = opts & 3
        if qos == 3:
            raise MQTTError("subscription with QoS 3")
        if version == MQTT_5:
            if opts & 0xC0:
                raise MQTTError("reserved subscription option bits set")
            retain_handling = (opts >> 4) & 3
            if retain_handling == 3:
                raise MQTTError("retain handling 3", RC.PROTOCOL_ERROR)
            subs.append(Subscription(topic_filter, qos, bool(opts & 4), bool(opts & 8),
                                     retain_handling))  # fmt: skip
        else:
            if opts & 0xFC:
                raise MQTTError("reserved subscription option bits set")
            subs.append(Subscription(topic_filter, qos))
    if not subs:
        raise MQTTError("SUBSCRIBE with no topic filter", RC.PROTOCOL_ERROR)
    return Subscribe(packet_id, subs, props)


def _decode_suback(buf: bytes | bytearray, pos: int, end: int, version: int) -> Suback:
    packet_id = _u16(buf, pos, end)
    pos += 2
    props = _EMPTY
    if version == MQTT_5:
        props, pos = decode_properties(buf, pos, P.SUBACK, end)
    return Suback(packet_id, list(buf[pos:end]), props)


def _decode_unsubscribe(buf: bytes | bytearray, pos: int, end: int, version: int) -> Unsubscribe:
    packet_id = _u16(buf, pos, end)
    if packet_id == 0:
        raise MQTTError("UNSUBSCRIBE with packet identifier 0", RC.PROTOCOL_ERROR)
    pos += 2
    props = _EMPTY
    if version == MQTT_5:
        props, pos = decode_properties(buf, pos, P.UNSUBSCRIBE, end)
    filters = []
    while pos < end:
        topic_filter, pos = decode_string(buf, pos, end)
        filters.append(topic_filter)
    if not filters:
        raise MQTTError("UNSUBSCRIBE with no topic filter", RC.PROTOCOL_ERROR)
    return Unsubscribe(packet_id, filters, props)


def _decode_unsuback(buf: bytes | bytearray, pos: int, end: int, version: int) -> Unsuback:
    packet_id = _u16(buf, pos, end)
    pos += 2
    props = _EMPTY
    codes: list[int] = []
    if version == MQTT_5:
        props, pos = decode_properties(buf, pos, P.UNSUBACK, end)
        codes = list(buf[pos:end])
    elif pos != end:
        raise MQTTError("trailing bytes after UNSUBACK")
    return Unsuback(packet_id, codes, props)


def _decode_disconnect(buf: bytes | bytearray, pos: int, end: int, version: int) -> Disconnect:
    code, props = _reason_and_props(buf, pos, end, version, P.DISCONNECT, RC.DISCONNECT_CODES)
    return Disconnect(code, props)


def _decode_auth(buf: bytes | bytearray, pos: int, end: int, version: int) -> Auth:
    if version != MQTT_5:
        raise MQTTError("AUTH before MQTT 5", RC.PROTOCOL_ERROR)
    code, props = _reason_and_props(buf, pos, end, version, P.AUTH, RC.AUTH_CODES)
    return Auth(code, props)


_DECODERS: dict[int, _BodyDecoder] = {
    2: _decode_connack,
    4: _ack_decoder(Puback, RC.PUBACK_CODES),
    5: _ack_decoder(Pubrec, RC.PUBACK_CODES),
    6: _ack_decoder(Pubrel, RC.PUBREL_CODES),
    7: _ack_decoder(Pubcomp, RC.PUBREL_CODES),
    8: _decode_subscribe,
    9: _decode_suback,
    10: _decode_unsubscribe,
    11: _decode_unsuback,
    14: _decode_disconnect,
    15: _decode_auth,
}


# ---------------------------------------------------------------------------------- encoding


def _frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


#: First byte of each acknowledgement by packet type, 4 to 7 (PUBREL's has the 0b0010 flags);
#: a tuple, indexed faster than a dict on this per-message path.
_ACK_FIRST = (0, 0, 0, 0, P.PUBACK << 4, P.PUBREC << 4, P.PUBREL << 4 | 2, P.PUBCOMP << 4)


def encode_ack(packet_type: int, packet_id: int, reason_code: int = 0) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP without properties, built directly (the broker's
    per-message acks): the reason code byte is left out when it is success, so a 3.1.1 ack
    is this with code 0."""
    first = _ACK_FIRST[packet_type]
    if reason_code:
        return bytes((first, 3)) + packet_id.to_bytes(2, "big") + bytes((reason_code,))
    return bytes((first, 2)) + packet_id.to_bytes(2, "big")


def encode_publish(
    topic: bytes,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int | None,
    props: bytes | None,
) -> bytes:
    """Encode a PUBLISH from pre-encoded parts (topic as UTF-8, props with length, None for 3.x).

    The broker's fan-out calls this once per wire variant, not once per subscriber.
    """
    first = 0x30 | (dup << 3) | (qos << 1) | retain
    tlen = len(topic)
    size = 2 + tlen + len(payload)
    if qos:
        size += 2
    if props is not None:
        size += len(props)
    parts = [bytes((first,)), encode_varint(size), tlen.to_bytes(2, "big"), topic]
    if qos:
        if packet_id is None:
            raise ValueError("a QoS 1 or 2 PUBLISH needs a packet identifier")
        parts.append(packet_id.to_bytes(2, "big"))
    if props is not None:
        parts.append(props)
    parts.append(payload)
    return b"".join(parts)


def _reason_body(code: int, props: dict[str, Any], version: int, short_ok: bool = True) -> bytes:
    if version != MQTT_5:
        return b""
    if not props:
        return b"" if (code == 0 and short_ok) else bytes((code,))
    return bytes((code,)) + encode_properties(props)


def encode(packet: Packet, version: int = MQTT_3_1_1) -> bytes:
    """Encode any packet for the given protocol version."""
    t = packet.type
    v5 = version == MQTT_5
    if t == P.PUBLISH:
        p: Any = packet
        return encode_publish(
            p.topic.encode(), p.payload, p.qos, p.retain, p.dup, p.packet_id,
            encode_properties(p.properties) if v5 else None,
        )  # fmt: skip
    if t in (P.PUBACK, P.PUBREC, P.PUBREL, P.PUBCOMP):
        a: Any = packet
        first = (t << 4) | (2 if t == P.PUBREL else 0)
        return _frame(first, a.packet_id.to_bytes(2, "big") + _reason_body(
            a.reason_code, a.properties, version))  # fmt: skip
    if t == P.PINGREQ:
        return _PINGREQ_BYTES
    if t == P.PINGRESP:
        return _PINGRESP_BYTES
    if t == P.CONNACK:
        c: Any = packet
        body = bytes((1 if c.session_present else 0, c.reason_code))
        if v5:
            body += encode_properties(c.properties)
        return _frame(0x20, body)
    if t == P.SUBACK or t == P.UNSUBACK:
        s: Any = packet
        body = s.packet_id.to_bytes(2, "big")
        if v5:
            body += encode_properties(s.properties)
        if v5 or t == P.SUBACK:
            body += bytes(s.reason_codes)
        return _frame(t << 4, body)
    if t == P.DISCONNECT:
        d: Any = packet
        return _frame(0xE0, _reason_body(d.reason_code, d.properties, version))
    if t == P.AUTH:
        au: Any = packet
        return _frame(0xF0, _reason_body(au.reason_code, au.properties, version))
    if t == P.SUBSCRIBE:
        sub: Any = packet
        parts = [sub.packet_id.to_bytes(2, "big")]
        if v5:
            parts.append(encode_properties(sub.properties))
        for s in sub.subscriptions:
            opts = s.qos
            if v5:
                opts |= (s.no_local << 2) | (s.retain_as_published << 3) | (s.retain_handling << 4)
            parts.append(encode_string(s.topic_filter) + bytes((opts,)))
        return _frame(0x82, b"".join(parts))
    if t == P.UNSUBSCRIBE:
        u: Any = packet
        parts = [u.packet_id.to_bytes(2, "big")]
        if v5:
            parts.append(encode_properties(u.properties))
        parts.extend(encode_string(f) for f in u.topic_filters)
        return _frame(0xA2, b"".join(parts))
    if isinstance(packet, Connect):
        return _encode_connect(packet)
    raise ValueError(f"cannot encode {packet!r}")


def _encode_connect(c: Connect) -> bytes:
    v5 = c.protocol_version == MQTT_5
    flags = 0
    if c.clean_start:
        flags |= 0x02
    if c.will is not None:
        flags |= 0x04 | (c.will.qos << 3) | (0x20 if c.will.retain else 0)
    if c.password is not None:
        flags |= 0x40
    if c.username is not None:
        flags |= 0x80
    parts = [
        encode_string(c.protocol_name),
        bytes((c.protocol_version, flags)),
        c.keepalive.to_bytes(2, "big"),
    ]
    if v5:
        parts.append(encode_properties(c.properties))
    parts.append(encode_string(c.client_id))
    if c.will is not None:
        if v5:
            parts.append(encode_properties(c.will.properties))
        parts.append(encode_string(c.will.topic))
        parts.append(encode_binary(c.will.payload))
    if c.username is not None:
        parts.append(encode_string(c.username))
    if c.password is not None:
        parts.append(encode_binary(c.password))
    return _frame(0x10, b"".join(parts))


__all__ = ["MQTT_3_1", "MQTT_3_1_1", "MQTT_5", "Decoder", "encode", "encode_publish"]
