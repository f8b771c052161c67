"""One bench client's MQTT connection over TCP, TLS or WebSocket: an asyncio Protocol.

The hot path is ``data_received``: it walks the frames of a read in place, counts PUBLISHes,
takes the timestamp and sequence number out of our payloads without building packet objects,
and answers every QoS 1/2 PUBLISH of the read with one write. Rare packets (CONNACK, SUBACK,
DISCONNECT) go through the codec's Decoder.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, cast

from roost.bench import payload as P
from roost.bench.frames import FrameMaker
from roost.mqtt.codec import Decoder, encode
from roost.mqtt.packets import (
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Suback,
    Subscribe,
    Subscription,
)

if TYPE_CHECKING:
    from roost.bench.client import Client

_HEADER = P.HEADER
_MAGIC = P.MAGIC
_PINGREQ = encode(Pingreq())
_DISCONNECT = {v: encode(Disconnect(0), v) for v in (3, 4, 5)}
MAX_PID = 65535
#: A read of less than NAP_BYTES that follows the previous one within NAP seconds pauses
#: reading for NAP: the next read then takes many messages at once. Brokers that write packet
#: by packet (mosquitto) otherwise cost a system call and a loop turn per message. Reads
#: that come further apart (low rates) are never delayed, so their latency stays exact.
NAP = 0.001
NAP_BYTES = 16384


class MqttError(ConnectionError):
    pass


class TcpConn(asyncio.Protocol):
    """MQTT on a byte stream; ``closed`` resolves with why the connection ended."""

    def __init__(self, client: Client) -> None:
        loop = asyncio.get_running_loop()
        self.client = client
        self.stats = client.stats
        self.version = client.version
        self.v5 = client.version == MQTT_5
        self.transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[Connack] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()
        self.paused = False
        self._buf = b""
        self._slow = Decoder(version=client.version, server_side=False)
        self._suback: dict[int, asyncio.Future[Suback]] = {}
        self.inflight: dict[int, int] = {}  # packet id -> 1 (PUBACK/PUBREC due), 2 (PUBCOMP due)
        self._next_pid = 1
        self.frames: FrameMaker | None = None
        self.disconnect_reason: int | None = None
        self._loop = loop
        self._last_read = 0.0
        self._napping = False

    # asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's protocol gets a Transport; BaseTransport is the base signature.
        self.transport = transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            why = str(exc) if exc else "closed by the broker"
            if self.disconnect_reason is not None:
                why = f"DISCONNECT 0x{self.disconnect_reason:02x}"
            self.closed.set_result(why)
        err = MqttError("connection lost")
        # .exception() marks each as retrieved: a waiter still gets it, and none is logged
        # when the waiter is gone (a cancelled connect).
        if not self.connack.done():
            self.connack.set_exception(err)
            self.connack.exception()
        for fut in self._suback.values():
            if not fut.done():
                fut.set_exception(err)
                fut.exception()
        self._suback.clear()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.client.on_room()

    def data_received(self, data: bytes) -> None:  # one pass, on purpose
        now = self._loop.time()
        if len(data) < NAP_BYTES and now - self._last_read < NAP and not self._napping:
            pause = getattr(self.transport, "pause_reading", None)
            if pause is not None:
                pause()
                self._napping = True
                self._loop.call_later(NAP, self._wake)
        self._last_read = now
        if self._buf:
            data = self._buf + data
            self._buf = b""
        n = len(data)
        pos = 0
        v5 = self.v5
        acks: list[bytes] = []
        stamps: list[int] = []
        recv = 0
        seqs = self.client.seqs
        expect = seqs.expect
        stats = self.stats
        unpack = _HEADER.unpack_from
        while n - pos >= 2:
            first = data[pos]
            b = data[pos + 1]
            if b < 0x80:
                length = b
                body = pos + 2
            else:
                length, body = b & 0x7F, pos + 2
                shift = 7
                while True:
                    if body >= n:
                        length = -1
                        break
                    b = data[body]
                    body += 1
                    length |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        self._fatal("malformed remaining length")
                        return
                if length < 0:
                    break
            end = body + length
            if end > n:
                break
            kind = first >> 4
            if kind == 3:
                recv += 1
                p = body + 2 + ((data[body] << 8) | data[body + 1])
                qos = (first >> 1) & 3
                if qos:
                    pid_bytes = data[p : p + 2]
                    p += 2
                    acks.append((b"\x40\x02" if qos == 1 else b"\x50\x02") + pid_bytes)
                if v5:
                    pl = data[p]
                    if pl < 0x80:
                        p += 1 + pl
                    else:
                        p += 2 + (pl & 0x7F | data[p + 1] << 7)  # props are never > 16 KiB
                if end - p >= 24 and data[p : p + 4] == _MAGIC:
                    key, ts, seq = unpack(data, p + 4)
                    stamps.append(ts)
                    exp = expect.get(key)
                    if exp is None or seq == exp:
                        expect[key] = seq + 1
                    else:
                        seqs.out_of_order(key, seq, exp, stats)
            elif kind == 4 or kind == 7:  # PUBACK, PUBCOMP: a message of ours is done
                pid = (data[body] << 8) | data[body + 1]
                if self.inflight.pop(pid, None) is not None:
                    if length > 2 and data[body + 2] >= 0x80:
                        stats.pub_fail += 1
                    else:
                        stats.pub += 1
            elif kind == 5:  # PUBREC
                pid = (data[body] << 8) | data[body + 1]
                if length > 2 and data[body + 2] >= 0x80:
                    if self.inflight.pop(pid, None) is not None:
                        stats.pub_fail += 1
                else:
                    self.inflight[pid] = 2
                    acks.append(b"\x62\x02" + data[body : body + 2])
            elif kind == 6:  # PUBREL of a QoS 2 delivery to us
                acks.append(b"\x70\x02" + data[body : body + 2])
            elif kind != 13:  # all but PINGRESP
                try:
                    for packet in self._slow.feed(data[pos:end]):
                        self._on_packet(packet)
                except Exception as e:
                    self._fatal(f"bad packet from the broker: {e}")
                    return
            pos = end
        if pos < n:
            self._buf = data[pos:]
        if acks and self.transport is not None:
            self.transport.write(b"".join(acks))
        if recv:
            stats.recv += recv
            if stamps:
                now = time.time_ns()
                stats.latency.record_many([(now - ts) // 1000 for ts in stamps])
        # Refill the window on every ack, however few: waiting for a batch stalls ~40 ms a
        # time against a broker with Nagle on (mosquitto), whose next PUBACKs wait for our TCP
        # ACK, which Linux delays while we send nothing (measured: 2k instead of 45k msg/s).
        if self.client.waiting_room and self.room():
            self.client.on_room()
        if self.client.runner.budget == 0:
            self.client.runner.check_complete()

    def _wake(self) -> None:
        self._napping = False
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    def _on_packet(self, packet: object) -> None:
        # `type(packet) is X` narrows the packet for mypy.
        if type(packet) is Connack:
            if not self.connack.done():
                self.connack.set_result(packet)
        elif type(packet) is Suback:
            fut = self._suback.pop(packet.packet_id, None)
            if fut is not None and not fut.done():
                fut.set_result(packet)
        elif type(packet) is Disconnect:
            self.disconnect_reason = packet.reason_code

    def _fatal(self, why: str) -> None:
        if not self.closed.done():
            self.closed.set_result(why)
        if self.transport is not None:
            self.transport.abort()

    # what a client does with it -----------------------------------------------------------

    async def handshake(self, connect: Connect) -> Connack:
        """CONNECT, and its CONNACK (the caller bounds the wait)."""
        assert self.transport is not None
        self.transport.write(encode(connect, self.version))
        return await asyncio.shield(self.connack)

    async def subscribe(self, filters: list[str], qos: int, timeout: float) -> list[int]:
        assert self.transport is not None
        pid = self._pid()
        fut: asyncio.Future[Suback] = asyncio.get_running_loop().create_future()
        self._suback[pid] = fut
        packet = Subscribe(pid, [Subscription(f, qos) for f in filters])
        self.transport.write(encode(packet, self.version))
        async with asyncio.timeout(timeout):
            return list((await fut).reason_codes)

    def _pid(self) -> int:
        pid = self._next_pid
        while pid in self.inflight or pid in self._suback:
            pid = pid % MAX_PID + 1
        self._next_pid = pid % MAX_PID + 1
        return pid

    def room(self) -> int:
        """Messages that may be sent now: the QoS window, and no write backlog."""
        if self.paused or self.transport is None or self.closed.done():
            return 0
        if not self.frames or not self.frames.qos:
            return 1 << 30
        window = self.client.inflight_max or MAX_PID - 1
        return max(0, min(window, MAX_PID - 1) - len(self.inflight))

    def publish(self, ts: int, seq0: int, n: int) -> None:
        """Send messages ``seq0 .. seq0 + n - 1``; the caller checked ``room()``."""
        frames = self.frames
        assert frames is not None and self.transport is not None
        pids = None
        if frames.qos:
            pids = []
            inflight = self.inflight
            pid = self._next_pid
            for _ in range(n):
                while pid in inflight or pid in self._suback:
                    pid = pid % MAX_PID + 1
                inflight[pid] = 1
                pids.append(pid)
                pid = pid % MAX_PID + 1
            self._next_pid = pid
        self.transport.write(frames.build(ts, seq0, n, pids))
        if not frames.qos:
            self.stats.pub += n

    def ping(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_PINGREQ)

    def abandoned(self) -> int:
        """QoS 1/2 messages that were in flight when the connection ended."""
        n = len(self.inflight)
        self.inflight.clear()
        return n

    async def disconnect(self) -> None:
        """DISCONNECT and close; ``closed`` resolves when the socket is gone (the runner
        waits for that, for all connections at once)."""
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(_DISCONNECT[self.version])
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
