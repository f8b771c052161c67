"""Wire primitives: variable byte integers, UTF-8 strings and binary data (spec 1.5)."""

from __future__ import annotations

from roost.mqtt.errors import MQTTError
from roost.mqtt.reason_codes import MALFORMED_PACKET

MAX_VARINT = 268_435_455

# What the decoders read from: a received chunk, the decoder's buffer or a view of either.
Buffer = bytes | bytearray | memoryview


def encode_varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if n > MAX_VARINT or n < 0:
        raise ValueError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(buf: Buffer, pos: int, end: int | None = None) -> tuple[int, int]:
    """Decode a variable byte integer at ``pos``; return (value, next position)."""
    if end is None:
        end = len(buf)
    value = 0
    shift = 0
    for i in range(4):
        if pos + i >= end:
            raise MQTTError("truncated variable byte integer", MALFORMED_PACKET)
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise MQTTError("variable byte integer longer than 4 bytes", MALFORMED_PACKET)


def check_utf8_text(text: str) -> None:
    """Reject U+0000 (spec 1.5.4); surrogates never decode from valid UTF-8."""
    if "\x00" in text:
        raise MQTTError("UTF-8 string contains U+0000", MALFORMED_PACKET)


def decode_string(buf: Buffer, pos: int, end: int | None = None) -> tuple[str, int]:
    if end is None:
        end = len(buf)
    if pos + 2 > end:
        raise MQTTError("truncated string length", MALFORMED_PACKET)
    n = (buf[pos] << 8) | buf[pos + 1]
    start = pos + 2
    stop = start + n
    if stop > end:
        raise MQTTError("string runs past the end of the packet", MALFORMED_PACKET)
    try:
        text = bytes(buf[start:stop]).decode("utf-8")
    except UnicodeDecodeError:
        raise MQTTError("invalid UTF-8 string", MALFORMED_PACKET) from None
    if "\x00" in text:
        raise MQTTError("UTF-8 string contains U+0000", MALFORMED_PACKET)
    return text, stop


def decode_binary(buf: Buffer, pos: int, end: int | None = None) -> tuple[bytes, int]:
    if end is None:
        end = len(buf)
    if pos + 2 > end:
        raise MQTTError("truncated binary length", MALFORMED_PACKET)
    n = (buf[pos] << 8) | buf[pos + 1]
    stop = pos + 2 + n
    if stop > end:
        raise MQTTError("binary data runs past the end of the packet", MALFORMED_PACKET)
    return bytes(buf[pos + 2 : stop]), stop


def encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError("string longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + data


def encode_binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError("binary data longer than 65535 bytes")
    return len(data).to_bytes(2, "big") + bytes(data)
