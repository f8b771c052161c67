"""MQTT over WebSocket for the bench client: the RFC 6455 client handshake and binary frames,
wrapped around a :class:`~roost.bench.wire.TcpConn` that sees a plain byte stream."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from typing import Any, cast

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _mask(data: bytes, key: bytes) -> bytes:
    # One big-integer XOR runs at C speed, unlike a loop over the bytes.
    n = len(data)
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ k).to_bytes(n, "big")


def frame(payload: bytes, opcode: int = 2) -> bytes:
    """A masked client frame (clients must mask, RFC 6455 5.3)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return head + key + (_mask(payload, key) if n else b"")


class _Writer:
    """What the inner protocol sees as its transport."""

    def __init__(self, adapter: WsAdapter) -> None:
        self._a = adapter

    def write(self, data: bytes) -> None:
        t = self._a.transport
        if t is not None and data:
            t.write(frame(data))

    def close(self) -> None:
        t = self._a.transport
        if t is not None and not t.is_closing():
            t.write(frame(b"\x03\xe8", opcode=8))
            t.close()

    def abort(self) -> None:
        if self._a.transport is not None:
            self._a.transport.abort()

    def is_closing(self) -> bool:
        t = self._a.transport
        return t is None or t.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        t = self._a.transport
        return default if t is None else t.get_extra_info(name, default)


class WsAdapter(asyncio.Protocol):
    def __init__(self, inner: asyncio.Protocol, host: str, port: int, path: str) -> None:
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._key = base64.b64encode(os.urandom(16)).decode()
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self._key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
        ).encode()
        self._buf = b""
        self._upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's protocol gets a Transport; BaseTransport is the base signature.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during the WebSocket handshake"))
        if self._upgraded:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._upgraded:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self._upgraded:
            self.inner.resume_writing()

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            self._check_upgrade(buf[:end])
            if not self._upgraded:
                return
            buf = buf[end + 4 :]
        out, pos, n = [], 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if b1 & 0x80:  # a server must not mask; tolerate it anyway
                head += 4
            end = pos + head + length
            if end > n:
                break
            payload = buf[pos + head : end]
            if b1 & 0x80:
                payload = _mask(payload, buf[pos + head - 4 : pos + head])
            opcode = b0 & 0x0F
            if opcode in (0, 1, 2):
                out.append(payload)
            elif opcode == 8:
                assert self.transport is not None
                self.transport.close()
            elif opcode == 9 and self.transport is not None:
                self.transport.write(frame(payload, opcode=10))
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        if out:
            self.inner.data_received(out[0] if len(out) == 1 else b"".join(out))

    def _check_upgrade(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        fields = (ln.partition(":") for ln in lines[1:])
        headers = {k.strip().lower(): v.strip() for k, _, v in fields}
        accept = base64.b64encode(hashlib.sha1(self._key.encode() + _GUID).digest()).decode()
        assert self.transport is not None
        if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != accept:
            self.ready.set_exception(ConnectionError(f"WebSocket upgrade refused: {lines[0]}"))
            self.transport.close()
            return
        self._upgraded = True
        self.inner.connection_made(_Writer(self))  # type: ignore[arg-type]  # duck-typed transport
        self.ready.set_result(None)
