"""MQTT over QUIC, wire-compatible with EMQX 5's QUIC clients, on aioquic or qh3 (quicstack.py).

ALPN ``mqtt``, TLS 1.3. Client bidirectional stream 0 (the first one) is the control stream and
carries the plain MQTT byte stream into an ordinary :class:`Channel`; every later client
bidirectional stream is a data stream driving a :class:`StreamChannel` (see broker/streams.py).
Data streams that open before the CONNACK are held, unread, until CONNECT succeeds. The broker
never opens a stream. Migration is aioquic's (the server follows a client to its new address);
session tickets are kept in memory per listener so returning clients can send CONNECT in 0-RTT.

Close codes (application errors): 0 normal, 1 control stream down, 2 overloaded; takeover and
kick close with the MQTT reason code (0x8E, 0x98) after the DISCONNECT is delivered.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from roost.broker.channel import Channel
from roost.broker.node import Broker
from roost.broker.streams import ControlChannel, StreamChannel
from roost.config import QuicListener
from roost.mqtt import reason_codes as RC
from roost.transport.quicstack import QuicStack, load
from roost.transport.tcp import WRITE_HIGH_WATER
from roost.transport.tls import resolve_cert

if TYPE_CHECKING:
    # The checker sees aioquic's protocol as the mixin's base (qh3's has the same API); at run
    # time protocol_class puts the chosen stack's protocol after the mixin.
    from aioquic.asyncio.protocol import QuicConnectionProtocol as _StackProtocol
else:
    _StackProtocol = object

log = logging.getLogger("roost.transport")

ALPN = "mqtt"
CLOSE_NORMAL = 0
CLOSE_CONTROL_STREAM_DOWN = 1
CLOSE_OVERLOADED = 2
#: Server DISCONNECT reasons that also become the QUIC close code (as EMQX does): session
#: taken over (0x8E) and administrative action, i.e. kicked (0x98).
_CLOSE_WITH_REASON = (RC.SESSION_TAKEN_OVER, RC.ADMINISTRATIVE_ACTION)
#: Idle timeout we advertise: long, so the client's own setting decides until CONNECT; after it
#: the broker applies keepalive x 1.5 on its side.
_ADVERTISED_IDLE = 3 * 3600.0
#: Seconds the QUIC idle timeout runs past keepalive x 1.5 (the broker ticks every 0.5 s).
_IDLE_MARGIN = 1.0
#: Seconds a connection gets to deliver a readable ClientHello (lost ones are resent sooner).
_BOGUS_AFTER = 3.0
#: How long a closing connection waits for its last bytes (e.g. DISCONNECT) to be acknowledged.
_CLOSE_GRACE = 3.0


class QuicListenerState:
    def __init__(self, name: str, cfg: QuicListener) -> None:
        self.name = name
        self.cfg = cfg
        self.connections = 0
        self.refused = 0
        self.accepting = True
        self.live = 0  # QUIC connection objects, handshaken or not (garbage Initials too)
        self.early_data_accepted = 0  # connections whose 0-RTT data the server took
        # Session tickets of the listener's stack (aioquic's or qh3's SessionTicket).
        self.tickets: dict[bytes, Any] = {}

    def store_ticket(self, ticket: Any) -> None:
        if len(self.tickets) > 100_000:
            self.tickets.pop(next(iter(self.tickets)))
        self.tickets[ticket.ticket] = ticket

    def fetch_ticket(self, label: bytes) -> Any:
        return self.tickets.pop(label, None)  # single use: a replayed 0-RTT is refused


class _Stream:
    """The channel-side transport of one QUIC stream."""

    __slots__ = ("channel", "conn", "stream_id")

    def __init__(self, conn: _MqttQuic, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.channel: Channel | None = None

    def write(self, data: bytes) -> None:
        conn = self.conn
        if conn.ended:
            return
        quic = conn._quic
        quic.send_stream_data(self.stream_id, data)
        conn._transmit_soon()  # coalesced: one transmit per event-loop turn
        ch = self.channel
        if (ch is not None and not ch.paused
                and conn.stack.unacked(quic, self.stream_id) > WRITE_HIGH_WATER):  # fmt: skip
            # As on TCP: a client that does not keep up gets its deliveries queued in its
            # (bounded) session instead of in aioquic's unbounded stream buffer.
            ch.pause_writing()
            conn.paused.append(self)

    def close(self) -> None:
        self.conn.channel_closed_stream(self.stream_id)


class _MqttQuic(_StackProtocol):
    """One QUIC connection's MQTT side; mixed into the stack's QuicConnectionProtocol by
    :func:`protocol_class`."""

    stack: QuicStack
    # Given by the stack's QuicConnectionProtocol.
    _quic: Any
    _loop: asyncio.AbstractEventLoop
    _transmit_task: asyncio.Handle | None

    def __init__(
        self, quic: Any, *args: Any, broker: Broker, state: QuicListenerState, **kw: Any
    ) -> None:
        super().__init__(quic, *args, **kw)
        self.stack.own_configuration(quic)
        self.broker = broker
        self.state = state
        self.control: ControlChannel | None = None
        self.streams: dict[int, StreamChannel] = {}
        self.held: dict[int, list[tuple[bytes, bool]]] = {}  # data streams before CONNACK
        self.held_bytes = 0
        self.paused: list[_Stream] = []  # streams whose channel waits for acknowledgements
        self.handshake_done = False
        self.negotiated = False  # the ClientHello was read (ALPN agreed)
        self.counted = False
        self.ended = False
        self.peer = ""
        state.live += 1
        self._released = False
        loop = asyncio.get_running_loop()
        self._timer_handshake: asyncio.TimerHandle | None = loop.call_later(
            state.cfg.handshake_idle_timeout, self._handshake_timeout
        )
        # Datagrams that merely look like an Initial (garbage, floods) create a connection too;
        # one whose ClientHello never decrypted is dropped soon instead of after the timeout.
        self._timer_bogus: asyncio.TimerHandle | None = loop.call_later(
            min(_BOGUS_AFTER, state.cfg.handshake_idle_timeout), self._bogus_check
        )
        self._timer_stream: asyncio.TimerHandle | None = None
        self._closing_code: int | None = None  # set once the control channel closed

    # events -------------------------------------------------------------------------------

    def transmit(self) -> None:
        # aioquic transmits right after every datagram; a transmit scheduled by a write during
        # it (``_transmit_soon``) would then run again for nothing.
        task = self._transmit_task
        if task is not None:
            task.cancel()
        try:
            super().transmit()
        except self.stack.connection_error as e:
            # qh3 raises "packet builder capacity exhausted" when it may send no more for now
            # (the anti-amplification limit before the client's address is validated) instead
            # of sending nothing; the connection goes on, and the socket reader must not see it.
            log.debug("QUIC stack sends nothing more for now (%s)", e)
            self._rearm_timer()  # as the stack's transmit would have, had it not raised

    def _rearm_timer(self) -> None:
        p: Any = self  # the stack protocol's timer fields (same names in aioquic and qh3)
        timer_at = self._quic.get_timer()
        if p._timer is not None and p._timer_at != timer_at:
            p._timer.cancel()
            p._timer = None
        if p._timer is None and timer_at is not None:
            p._timer = self._loop.call_at(timer_at, p._handle_timer)
        p._timer_at = timer_at

    def _transmit_soon(self) -> None:
        super()._transmit_soon()

    def close(self, error_code: int = 0, reason_phrase: str = "") -> None:
        # qh3's protocol close() takes no code: close the connection itself on both stacks.
        self._quic.close(error_code=error_code, reason_phrase=reason_phrase)
        self.transmit()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        if self.paused:
            self._resume_acked()

    def datagrams_received(self, data: list[bytes], addr: Any) -> None:
        super().datagrams_received(data, addr)  # type: ignore[misc]  # only qh3 has it (GRO)
        if self.paused:
            self._resume_acked()

    def _resume_acked(self) -> None:
        paused, self.paused = self.paused, []
        for st in paused:
            ch = st.channel
            if ch is None or ch.closed:
                continue
            if self.stack.unacked(self._quic, st.stream_id) <= WRITE_HIGH_WATER // 4:
                ch.resume_writing()  # may pause (and list) it again
            else:
                self.paused.append(st)

    def quic_event_received(self, event: Any) -> None:
        t = type(event)
        events = self.stack.events
        if t is events.StreamDataReceived:
            self._on_stream_data(event.stream_id, event.data, event.end_stream)
        elif t is events.HandshakeCompleted:
            self._on_handshake(event)
        elif t is events.StreamReset or t is events.StopSendingReceived:
            self._on_stream_end(event.stream_id, aborted=True)
        elif t is events.ProtocolNegotiated:
            self.negotiated = True
        elif t is events.ConnectionTerminated:
            self._on_terminated()

    def _on_handshake(self, event: Any) -> None:
        self.handshake_done = True
        if self._timer_handshake is not None:
            self._timer_handshake.cancel()
            self._timer_handshake = None
        state = self.state
        if not state.accepting:
            self._end(CLOSE_NORMAL, "shutting down")
            return
        if state.connections >= state.cfg.max_connections:
            state.refused += 1
            log.warning("listener %s is full (%d connections); refusing", state.name,
                        state.connections)  # fmt: skip
            self._end(CLOSE_OVERLOADED, "overloaded")
            return
        state.connections += 1
        self.counted = True
        if event.early_data_accepted:
            state.early_data_accepted += 1
        if self.control is None and not self.ended:
            self._timer_stream = asyncio.get_running_loop().call_later(
                state.cfg.stream_open_timeout, self._stream_timeout
            )

    def _on_stream_data(self, sid: int, data: bytes, fin: bool) -> None:
        if self.ended or self._closing_code is not None:
            return  # closed, or closing after the control channel ended: nothing more to read
        if sid & 0x3:
            # Server-initiated or unidirectional: MQTT over QUIC does not use them.
            if not sid & 0x1 and sid & 0x2:
                self._quic.stop_stream(sid, 0)
            return
        ch = self.streams.get(sid)
        if ch is not None:
            if data:
                ch.data_received(data)
        elif sid == 0:
            ctl = self.control
            if ctl is None:
                if self._timer_stream is not None:
                    self._timer_stream.cancel()
                    self._timer_stream = None
                self.peer = self.stack.peer(self._quic)
                st = _Stream(self, 0)
                ctl = self.control = ControlChannel(self.broker, st, self.peer, self.state.name)
                st.channel = ctl
            was_connected = ctl.connected
            if data:
                ctl.data_received(data)
            if ctl.connected and not was_connected:
                self._on_connected(ctl)
        else:
            control = self.control
            if control is None or not control.connected:
                self.held_bytes += len(data)
                if self.held_bytes > self.broker.config.mqtt.max_packet_size:
                    log.info("QUIC client %s sent too much before CONNECT; closing", self.peer)
                    self._end(CLOSE_CONTROL_STREAM_DOWN, "too much data before CONNECT")
                    return
                self.held.setdefault(sid, []).append((data, fin))
                return
            st = _Stream(self, sid)
            ch = self.streams[sid] = StreamChannel(control, st, sid)
            st.channel = ch
            if data:
                ch.data_received(data)
        if fin:
            self._on_stream_end(sid, aborted=False)

    def _on_connected(self, control: ControlChannel) -> None:
        """CONNECT succeeded: apply keepalive x 1.5 to the connection, release held streams."""
        ka = control.keepalive
        if ka:
            # The channel itself sends DISCONNECT (keepalive timeout) at keepalive x 1.5; the
            # QUIC idle timeout, a silent close, is the backstop just after it.
            mult = self.broker.config.mqtt.keepalive_multiplier
            self.stack.set_idle_timeout(self._quic, ka * mult + _IDLE_MARGIN)
        held, self.held = self.held, {}
        for sid, chunks in held.items():
            for data, fin in chunks:
                self._on_stream_data(sid, data, fin)

    def _on_stream_end(self, sid: int, aborted: bool) -> None:
        """The client finished or aborted a stream: the control stream ends the connection."""
        if sid == 0:
            if self.control is not None and not self.control.closed:
                self.control.connection_lost()
            if self._closing_code is not None:
                # We were closing anyway (the peer reacts to our STOP_SENDING): keep our code.
                self._end(self._closing_code)
            else:
                self._end(CLOSE_CONTROL_STREAM_DOWN if aborted else CLOSE_NORMAL)
            return
        self.held.pop(sid, None)
        ch = self.streams.pop(sid, None)
        if ch is not None and not ch.closed:
            ch.connection_lost()
        if not self.ended:
            try:
                if aborted:
                    self._quic.reset_stream(sid, 0)
                else:
                    self._quic.send_stream_data(sid, b"", end_stream=True)
            except Exception:  # the stream may already be finished both ways
                pass
            self._transmit_soon()

    # channel side -------------------------------------------------------------------------

    def channel_closed_stream(self, sid: int) -> None:
        """A channel closed its stream (after writing e.g. a DISCONNECT)."""
        if self.ended:
            return
        if sid != 0:
            ch = self.streams.pop(sid, None)
            if ch is not None:
                ch.connection_lost()
            self._quic.send_stream_data(sid, b"", end_stream=True)
            self._transmit_soon()
            return
        control = self.control
        code = CLOSE_NORMAL
        if control is not None and control.close_reason in _CLOSE_WITH_REASON:
            code = control.close_reason
        self._closing_code = code
        self._drop_streams()
        self._quic.send_stream_data(0, b"", end_stream=True)
        if code != CLOSE_NORMAL:
            # As EMQX does: abort the control stream's read side with the reason code.
            self._quic.stop_stream(0, code)
        self.transmit()
        asyncio.get_running_loop().create_task(self._close_when_delivered(code))

    async def _close_when_delivered(self, code: int) -> None:
        deadline = self._loop.time() + _CLOSE_GRACE
        while not self.ended and self._loop.time() < deadline:
            if self.stack.stream_flushed(self._quic, 0):
                break
            await asyncio.sleep(0.02)
        self._end(code)

    # endings ------------------------------------------------------------------------------

    def _drop_streams(self) -> None:
        streams, self.streams = self.streams, {}
        self.held.clear()
        for ch in streams.values():
            if not ch.closed:
                ch.connection_lost()

    def _end(self, code: int, reason: str = "") -> None:
        """Close the QUIC connection with an application error code."""
        if self.ended:
            return
        self.ended = True
        self._cleanup()
        self.close(error_code=code, reason_phrase=reason)

    def _cleanup(self) -> None:
        for timer in (self._timer_handshake, self._timer_stream, self._timer_bogus):
            if timer is not None:
                timer.cancel()
        self._timer_handshake = self._timer_stream = self._timer_bogus = None
        self._drop_streams()
        if self.control is not None and not self.control.closed:
            self.control.connection_lost()
        if self.counted:
            self.counted = False
            self.state.connections -= 1
        if not self._released:
            self._released = True
            self.state.live -= 1

    def _on_terminated(self) -> None:
        self.ended = True
        self._cleanup()

    def _handshake_timeout(self) -> None:
        self._timer_handshake = None
        if not self.handshake_done and not self.ended:
            log.info("QUIC handshake did not complete in time; closing")
            self._end(CLOSE_NORMAL, "handshake timeout")

    def _bogus_check(self) -> None:
        self._timer_bogus = None
        if not self.negotiated and not self.ended:
            self._end(CLOSE_NORMAL)

    def _stream_timeout(self) -> None:
        self._timer_stream = None
        if self.control is None and not self.ended:
            log.info("QUIC client %s opened no stream in time; closing", self.peer)
            self._end(CLOSE_CONTROL_STREAM_DOWN, "no control stream")


_classes: dict[str, type] = {}


def protocol_class(stack: QuicStack) -> type:
    """The connection protocol for ``stack``: our MQTT side over its QuicConnectionProtocol."""
    cls = _classes.get(stack.name)
    if cls is None:
        cls = _classes[stack.name] = type(
            f"MqttQuicProtocol_{stack.name}", (_MqttQuic, stack.protocol), {"stack": stack}
        )
    return cls


class RoostQuicServer:
    """A running QUIC listener: ``close()`` and the bound ``address``."""

    def __init__(self, server: Any, state: QuicListenerState) -> None:
        self.server = server
        self.state = state
        sock = server._transport.get_extra_info("sockname")
        self.address: tuple[str, int] = (sock[0], sock[1])

    def close(self) -> None:
        """Stop taking connections. The socket stays open a moment so the broker's shutdown
        DISCONNECTs (sent right after this) still reach connected clients."""
        self.state.accepting = False
        asyncio.get_running_loop().call_later(0.05, self.server.close)


async def start_quic_listener(
    broker: Broker, name: str, cfg: QuicListener, data_dir: str
) -> RoostQuicServer:
    quic_log = logging.getLogger("quic")
    if quic_log.level == logging.NOTSET:
        quic_log.setLevel(logging.WARNING)  # aioquic logs every connection at INFO
    certfile, keyfile = resolve_cert(cfg.certfile, cfg.keyfile, data_dir)
    stack = load(cfg.stack)
    conf = stack.configuration(
        is_client=False,
        alpn_protocols=[ALPN],
        idle_timeout=_ADVERTISED_IDLE,
        max_datagram_frame_size=None,
    )
    conf.load_cert_chain(certfile, keyfile)
    state = QuicListenerState(name, cfg)
    broker.listener_states[name] = state

    proto = protocol_class(stack)

    def create_protocol(quic: Any, **kw: Any) -> _MqttQuic:
        return proto(quic, broker=broker, state=state, **kw)

    server = await stack.serve(
        cfg.host,
        cfg.port,
        configuration=conf,
        create_protocol=create_protocol,
        session_ticket_fetcher=state.fetch_ticket,
        session_ticket_handler=state.store_ticket,
    )
    return RoostQuicServer(server, state)
