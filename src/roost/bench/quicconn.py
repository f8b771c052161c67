"""One bench client's MQTT over QUIC connection, on the package's client (roost.client.quic).

The control stream carries CONNECT and pings; with ``--quic-streams N`` publishes and
subscriptions take the N data streams in turn, as emqtt's multi-stream mode does. A reconnect
with a session ticket sends its CONNECT in 0-RTT data.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from aioquic.tls import SessionTicket

from roost.bench import payload as P
from roost.client.quic import MqttStream, QuicClient
from roost.mqtt.packets import Connack, Connect, Pingreq, Publish

if TYPE_CHECKING:
    from roost.bench.client import Client

#: Unacknowledged bytes on a stream before a QoS 0 publisher waits: aioquic buffers without end.
SEND_BUFFER = 256 * 1024


class _Sink:
    """Stands in for QuicClient.messages: each PUBLISH is counted as it is decoded."""

    def __init__(self, conn: QuicConn) -> None:
        self.conn = conn

    def put_nowait(self, item: tuple[int, Publish]) -> None:
        self.conn._on_publish(item[1])


class QuicConn:
    def __init__(self, client: Client, ip: str, local_host: str,
                 ticket: SessionTicket | None) -> None:  # fmt: skip
        self.client = client
        self.stats = client.stats
        o = client.opts
        c: Connect = client.connect_packet()
        self.qc = QuicClient(
            ip, o.port, c.client_id, version=c.protocol_version, keepalive=c.keepalive,
            clean_start=c.clean_start, username=c.username, password=c.password,
            properties=c.properties, session_ticket=ticket, cafile=o.cafile,
            local_host=local_host,
        )  # fmt: skip
        if o.certfile:
            self.qc.configuration.load_cert_chain(o.certfile, o.keyfile)
        self.qc.configuration.server_name = o.host
        self.qc.messages = _Sink(self)  # type: ignore[assignment]  # duck-typed: put_nowait only
        self.ticket_used = ticket is not None
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.data: list[MqttStream] = []
        self._turn = 0
        self.inflight = 0
        self.frames: Any = None  # set by the client: (topic renderer, qos, retain, payloads)
        self._watch: asyncio.Task[None] | None = None

    async def handshake(self, timeout: float) -> Connack:
        try:
            connack = await self.qc.connect(timeout=timeout)
        except BaseException:
            # The CONNACK future fails later, when the connection is torn down: nobody waits
            # for it by then, so take its exception here and do not let asyncio log it.
            fut = self.qc._connack
            if fut is not None:
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.abort()
            raise
        self.data = [self.qc.open_stream() for _ in range(self.client.opts.quic_streams)]
        assert self.qc.protocol is not None  # connect() made it
        quic = self.qc.protocol._quic
        for s in self.data:
            # aioquic wants streams opened in order: a later one used first finishes the
            # earlier ones. Opening them all now leaves them free to use in any order.
            quic.send_stream_data(s.stream_id, b"")
        self._watch = asyncio.get_running_loop().create_task(self._watch_close())
        return connack

    @property
    def early_data_accepted(self) -> bool:
        hs = self.qc.handshake
        return bool(self.ticket_used and hs is not None and hs.early_data_accepted)

    async def _watch_close(self) -> None:
        ev = await self.qc.wait_closed(timeout=1e9)
        if not self.closed.done():
            reason = ev.reason_phrase or "closed"
            self.closed.set_result(f"QUIC connection closed (0x{ev.error_code:x} {reason})")

    def _stream(self) -> MqttStream:
        if not self.data:
            return self.qc.control
        self._turn = (self._turn + 1) % len(self.data)
        return self.data[self._turn]

    def _on_publish(self, p: Publish) -> None:
        stats = self.stats
        stats.recv += 1
        parsed = P.parse(p.payload)
        if parsed is not None:
            key, ts, seq = parsed
            stats.latency.record(max(0, (time.time_ns() - ts) // 1000))
            self.client.seqs.check(key, seq, stats)

    async def subscribe(self, filters: list[str], qos: int, timeout: float) -> list[int]:
        codes: list[int] = []
        for i, f in enumerate(filters):
            stream = self.data[i % len(self.data)] if self.data else self.qc.control
            codes += await stream.subscribe(f, qos, timeout=timeout)
        return codes

    def room(self) -> int:
        if self.closed.done() or self.qc.terminated is not None:
            return 0
        qos = self.frames[1]
        if qos:
            window = self.client.inflight_max or 65534
            return max(0, window - self.inflight)
        if self._backlog() < SEND_BUFFER:
            return 1 << 30
        # Nothing tells us when aioquic's buffer drains: look again shortly.
        asyncio.get_running_loop().call_later(0.01, self.client.on_room)
        return 0

    def _backlog(self) -> int:
        """Bytes written to our streams that the broker has not acknowledged yet."""
        quic = self.qc.protocol._quic if self.qc.protocol else None
        if quic is None:
            return 0
        backlog = 0
        for s in [self.qc.control, *self.data]:
            st = quic._streams.get(s.stream_id)
            if st is not None:
                backlog += st.sender._buffer_stop - st.sender._buffer_start
        return backlog

    def publish(self, ts: int, seq0: int, n: int) -> None:
        render, qos, retain, payloads = self.frames
        for seq in range(seq0, seq0 + n):
            fut = self._stream().publish_nowait(render(seq), payloads.one(ts, seq), qos, retain)
            if fut is None:
                self.stats.pub += 1
            else:
                self.inflight += 1
                fut.add_done_callback(self._acked)

    def _acked(self, fut: asyncio.Future[int]) -> None:
        self.inflight -= 1
        if fut.cancelled() or fut.exception() is not None or fut.result() >= 0x80:
            self.stats.pub_fail += 1
        else:
            self.stats.pub += 1
        if self.client.waiting_room:
            self.client.on_room()
        if self.client.runner.budget == 0:
            self.client.runner.check_complete()

    def abandoned(self) -> int:
        n, self.inflight = self.inflight, 0
        return n

    def ping(self) -> None:
        if self.qc.terminated is None:
            try:
                self.qc.control.send(Pingreq())
            except ConnectionError:
                pass

    async def migrate(self) -> None:
        await self.qc.migrate()

    @property
    def session_ticket(self) -> SessionTicket | None:
        return self.qc.session_ticket

    async def disconnect(self, timeout: float = 2.0) -> None:
        # QoS 0 messages on data streams must reach the broker before the control stream's
        # FIN ends the connection (TCP's single stream keeps that order by itself).
        deadline = asyncio.get_running_loop().time() + timeout
        while self._backlog() and self.qc.terminated is None:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.01)
        try:
            await self.qc.disconnect(timeout=timeout)
        except ConnectionError:
            pass
        await self._cleanup()

    def abort(self) -> None:
        self.qc.close()
        if self.qc._transport is not None:
            self.qc._transport.close()

    async def _cleanup(self) -> None:
        if self.qc._transport is not None:
            self.qc._transport.close()
        if self._watch is not None:
            self._watch.cancel()
