"""asyncio adapter: bytes from a stream socket into a broker channel, and back.

Writes are coalesced per event-loop turn: a fan-out that hands one connection many PUBLISHes in
one turn becomes one ``transport.write`` (one syscall) instead of one per message.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import cast

from roost.broker.channel import Channel
from roost.broker.node import Broker
from roost.transport.tls import peer_cn

log = logging.getLogger("roost.transport")

# Bytes a connection may have waiting in its send buffer before deliveries to it are queued in
# its session instead (where max_mqueue_len bounds them).
WRITE_HIGH_WATER = 1 << 20

# Seconds a connection the broker closes stays half-open, its input read and dropped, waiting
# for the client to close first. Closing at once would leave the client's next bytes to a
# closed socket, whose reset makes the client's write fail before it reads the DISCONNECT.
LINGER = 2.0
MAX_FLUSH = 20.0  # at most this long for a slow client to read what precedes our last packet


class ListenerState:
    """Counters shared by the connections of one listener (for limits and metrics)."""

    def __init__(self, name: str, max_connections: int, cert_as_username: bool = False) -> None:
        self.name = name
        self.max_connections = max_connections
        #: Use the verified client certificate's CN as the MQTT username (TLS listeners).
        self.cert_as_username = cert_as_username
        self.connections = 0
        self.refused = 0


class CoalescedWrites:
    """Collects what a channel writes in one event-loop turn; ``_flush`` sends it as one write.
    Subclasses set ``_pending`` to None in their ``__init__``; slots, as there is one per
    connection."""

    __slots__ = ("_pending",)
    _pending: list[bytes] | None

    def write(self, data: bytes) -> None:
        pending = self._pending
        if pending is None:
            self._pending = [data]
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            pending.append(data)

    def _flush(self) -> None:
        raise NotImplementedError


class MqttStreamProtocol(CoalescedWrites, asyncio.Protocol):
    __slots__ = ("_closing", "_linger", "broker", "channel", "listener", "transport")

    def __init__(self, broker: Broker, listener: ListenerState) -> None:
        self.broker = broker
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.channel: Channel | None = None
        self._pending: list[bytes] | None = None
        self._closing = False
        self._linger: asyncio.TimerHandle | None = None

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
        peer = transport.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        cn = None
        if lst.cert_as_username:
            cn = peer_cn(transport.get_extra_info("peercert"))
        self.channel = Channel(self.broker, self, peer_s, lst.name, cn)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self.channel is not None and not self._closing:
            self.channel.data_received(data)

    def eof_received(self) -> bool | None:
        return None  # the client closed (or answered our half-close): close our side too

    def pause_writing(self) -> None:
        if self.channel is not None:
            self.channel.pause_writing()

    def resume_writing(self) -> None:
        if self.channel is not None:
            self.channel.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self.channel is not None:
            self.listener.connections -= 1
            self.channel.connection_lost()
            self.channel = None

    # channel side -------------------------------------------------------------------------

    def _flush(self) -> None:
        pending = self._pending
        self._pending = None
        t = self.transport
        if pending and t is not None and not t.is_closing():
            t.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if self._closing and t is not None:
            self._shut_down(t)

    def close(self) -> None:
        """Close after the bytes written so far (e.g. a DISCONNECT) are on their way."""
        if self._closing:
            return
        self._closing = True
        if self._pending is None and self.transport is not None:
            self._shut_down(self.transport)

    def _shut_down(self, t: asyncio.Transport) -> None:
        """Half-close once the buffer is sent, then linger before the full close.

        MQTT 5 3.14.4 has the sender of a DISCONNECT close the connection; a graceful close is
        still one. Reading goes on, and what comes is dropped, so the client's writes do not
        fail before it reads our last packet. The client closing ends it; else LINGER does.
        TLS has no half-close here: its close sends close_notify and reads until the client's,
        bounded by the listener's ssl_shutdown_timeout.
        """
        if t.is_closing() or self._linger is not None:
            return
        if not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        self._linger = asyncio.get_running_loop().call_later(LINGER, self._linger_done, t, 0.0)

    def _linger_done(self, t: asyncio.Transport, waited: float) -> None:
        # A slow reader may still be taking in what came before the DISCONNECT: closing now
        # would stop reading its acks, and the reset that follows would lose that tail. A
        # client that writes but never reads gets no more than LINGER (abuse).
        waited += LINGER
        if t.get_write_buffer_size() and waited < MAX_FLUSH and not t.is_closing():
            self._linger = asyncio.get_running_loop().call_later(
                LINGER, self._linger_done, t, waited)  # fmt: skip
            return
        t.close()


async def start_tcp_listener(
    broker: Broker,
    name: str,
    host: str,
    port: int,
    max_connections: int,
    ssl_context: ssl.SSLContext | None = None,
    cert_as_username: bool = False,
) -> asyncio.Server:
    state = ListenerState(name, max_connections, cert_as_username)
    broker.listener_states[name] = state
    loop = asyncio.get_running_loop()
    # A client that stalls its TLS handshake holds a socket; give up on it after 10 s. Closing,
    # wait as long for the client's close_notify as a plain connection lingers.
    tls = ssl_context is not None
    return await loop.create_server(
        lambda: MqttStreamProtocol(broker, state), host, port, ssl=ssl_context, reuse_address=True,
        backlog=1024, ssl_handshake_timeout=10.0 if tls else None,
        ssl_shutdown_timeout=LINGER if tls else None,
    )  # fmt: skip
