"""One bench client across its connections: connect (within the runner's rate), subscribe or
publish on a schedule, keep alive, migrate (QUIC), and reconnect when allowed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING, Any

from roost.bench import payload as P
from roost.bench.frames import FrameMaker, Payloads
from roost.bench.stats import Sequences
from roost.bench.topics import Topic, client_id
from roost.bench.wire import MqttError, TcpConn
from roost.mqtt.packets import MQTT_5, Connect

if TYPE_CHECKING:
    from roost.bench.runner import Runner

#: A publisher with a short interval wakes at most this often and sends what fell due since:
#: batching keeps the cost per message, not per wake-up, the limit.
MIN_STEP = 0.01
#: Messages a flat-out (``-I 0``) QoS 0 publisher sends per turn of the event loop.
FLAT_OUT_BATCH = 256
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux
#: A publisher that fell behind (window full, broker slow) catches up at most this much.
MAX_BEHIND = 1.0


def backoff(attempt: int) -> float:
    """Seconds before reconnect attempt ``attempt``: short, since -R bounds a storm anyway."""
    return min(2.0, 0.25 * 2 ** (attempt - 1))


class Client:
    def __init__(self, runner: Runner, seq: int, ifaddr: str) -> None:
        o = runner.opts
        self.runner = runner
        self.opts = o
        self.stats = runner.stats
        self.seq = seq
        self.ifaddr = ifaddr
        self.version = o.version
        self.client_id = client_id(o.bench_command, seq, o.prefix, o.shortids, ifaddr)
        self.seqs = Sequences()
        self.conn: Any = None
        self.msg_seq = 1
        self.inflight_max = getattr(o, "inflight", 0)
        self.waiting_room = False
        self.ticket: Any = None  # QUIC session ticket for a 0-RTT reconnect
        self._timers: list[asyncio.TimerHandle] = []
        self._pub_handle: asyncio.Handle | None = None
        self._next_due = 0.0
        self._loop = asyncio.get_running_loop()
        self._migrator: asyncio.Task[None] | None = None
        self.opening = False  # in a connection attempt: stop() cancels it rather than wait
        if o.bench_command == "pub":
            self.topic = Topic(o.topic, seq, self.client_id, o.username)
            interval = o.interval_of_msg / 1000.0
            self.interval = interval
            message = o.message.encode() if o.message is not None else None
            self.payloads = Payloads(o.size, message, P.make_key(runner.run_id, seq))

    def connect_packet(self) -> Connect:
        o = self.opts
        props: dict[str, Any] = {}
        if self.version == MQTT_5 and o.session_expiry:
            props["session_expiry_interval"] = o.session_expiry
        password = o.password.encode() if o.password is not None else None
        return Connect(self.client_id, self.version, o.clean, o.keepalive, o.username, password,
                       None, props)  # fmt: skip

    # lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        r, stats, o = self.runner, self.stats, self.opts
        attempts = 0
        connected_before = False
        try:
            while not r.stopping:
                try:
                    conn = await self._open()
                except Exception as e:
                    if r.stopping:
                        break
                    stats.connect_fail += 1
                    r.report(self, "connect error", e)
                    attempts += 1
                    if attempts > o.reconnect:
                        break
                    await r.sleep(backoff(attempts))
                    continue
                if r.stopping:
                    with contextlib.suppress(Exception):
                        await conn.disconnect()
                    break
                stats.connect_succ += 1
                if connected_before:
                    stats.reconnect_succ += 1
                if getattr(conn, "early_data_accepted", False):
                    stats.connect_0rtt += 1
                connected_before = True
                attempts = 0
                self.conn = conn
                stats.connected += 1
                try:
                    why = await self._serve(conn)
                finally:
                    stats.connected -= 1
                    self._stop_timers()
                    self.conn = None
                    stats.pub_fail += conn.abandoned()
                    if self.opts.transport == "quic":
                        self.ticket = conn.session_ticket or self.ticket
                if r.stopping or why is None:
                    break
                stats.conn_lost += 1
                r.report(self, "connection lost", why)
                attempts += 1
                if attempts > o.reconnect:
                    break
                await r.sleep(backoff(attempts))
        finally:
            r.client_finished(self)

    async def _open(self) -> Any:
        r, o = self.runner, self.opts
        loop = self._loop
        self.opening = True
        try:
            return await self._open_in_slot(r, o, loop)
        finally:
            self.opening = False

    async def _open_in_slot(self, r: Runner, o: Any, loop: asyncio.AbstractEventLoop) -> Any:
        await r.wait_slot()
        async with r.handshakes:
            if r.stopping:
                raise ConnectionError("stopping")
            if o.transport == "quic":
                from roost.bench.quicconn import QuicConn

                local = self.ifaddr or ("::" if ":" in r.ip else "0.0.0.0")
                conn: Any = QuicConn(self, r.ip, local, self.ticket)
                self.ticket = None  # single use
                if o.bench_command == "pub":
                    conn.frames = (self.topic.render, o.qos, o.retain, self.payloads)
                connack = await conn.handshake(o.connect_timeout)
            else:
                conn = TcpConn(self)
                factory: Any = lambda: conn  # noqa: E731
                if o.transport in ("ws", "wss"):
                    from roost.bench.ws import WsAdapter

                    factory = lambda: WsAdapter(conn, o.host, o.port, o.ws_path)  # noqa: E731
                kw: dict[str, Any] = {}
                if r.ssl_context is not None:
                    kw["ssl"] = r.ssl_context
                    kw["server_hostname"] = o.host
                try:
                    # One timeout for it all: asyncio.wait_for costs a task per call, and
                    # connection setup is most of the CPU a 20,000-connection run needs.
                    async with asyncio.timeout(o.connect_timeout):
                        sock = await self._tcp_socket(r.ip, o.port)
                        _, proto = await loop.create_connection(factory, sock=sock, **kw)
                        if proto is not conn:
                            await proto.ready
                        connack = await conn.handshake(self.connect_packet())
                except BaseException:
                    conn.abort()
                    raise
                if o.bench_command == "pub":
                    v5 = self.version == MQTT_5
                    conn.frames = FrameMaker(self.topic.static, self.topic.render, o.qos,
                                             o.retain, v5, self.payloads)  # fmt: skip
        if connack.reason_code != 0:
            conn.abort()
            raise MqttError(f"CONNACK refused, reason 0x{connack.reason_code:02x}")
        return conn

    async def _tcp_socket(self, ip: str, port: int) -> socket.socket:
        """A connected socket. Made here, not by create_connection(host, port): uvloop would
        resolve even a numeric address in its thread pool, once per connection."""
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ifaddr:
                # Let connect() pick the port (unique per destination, cheap to find), not
                # bind() (unique per address, and a slow search once half are taken).
                with contextlib.suppress(OSError, AttributeError):
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((self.ifaddr, 0))
            await self._loop.sock_connect(sock, (ip, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def _serve(self, conn: Any) -> str | None:
        """Until the connection ends: why it ended, or None when we ended it."""
        o, stats = self.opts, self.stats
        if o.bench_command == "sub":
            filters = [Topic(t, self.seq, self.client_id, o.username).render() for t in o.topic]
            try:
                codes = await conn.subscribe(filters, o.qos, o.connect_timeout)
            except Exception as e:
                if conn.closed.done():
                    return None if self.runner.stopping else conn.closed.result()
                stats.sub_fail += 1
                self.runner.report(self, "subscribe error", e)
                codes = []
            else:
                if any(c >= 0x80 for c in codes):
                    stats.sub_fail += 1
                    self.runner.report(self, "subscribe refused", codes)
                else:
                    stats.sub += 1
        if o.keepalive:
            self._every(o.keepalive * 0.75, conn.ping)
        if o.transport == "quic" and o.migrate_every:
            self._migrator = self._loop.create_task(self._migrate_loop(conn))
        if o.bench_command == "pub":
            self._next_due = self._loop.time()
            self._pub_tick()
        why = await asyncio.shield(conn.closed)
        return None if self.runner.stopping else why

    def _every(self, period: float, fn: Any) -> None:
        def fire() -> None:
            fn()
            self._timers[:] = [self._loop.call_later(period, fire)]

        self._timers.append(self._loop.call_later(period, fire))

    def _stop_timers(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        if self._pub_handle is not None:
            self._pub_handle.cancel()
            self._pub_handle = None
        if self._migrator is not None:
            self._migrator.cancel()
            self._migrator = None
        self.waiting_room = False

    async def _migrate_loop(self, conn: Any) -> None:
        every = self.opts.migrate_every
        while True:
            await asyncio.sleep(every)
            try:
                await conn.migrate()
            except Exception as e:
                self.stats.migrate_fail += 1
                self.runner.report(self, "migration failed", e)
            else:
                self.stats.migrate += 1

    # publishing ---------------------------------------------------------------------------

    def on_room(self) -> None:
        """The connection can take more (acks came back, the write buffer drained)."""
        if self.waiting_room and self._pub_handle is None and self.conn is not None:
            self.waiting_room = False
            self._pub_handle = self._loop.call_soon(self._pub_tick)

    def _pub_tick(self) -> None:
        self._pub_handle = None
        conn, r = self.conn, self.runner
        if conn is None or r.stopping:
            return
        now = self._loop.time()
        interval = self.interval
        if interval:
            if now < self._next_due:
                self._pub_handle = self._loop.call_at(self._next_due, self._pub_tick)
                return
            if now - self._next_due > MAX_BEHIND:
                self._next_due = now - MAX_BEHIND
            want = int((now - self._next_due) / interval) + 1
        else:
            want = FLAT_OUT_BATCH
        room = conn.room()
        n = r.take_budget(min(want, room))
        if n:
            conn.publish(time.time_ns(), self.msg_seq, n)
            self.msg_seq += n
            if interval:
                self._next_due += n * interval
        if r.budget == 0:
            r.check_complete()  # -L reached: the run ends once the last acks are in
            return
        if room < want:
            self.waiting_room = True  # on_room() ticks again
            return
        if interval:
            self._pub_handle = self._loop.call_at(max(self._next_due, now + MIN_STEP),
                                                  self._pub_tick)  # fmt: skip
        else:
            self._pub_handle = self._loop.call_soon(self._pub_tick)

    # ending -------------------------------------------------------------------------------

    async def close(self, drain: float) -> None:
        """Disconnect cleanly, after waiting up to ``drain`` s for messages in flight."""
        self._stop_timers()
        conn = self.conn
        if conn is None:
            return
        deadline = self._loop.time() + drain
        while getattr(conn, "inflight", None) and self._loop.time() < deadline:
            await asyncio.sleep(0.02)
        with contextlib.suppress(Exception):
            await conn.disconnect()
