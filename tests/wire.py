"""Hand-made MQTT bytes and a socket that reads the broker's answer frame by frame.

The builders here are written from the spec, independently of ``roost.mqtt``, so a test that
sends them does not depend on the codec it is testing. Versions are protocol levels: 4 is
MQTT 3.1.1, 5 is MQTT 5.0.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from roost.mqtt import Decoder, Packet

V4 = 4
V5 = 5
VERSIONS = (V4, V5)
VNAME = {3: "3.1", V4: "3.1.1", V5: "5.0"}

PINGREQ = b"\xc0\x00"
PINGRESP = b"\xd0\x00"


def vbi(n: int) -> bytes:
    """Variable byte integer (spec 1.5.5)."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(text: str | bytes) -> bytes:
    """Two-byte length prefix and the bytes; ``bytes`` are sent as given (may be invalid UTF-8)."""
    data = text.encode() if isinstance(text, str) else text
    return len(data).to_bytes(2, "big") + data


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def props(raw: bytes = b"") -> bytes:
    """A property block: its length, then the raw properties."""
    return vbi(len(raw)) + raw


def frame(first: int, body: bytes) -> bytes:
    return bytes((first,)) + vbi(len(body)) + body


def connect(
    v: int,
    client_id: str | bytes = "",
    flags: int = 0x02,
    keepalive: int = 60,
    properties: bytes = b"",
    tail: bytes = b"",
    name: bytes = b"MQTT",
    level: int | None = None,
) -> bytes:
    """CONNECT with a clean start; ``tail`` goes after the client id (will, user name, ...)."""
    level = v if level is None else level
    body = s(name) + bytes((level, flags)) + u16(keepalive)
    if level == V5:
        body += props(properties)
    return frame(0x10, body + s(client_id) + tail)


def publish(
    v: int,
    topic: str | bytes,
    payload: bytes = b"",
    qos: int = 0,
    pid: int | None = None,
    properties: bytes = b"",
    flags: int | None = None,
) -> bytes:
    """PUBLISH; ``flags`` overrides the low nibble of the first byte (DUP, QoS, RETAIN)."""
    first = 0x30 | (qos << 1 if flags is None else flags)
    body = s(topic)
    if pid is not None:
        body += u16(pid)
    if v == V5:
        body += props(properties)
    return frame(first, body + payload)


def subscribe(
    v: int,
    pid: int,
    filters: list[tuple[str | bytes, int]],
    properties: bytes = b"",
    first: int = 0x82,
) -> bytes:
    body = u16(pid) + (props(properties) if v == V5 else b"")
    for topic_filter, options in filters:
        body += s(topic_filter) + bytes((options,))
    return frame(first, body)


def unsubscribe(v: int, pid: int, filters: list[str | bytes], first: int = 0xA2) -> bytes:
    body = u16(pid) + (props(b"") if v == V5 else b"")
    return frame(first, body + b"".join(s(f) for f in filters))


def split_frames(buf: bytearray) -> list[bytes]:
    """Take every complete frame off the front of ``buf``."""
    frames = []
    while len(buf) >= 2:
        length = 0
        for i in range(4):
            if 1 + i >= len(buf):
                return frames
            length |= (buf[1 + i] & 0x7F) << (7 * i)
            if buf[1 + i] < 0x80:
                head = 2 + i
                break
        else:
            raise AssertionError(f"the broker sent a bad remaining length: {bytes(buf[:5])!r}")
        if len(buf) < head + length:
            return frames
        frames.append(bytes(buf[: head + length]))
        del buf[: head + length]
    return frames


def body_of(data: bytes) -> bytes:
    """The bytes after a frame's fixed header."""
    i = 1
    while data[i] & 0x80:
        i += 1
    return data[i + 1 :]


def decode(data: bytes, v: int) -> Packet:
    """One frame the broker sent, decoded as a client of version ``v`` would."""
    packets = Decoder(version=v, server_side=False).feed(data)
    assert len(packets) == 1, f"not exactly one packet in {data!r}"
    return packets[0]


class Wire:
    """A TCP connection to the broker that sends exact bytes and reads whole frames back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buf = bytearray()
        self.frames: list[bytes] = []
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, deadline: float) -> bool:
        """Read once; False on timeout. Sets ``eof`` when the broker has closed."""
        self.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
        else:
            self.buf += data
            self.frames.extend(split_frames(self.buf))
        return True

    def frame(self, timeout: float = 5.0) -> bytes:
        """The next frame from the broker; fails on close or timeout."""
        deadline = time.monotonic() + timeout
        while not self.frames:
            if self.eof:
                raise AssertionError("the broker closed the connection")
            if not self._read(deadline) and time.monotonic() >= deadline:
                raise AssertionError(f"no frame from the broker within {timeout}s")
        return self.frames.pop(0)

    def until_closed(self, timeout: float = 5.0) -> tuple[list[bytes], bool]:
        """Every frame the broker sends until it closes; (frames, closed within timeout)."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline)
        frames, self.frames = self.frames, []
        return frames, self.eof

    def quiet(self, wait: float) -> bool:
        """True when the broker neither sends nor closes for ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not self.eof and not self.frames:
            self._read(deadline)
        return not self.eof and not self.frames

    def ping(self) -> None:
        """Assert the connection is alive: PINGREQ gets PINGRESP."""
        self.send(PINGREQ)
        assert self.frame() == PINGRESP

    def close(self) -> None:
        self.sock.close()


def connack_code(data: bytes) -> int:
    assert data[0] == 0x20, f"expected CONNACK, got {data!r}"
    return body_of(data)[1]


def reason_of(data: bytes) -> int:
    """Reason code of an MQTT 5 DISCONNECT frame (0 when the short form is used)."""
    assert data[0] == 0xE0, f"expected DISCONNECT, got {data!r}"
    body = body_of(data)
    return body[0] if body else 0


def describe(frames: list[bytes]) -> Any:
    return [f.hex(" ") for f in frames]
