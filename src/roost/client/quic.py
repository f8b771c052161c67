"""An MQTT over QUIC client (aioquic), speaking what EMQX's QUIC clients speak.

Stream 0 is the control stream (CONNECT, PINGREQ, DISCONNECT and any pub/sub); ``open_stream``
opens data streams, each with its own packet ids. ``migrate`` moves the connection to a new local
UDP socket (a new port, as after a NAT rebinding or a Wi-Fi to LTE switch) without reconnecting.
A client that got a session ticket can pass it to a new client and send its CONNECT in 0-RTT.

    client = QuicClient("127.0.0.1", 14567, client_id="c1")
    await client.connect()
    await client.control.subscribe("a/#", 1)
    await client.control.publish("a/b", b"x", 1)
    msg = await client.recv()
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.tls import SessionTicket

from roost.mqtt.codec import Decoder, encode
from roost.mqtt.packets import (
    MQTT_5,
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

_P = TypeVar("_P", bound=Packet)


class QuicMqttError(ConnectionError):
    pass


class MqttStream:
    """One bidirectional stream: its own decoder, packet ids and pending acknowledgements."""

    def __init__(self, client: QuicClient, stream_id: int) -> None:
        self.client = client
        self.stream_id = stream_id
        self.decoder = Decoder(version=client.version, server_side=False)
        self._next_pid = 1
        # (packet type, packet id) -> the future _wait returned, typed there by the class.
        self._waiters: dict[tuple[int, int], asyncio.Future[Any]] = {}
        self.finished = False

    def _pid(self) -> int:
        pid = self._next_pid
        self._next_pid = pid % 65535 + 1
        return pid

    def send(self, packet: Packet | bytes) -> None:
        data = packet if isinstance(packet, bytes) else encode(packet, self.client.version)
        self.client._send(self.stream_id, data)

    def _wait(self, cls: type[_P], pid: int) -> asyncio.Future[_P]:
        fut: asyncio.Future[_P] = asyncio.get_running_loop().create_future()
        self._waiters[(cls.type, pid)] = fut
        return fut

    async def publish(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> int:
        """Publish; for QoS 1/2 wait for the broker's acknowledgement and return its reason."""
        fut = self.publish_nowait(topic, payload, qos, retain, properties)
        if fut is None:
            return 0
        return await asyncio.wait_for(fut, timeout)

    def publish_nowait(
        self,
        topic: str,
        payload: bytes = b"",
        qos: int = 0,
        retain: bool = False,
        properties: dict[str, Any] | None = None,
    ) -> asyncio.Future[int] | None:
        """Send a PUBLISH; a future of the final reason code for QoS 1/2 (pipelined use)."""
        if qos == 0:
            self.send(Publish(topic, payload, 0, retain, properties=properties))
            return None
        pid = self._pid()
        ack: asyncio.Future[Puback] | asyncio.Future[Pubrec]
        ack = self._wait(Puback, pid) if qos == 1 else self._wait(Pubrec, pid)
        self.send(Publish(topic, payload, qos, retain, packet_id=pid, properties=properties))
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_ack(f: asyncio.Future[Puback] | asyncio.Future[Pubrec]) -> None:
            if done.done():
                return
            exc = f.exception()
            if exc is not None:
                done.set_exception(exc)
                return
            code = f.result().reason_code
            if qos == 1 or code >= 0x80:
                done.set_result(code)
                return
            comp = self._wait(Pubcomp, pid)
            self.send(Pubrel(pid))
            comp.add_done_callback(on_comp)

        def on_comp(f: asyncio.Future[Pubcomp]) -> None:
            if done.done():
                return
            exc = f.exception()
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(f.result().reason_code)

        ack.add_done_callback(on_ack)
        return done

    async def subscribe(
        self, topic_filter: str, qos: int = 0, timeout: float = 10.0, **opts: Any
    ) -> list[int]:
        pid = self._pid()
        fut = self._wait(Suback, pid)
        self.send(Subscribe(pid, [Subscription(topic_filter, qos, **opts)]))
        return list((await asyncio.wait_for(fut, timeout)).reason_codes)

    async def unsubscribe(self, topic_filter: str, timeout: float = 10.0) -> list[int]:
        pid = self._pid()
        fut = self._wait(Unsuback, pid)
        self.send(Unsubscribe(pid, [topic_filter]))
        return list((await asyncio.wait_for(fut, timeout)).reason_codes)

    def close(self) -> None:
        """Finish this stream (FIN); on a data stream that ends only this stream."""
        self.client._send(self.stream_id, b"", end_stream=True)

    # incoming -----------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        for packet in self.decoder.feed(data):
            self._on_packet(packet)

    def _on_packet(self, p: Packet) -> None:
        client = self.client
        # `type(p) is X` narrows p for mypy (the decoder gives only these exact classes).
        if type(p) is Publish:
            if p.packet_id is not None:  # QoS 1 or 2
                self.send(Puback(p.packet_id) if p.qos == 1 else Pubrec(p.packet_id))
            client.messages.put_nowait((self.stream_id, p))
            return
        if type(p) is Pubrel:
            self.send(Pubcomp(p.packet_id))
            return
        if type(p) is Connack:
            if client._connack is not None and not client._connack.done():
                client._connack.set_result(p)
            return
        if type(p) is Disconnect:
            client.disconnect_packet = p
            return
        if type(p) is Pingresp:
            client.pingresps += 1
            return
        pid = getattr(p, "packet_id", None)
        fut = self._waiters.pop((p.type, pid), None) if pid is not None else None
        if fut is not None and not fut.done():
            fut.set_result(p)

    def _fail(self, exc: Exception) -> None:
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(exc)
        self._waiters.clear()


class _Protocol(QuicConnectionProtocol):
    def __init__(self, quic: QuicConnection, client: QuicClient) -> None:
        super().__init__(quic)
        self.client = client

    def quic_event_received(self, event: events.QuicEvent) -> None:
        self.client._on_event(event)

    def transmit(self) -> None:
        # One transmit covers what a scheduled one (``_transmit_soon``) would have sent.
        task = self._transmit_task
        if task is not None:
            task.cancel()
        super().transmit()


class QuicClient:
    def __init__(
        self,
        host: str,
        port: int,
        client_id: str = "",
        *,
        version: int = MQTT_5,
        keepalive: int = 60,
        clean_start: bool = True,
        username: str | None = None,
        password: bytes | None = None,
        properties: dict[str, Any] | None = None,
        will: Will | None = None,
        session_ticket: SessionTicket | None = None,
        cafile: str | None = None,
        alpn: str = "mqtt",
        local_host: str = "127.0.0.1",
        idle_timeout: float = 60.0,
    ) -> None:
        self.host, self.port = host, port
        self.version = version
        self.connect_packet = Connect(client_id, version, clean_start, keepalive, username,
                                      password, will, properties)  # fmt: skip
        self.local_host = local_host
        conf = QuicConfiguration(
            is_client=True, alpn_protocols=[alpn], idle_timeout=max(idle_timeout, keepalive * 1.5)
        )
        if cafile:
            conf.load_verify_locations(cafile)
        else:
            conf.verify_mode = ssl.CERT_NONE  # as emqtt and NanoSDK do by default
        conf.server_name = host
        conf.session_ticket = session_ticket
        self.configuration = conf
        self.session_ticket: SessionTicket | None = None  # the newest ticket the server issued
        self.messages: asyncio.Queue[tuple[int, Publish]] = asyncio.Queue()
        self.streams: dict[int, MqttStream] = {}
        self.control: MqttStream
        self.connack: Connack | None = None
        self.handshake: events.HandshakeCompleted | None = None
        self.terminated: events.ConnectionTerminated | None = None
        self.disconnect_packet: Disconnect | None = None
        self.pingresps = 0
        self.protocol: _Protocol | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._connack: asyncio.Future[Connack] | None = None
        self._next_sid = 0
        self._closed = asyncio.Event()

    # connection ---------------------------------------------------------------------------

    async def _open_socket(self, local_port: int = 0) -> asyncio.DatagramTransport:
        loop = asyncio.get_running_loop()
        assert self.protocol is not None
        proto = self.protocol
        transport, _ = await loop.create_datagram_endpoint(
            lambda: proto, local_addr=(self.local_host, local_port)
        )
        return transport

    async def connect(
        self,
        timeout: float = 10.0,
        early_data: bool = True,
        before_connect: Callable[[QuicClient], None] | None = None,
    ) -> Connack:
        """Handshake and CONNECT. With a session ticket and ``early_data``, the CONNECT goes in
        0-RTT data, before the handshake completes. ``before_connect`` runs just before the
        CONNECT is sent (after the handshake, or in 0-RTT), e.g. to use data streams early: the
        broker holds them until the CONNACK."""
        quic = QuicConnection(
            configuration=self.configuration, session_ticket_handler=self._store_ticket
        )
        self.protocol = _Protocol(quic, self)
        self._transport = await self._open_socket()
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self.protocol.connect((self.host, self.port), transmit=False)
        # Stream ids are ours to count: aioquic only learns of a stream when data is sent on it,
        # and a data stream may be used before the control stream has sent anything.
        sid = quic.get_next_available_stream_id()
        self._next_sid = sid + 4
        self.control = self.streams[sid] = MqttStream(self, sid)
        quic.send_stream_data(sid, b"")  # opens it in aioquic, which wants streams in order
        if self.configuration.session_ticket is not None and early_data:
            if before_connect is not None:
                before_connect(self)
            self.control.send(self.connect_packet)
            self.protocol.transmit()
        else:
            self.protocol.transmit()
            await asyncio.wait_for(self.protocol.wait_connected(), timeout)
            if before_connect is not None:
                before_connect(self)
            self.control.send(self.connect_packet)
        self.connack = await asyncio.wait_for(self._connack, timeout)
        return self.connack

    def _store_ticket(self, ticket: SessionTicket) -> None:
        self.session_ticket = ticket

    def open_stream(self) -> MqttStream:
        """A new client-initiated bidirectional data stream."""
        sid = self._next_sid
        self._next_sid += 4
        stream = self.streams[sid] = MqttStream(self, sid)
        return stream

    async def migrate(self, local_port: int = 0) -> tuple[str, int]:
        """Move to a new local UDP socket (new port) and keep going on the same connection;
        returns the new local address."""
        assert self.protocol is not None
        old = self._transport
        self._transport = await self._open_socket(local_port)  # sets protocol._transport
        # A fresh connection id for the new path, so the two paths cannot be linked.
        self.protocol.change_connection_id()
        self.protocol.transmit()
        if old is not None:
            old.close()
        return self._transport.get_extra_info("sockname")[:2]

    @property
    def local_address(self) -> tuple[str, int]:
        assert self._transport is not None
        return self._transport.get_extra_info("sockname")[:2]

    async def ping(self, timeout: float = 10.0) -> None:
        n = self.pingresps
        self.control.send(Pingreq())
        deadline = asyncio.get_running_loop().time() + timeout
        while self.pingresps == n:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("no PINGRESP")
            await asyncio.sleep(0.01)

    async def recv(self, timeout: float = 10.0) -> Publish:
        return (await asyncio.wait_for(self.messages.get(), timeout))[1]

    async def disconnect(self, reason: int = 0, timeout: float = 5.0) -> None:
        if self.protocol is None or self.terminated is not None:
            return
        self.control.send(Disconnect(reason))
        self.control.close()
        self.protocol.transmit()
        try:
            await asyncio.wait_for(self._closed.wait(), timeout)
        except TimeoutError:
            self.close()

    def close(self, error_code: int = 0) -> None:
        """Close the QUIC connection now (no DISCONNECT)."""
        if self.protocol is not None and self.terminated is None:
            self.protocol.close(error_code=error_code)

    async def wait_closed(self, timeout: float = 10.0) -> events.ConnectionTerminated:
        await asyncio.wait_for(self._closed.wait(), timeout)
        assert self.terminated is not None
        return self.terminated

    async def aclose(self) -> None:
        """Release everything (for tests and benchmarks)."""
        self.close()
        if self.protocol is not None:
            try:
                await asyncio.wait_for(self._closed.wait(), 2)
            except TimeoutError:
                pass
        if self._transport is not None:
            self._transport.close()

    # plumbing -----------------------------------------------------------------------------

    def _send(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        if self.protocol is None or self.terminated is not None:
            raise QuicMqttError("not connected")
        self.protocol._quic.send_stream_data(sid, data, end_stream)
        self.protocol._transmit_soon()

    def _on_event(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is None:
                # The broker never opens streams; EMQX's clients treat one as fatal.
                self.close(error_code=1)
                return
            if event.data:
                stream._feed(event.data)
            if event.end_stream:
                stream.finished = True
        elif isinstance(event, events.HandshakeCompleted):
            self.handshake = event
        elif isinstance(event, events.ConnectionTerminated):
            self.terminated = event
            exc = QuicMqttError(f"connection closed (0x{event.error_code:x})")
            for s in self.streams.values():
                s._fail(exc)
            if self._connack is not None and not self._connack.done():
                self._connack.set_exception(exc)
            self._closed.set()
            if self._transport is not None:
                self._transport.close()
