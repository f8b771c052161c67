"""MQTT over WebSocket (RFC 6455), server side, as an asyncio Protocol.

Our own small implementation instead of a library: the broker only needs the server half of the
opening handshake and binary framing, and doing it in a Protocol keeps the same per-turn write
coalescing as TCP (all the MQTT packets written to a connection in one event-loop turn go out as
one binary frame, one syscall), with no task or queue per connection. MQTT is a byte stream, so
frame boundaries mean nothing: every data frame's payload goes straight to the channel, whether it
holds part of a packet or several.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import ssl
import struct
from collections.abc import Callable
from typing import cast

from roost.broker.channel import Channel
from roost.broker.node import Broker
from roost.transport.tcp import WRITE_HIGH_WATER, CoalescedWrites, ListenerState
from roost.transport.tls import peer_cn

log = logging.getLogger("roost.transport")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Subprotocols MQTT clients ask for (MQTT.js: mqtt, or mqttv3.1 for 3.1; EMQX also knows these).
SUBPROTOCOLS = ("mqtt", "mqttv3.1", "mqtt-v3", "mqtt-v3.1.1", "mqtt-v5")
_MAX_REQUEST = 16 * 1024
_CLOSE_WAIT = 2.0  # seconds a client gets to answer our close frame

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_TOO_BIG = 1009


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()


def frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final server frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


def unmask(data: bytes, mask: bytes) -> bytes:
    """XOR with the 4-byte mask, done on one big integer (fast in CPython)."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class WsProtocol(CoalescedWrites, asyncio.Protocol):
    def __init__(
        self,
        broker: Broker,
        listener: ListenerState,
        path: str,
        origins: Callable[[], list[str]] = list,
    ) -> None:
        self.broker = broker
        self.listener = listener
        self.path = path
        self.origins = origins  # read at each handshake: a hot config change applies at once
        self.transport: asyncio.Transport | None = None
        self.channel: Channel | None = None
        self.peer = ""
        self._buf = bytearray()
        self._upgraded = False
        self._counted = False
        self._pending: list[bytes] | None = None
        self._closing = False
        self._close_sent = False  # our close frame is out; waiting for the client's
        self._done = False  # nothing more to read
        self._max_frame = broker.config.mqtt.max_packet_size + 16

    # asyncio side -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's protocol gets a Transport; BaseTransport is only the base signature.
        self.transport = transport = cast(asyncio.Transport, transport)
        lst = self.listener
        if lst.connections >= lst.max_connections:
            lst.refused += 1
            log.warning("listener %s is full (%d connections); refusing", lst.name, lst.connections)
            transport.close()
            return
        lst.connections += 1
        self._counted = True
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        # As on TCP: past this many unsent bytes, deliveries wait in the (bounded) session queue.
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buf += data
        if not self._upgraded:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_REQUEST:
                    self._http_error(431, "Request Header Fields Too Large")
                return
            request = bytes(self._buf[:end])
            del self._buf[: end + 4]
            if not self._handshake(request):
                return
        self._read_frames()

    def pause_writing(self) -> None:
        if self.channel is not None:
            self.channel.pause_writing()

    def resume_writing(self) -> None:
        if self.channel is not None:
            self.channel.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self.listener.connections -= 1
        if self.channel is not None:
            self.channel.connection_lost()
            self.channel = None

    # opening handshake --------------------------------------------------------------------

    def _http_error(self, status: int, reason: str) -> None:
        assert self.transport is not None
        body = f"{status} {reason}\n".encode()
        self.transport.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        self._closing = self._close_sent = self._done = True
        self.transport.close()

    def _handshake(self, request: bytes) -> bool:
        lines = request.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[0] != "GET" or not parts[2].startswith("HTTP/1."):
            self._http_error(400, "Bad Request")
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._http_error(400, "Bad Request")
                return False
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if parts[1].split("?", 1)[0] != self.path:
            self._http_error(404, "Not Found")
            return False
        allowed = self.origins()
        origin = headers.get("origin")
        if allowed and origin is not None and origin.rstrip("/").lower() not in {
            o.lower() for o in allowed
        }:
            # A page from another site would use the visitor's network position (and any
            # credentials the page holds) to reach this broker.
            log.info("WebSocket from %s refused: origin %r not in check_origins", self.peer,
                     origin)  # fmt: skip
            self._http_error(403, "Forbidden")
            return False
        connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        key = headers.get("sec-websocket-key", "")
        if (
            headers.get("upgrade", "").lower() != "websocket"
            or "upgrade" not in connection
            or not key
        ):
            self._http_error(400, "Bad Request")
            return False
        if headers.get("sec-websocket-version") != "13":
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 426 Upgrade Required\r\nSec-WebSocket-Version: 13\r\n"
                b"Content-Length: 0\r\n\r\n"
            )
            self._closing = self._close_sent = self._done = True
            self.transport.close()
            return False
        offered = [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]
        chosen = next((p for p in offered if p in SUBPROTOCOLS), None)
        if offered != [""] and chosen is None:
            # A client that asked for subprotocols we do not speak: say so instead of a
            # connection the client would drop anyway.
            self._http_error(400, "Unsupported WebSocket Subprotocol")
            return False
        response = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
        )
        if chosen:
            response += f"Sec-WebSocket-Protocol: {chosen}\r\n"
        assert self.transport is not None
        self.transport.write((response + "\r\n").encode())
        self._upgraded = True
        cn = None
        if self.listener.cert_as_username:
            cn = peer_cn(self.transport.get_extra_info("peercert"))
        self.channel = Channel(self.broker, self, self.peer, self.listener.name, cn)
        return True

    # frames -------------------------------------------------------------------------------

    def _read_frames(self) -> None:
        buf = self._buf
        while len(buf) >= 2 and not self._done:
            b0, b1 = buf[0], buf[1]
            opcode = b0 & 0x0F
            n = b1 & 0x7F
            pos = 2
            if n == 126:
                if len(buf) < 4:
                    return
                n = int.from_bytes(buf[2:4], "big")
                pos = 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n = int.from_bytes(buf[2:10], "big")
                pos = 10
            if not b1 & 0x80:
                return self._fail(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
            if b0 & 0x70:
                return self._fail(CLOSE_PROTOCOL_ERROR, "reserved bits set")
            if n > self._max_frame:
                return self._fail(CLOSE_TOO_BIG, "frame too large")
            if len(buf) < pos + 4 + n:
                return
            mask = bytes(buf[pos : pos + 4])
            payload = unmask(bytes(buf[pos + 4 : pos + 4 + n]), mask)
            del buf[: pos + 4 + n]
            if self._close_sent and opcode != OP_CLOSE:
                continue  # closing: only the client's close frame matters now
            if opcode in (OP_BINARY, OP_CONT):
                if self.channel is not None and payload:
                    self.channel.data_received(payload)
            elif opcode == OP_PING:
                self._send_raw(frame(OP_PONG, payload))
            elif opcode == OP_PONG:
                pass
            elif opcode == OP_CLOSE:
                # Echo the close and end the TCP connection (the server closes first).
                code = payload[:2] if len(payload) >= 2 else b""
                self._done = True
                self._flush()
                if self.transport is not None:
                    if not self._close_sent:
                        self._close_sent = True
                        self.transport.write(frame(OP_CLOSE, code))
                    self.transport.close()
                return
            elif opcode == OP_TEXT:
                return self._fail(CLOSE_UNSUPPORTED, "MQTT needs binary frames")
            else:
                return self._fail(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")

    def _fail(self, code: int, reason: str) -> None:
        log.info("websocket %s: %s; closing", self.peer, reason)
        self._pending = None
        self._send_close(code, reason)

    def _send_close(self, code: int, reason: str = "") -> None:
        if self._close_sent or self.transport is None:
            return
        self._close_sent = True
        t = self.transport
        t.write(frame(OP_CLOSE, code.to_bytes(2, "big") + reason.encode()[:120]))
        # RFC 6455 7.1.1: wait (briefly) for the client's close frame, then end TCP.
        asyncio.get_running_loop().call_later(_CLOSE_WAIT, t.close)

    def _send_raw(self, data: bytes) -> None:
        self._flush()  # keep order with MQTT bytes already written this turn
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    # channel side -------------------------------------------------------------------------

    def _flush(self) -> None:
        pending = self._pending
        self._pending = None
        t = self.transport
        if pending and t is not None and not t.is_closing() and not self._close_sent:
            t.write(frame(OP_BINARY, pending[0] if len(pending) == 1 else b"".join(pending)))
        if self._closing:
            self._send_close(CLOSE_NORMAL)

    def close(self) -> None:
        """Close after the bytes written so far, with a WebSocket close frame."""
        if self._closing:
            return
        self._closing = True
        if self._pending is None:
            self._send_close(CLOSE_NORMAL)


async def start_ws_listener(
    broker: Broker,
    name: str,
    host: str,
    port: int,
    max_connections: int,
    path: str = "/mqtt",
    ssl_context: ssl.SSLContext | None = None,
    cert_as_username: bool = False,
    origins: Callable[[], list[str]] = list,
) -> asyncio.Server:
    state = ListenerState(name, max_connections, cert_as_username)
    broker.listener_states[name] = state
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: WsProtocol(broker, state, path, origins), host, port, ssl=ssl_context,
        reuse_address=True, backlog=1024,
        ssl_handshake_timeout=10.0 if ssl_context is not None else None,
    )  # fmt: skip
