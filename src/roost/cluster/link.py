"""Node-to-node links: one TCP connection per pair of nodes, speaking MQTT 5.

Topology: the node whose name sorts lower dials, the other accepts. An accepted link from the
dialling (lower) node replaces any older link from it (it reconnected); a link offered by the
higher node while we have or are dialling one is refused, so the pair keeps the link dialled
by the lower name.

Handshake: CONNECT with client_id = node name, password = the shared link secret and user
properties ``roost-cluster`` = cluster name and ``roost-to`` = the node meant to be reached; the
acceptor compares the secret in constant time and answers CONNACK 0 (with user property
``roost-node`` = its name, checked by the dialler), or 0x86 (bad secret) / 0x87 (wrong cluster,
bad name, meant for another node) and closes. 0x89 refuses a second link between a pair.

Forwards are PUBLISHes with the original topic, payload, retain flag and properties. Our user
properties come first, in this order: ``roost-g`` (shared group + filter, only for a forward to
one member of a shared subscription), ``roost-o`` (origin node), ``roost-m`` (message id, hex),
``roost-p`` (``<tick hex> <client id>``: the publisher and its place in the cluster's logical
clock, by which a moved session keeps each publisher's order; only to a peer whose handshake
announced ``roost-order``, so an older version never sees it), ``roost-q`` (original QoS).
QoS 0 messages travel at QoS 0; QoS 1/2 ones at QoS 1, PUBACKed by the receiver once
``on_forward`` returned. Receivers de-duplicate QoS 1 forwards on (origin, id).

Flow control, per peer: at most ``window`` QoS 1 forwards unacknowledged (the Receive Maximum
both sides announce, the smaller wins); the rest wait in a FIFO queue together with any QoS 0
forwards behind them (one queue keeps the order). The queue holds ``max_queue`` entries before
QoS 0 forwards are dropped (counted in ``dropped_qos0``). QoS 1/2 forwards are queued even past
``max_queue``: dropping them would break the at-least-once promise, and the broker bounds them
upstream, since it holds each publisher's PUBACK until its forwards are acknowledged.

RPC: a PUBLISH QoS 0 on ``$roost/rpc/<kind>`` with correlation data; the answer is a PUBLISH on
``$roost/reply`` with the same correlation data, and on failure user property ``roost-error``.
Both carry ``roost-c``, the sender's logical clock, which the receiver's clock moves past: the
node a session moves to ticks past everything its old home published for it.

Hot path: writes are coalesced (what one event-loop turn sends to a peer goes out in one
write); forwards are encoded with ``encode_publish``; every complete frame of a read is handled
in one pass, forwards and PUBACKs parsed in place (our user properties are matched as bytes),
everything else (handshake, pings, RPC) decoded by the codec.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from roost.broker.message import RecentIds
from roost.config import parse_bind
from roost.mqtt import MQTT_5, Connack, Connect, Decoder, MQTTError, Packet, encode, encode_publish
from roost.mqtt import properties as P
from roost.mqtt.packets import Puback, Publish
from roost.mqtt.primitives import decode_varint, encode_string, encode_varint
from roost.mqtt.properties import decode_properties, encode_properties

log = logging.getLogger("roost.cluster.link")

#: Largest frame either side accepts once authenticated (session hand-overs can be MBs).
MAX_PACKET = 64 << 20
#: Largest frame an acceptor takes before the peer has authenticated.
PREAUTH_MAX_PACKET = 64 << 10
#: Bytes buffered in a link's transport before forwards wait in the peer's queue instead.
WRITE_HIGH_WATER = 1 << 20
#: Seconds an accepted connection may take to authenticate, and a dial to complete.
HANDSHAKE_TIMEOUT = 10.0
#: QoS 1 message ids remembered per origin for de-duplication (at least twice the window).
DEDUP_MEMORY = 16384
_MIN_BACKOFF = 0.05
_MAX_BACKOFF = 2.0  # after connection failures
_MAX_REFUSED_BACKOFF = 10.0  # after the peer refused us: a configuration error, not a blip
_REFUSAL_LOG_EVERY = 60.0

_PINGREQ = b"\xc0\x00"
_PINGRESP = b"\xd0\x00"
_DISCONNECT = b"\xe0\x00"
_RPC_PREFIX = "$roost/rpc/"
_REPLY_TOPIC = "$roost/reply"
_ERROR_PROP = "roost-error"
#: Both sides' handshakes announce it; forwards carry ``roost-p`` only to a peer that did.
_TAKES_ORDER = ("roost-order", "1")
_CLOCK_PROP = "roost-c"  # on every RPC request and reply: the sender's logical clock, in hex


@dataclass(slots=True)
class Forward:
    """One message for one peer. ``origin`` and ``mid`` identify it cluster-wide."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    props: dict[str, Any] | None
    origin: str
    mid: int
    group: str | None = None
    #: ``b"<tick hex> <client id>"``: the publisher and its logical clock tick (``Message.order``,
    #: carried as bytes, parsed only by a handoff); sent only to peers that announced
    #: ``roost-order`` (an older version would refuse the property).
    order: bytes | None = None
    #: Output-gate token of the original submission: set on what ``peer_down`` returns, so a
    #: replay keeps ``after`` waiters waiting. Leave it 0 on new forwards.
    token: int = 0


class LinkError(Exception):
    """A request failed: no link, timeout, link lost, or an error reported by the peer."""


# ---------------------------------------------------------------------------- wire helpers


def _user_prop(name: str, value: str) -> bytes:
    return b"\x26" + encode_string(name) + encode_string(value)


# Our user properties' leading bytes: id 0x26, then the 7-byte name with its length.
_GROUP_HEAD = b"\x26" + encode_string("roost-g")
_ORIGIN_HEAD = b"\x26" + encode_string("roost-o")
_MID_HEAD = b"\x26" + encode_string("roost-m")
_ORDER_HEAD = b"\x26" + encode_string("roost-p")
_QOS_HEAD = b"\x26" + encode_string("roost-q") + b"\x00\x01"  # and one digit
_QOS_PROPS = tuple(_user_prop("roost-q", str(q)) for q in range(3))
_HEAD = len(_GROUP_HEAD)  # 10


def _remaining_length(view: bytes, start: int, n: int) -> tuple[int, int]:
    """The fixed header's remaining length and where the body starts; (0, -1) if cut off."""
    length = 0
    for i in range(4):
        if start + i >= n:
            return 0, -1
        byte = view[start + i]
        length |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            return length, start + i + 1
    raise MQTTError("remaining length longer than 4 bytes")


_Parsed = tuple["Forward", int | None]


def _value(view: bytes, p: int) -> tuple[bytes, int]:
    """The value of the user property whose name ends at ``p``, and the position after it."""
    end = p + 2 + ((view[p] << 8) | view[p + 1])
    return view[p + 2 : end], end


def _parse_forward(first: int, view: bytes, pos: int, end: int) -> _Parsed | None:
    """Parse a forward PUBLISH (body at ``pos``..``end``) into (Forward, packet id or None).

    None if it is a PUBLISH but no forward (RPC traffic, for the codec). Our user properties
    lead the property block in a fixed order, so they are matched as bytes, not decoded.
    """
    if first & 0x06 == 0x06:
        raise MQTTError("PUBLISH with QoS 3")
    topic_end = pos + 2 + ((view[pos] << 8) | view[pos + 1])
    p = topic_end
    pid = None
    if first & 0x06:
        pid = (view[p] << 8) | view[p + 1]
        p += 2
    plen = view[p]
    if plen < 0x80:
        p += 1
    else:
        plen, p = decode_varint(view, p, end)
    props_end = p + plen
    group = None
    if view.startswith(_GROUP_HEAD, p):
        raw, p = _value(view, p + _HEAD)
        group = raw.decode()
    if not view.startswith(_ORIGIN_HEAD, p):
        return None
    raw, p = _value(view, p + _HEAD)
    origin = raw.decode()
    if not view.startswith(_MID_HEAD, p):
        raise MQTTError("forward without roost-m")
    raw, p = _value(view, p + _HEAD)
    mid = int(raw, 16)
    order = None
    if view.startswith(_ORDER_HEAD, p):
        order, p = _value(view, p + _HEAD)
    if not view.startswith(_QOS_HEAD, p):
        raise MQTTError("forward without roost-q")
    qos = view[p + _HEAD + 2] - 0x30
    p += _HEAD + 3
    if not 0 <= qos <= 2 or p > props_end or props_end > end or topic_end > end or pid == 0:
        raise MQTTError("malformed forward")
    props = None
    if p < props_end:  # the publisher's own properties
        props, _ = decode_properties(encode_varint(props_end - p) + view[p:props_end], 0,
                                     P.PUBLISH)  # fmt: skip
    topic = view[pos + 2 : topic_end].decode()
    fwd = Forward(topic, view[props_end:end], qos, bool(first & 1), props, origin, mid, group,
                  order)  # fmt: skip
    return fwd, pid


def _props_body(props: dict[str, Any]) -> bytes:
    """The encoded property block without its length prefix (ours are prepended to it)."""
    block = encode_properties(props)
    _, start = decode_varint(block, 0)
    return block[start:]


def _puback(pid: int, code: int) -> bytes:
    if code:
        return bytes((0x40, 3, pid >> 8, pid & 0xFF, code))
    return bytes((0x40, 2, pid >> 8, pid & 0xFF))


def _first_prop(ups: list[tuple[str, str]] | None, name: str) -> str | None:
    for k, v in ups or ():
        if k == name:
            return v
    return None


# ---------------------------------------------------------------------------- output gate


class _Gate:
    """Unresolved QoS>=1 forwards by token, and the ``after`` callbacks waiting for them.

    Tokens are 1, 2, 3... in submission order; a callback registered when ``submitted`` was S
    runs once every token <= S is resolved, i.e. once the lowest open token exceeds S. A token
    is a count, so a forward replayed to several nodes is resolved when all of them acked.
    """

    __slots__ = ("_low", "_open", "_waiters", "submitted")

    def __init__(self) -> None:
        self.submitted = 0
        self._open: dict[int, int] = {}
        self._low = 1  # lowest token that may still be open
        self._waiters: deque[tuple[int, Callable[[], None]]] = deque()

    def new(self) -> int:
        self.submitted += 1
        token = self.submitted
        self._open[token] = 1
        return token

    def hold(self, token: int) -> bool:
        """Count one more forward against an open token; False once it is resolved."""
        n = self._open.get(token)
        if n is None:
            return False
        self._open[token] = n + 1
        return True

    def release(self, token: int) -> None:
        n = self._open[token] - 1
        if n:
            self._open[token] = n
            return
        del self._open[token]
        if token == self._low:
            self._advance()

    def after(self, callback: Callable[[], None]) -> None:
        if not self._waiters and self._low > self.submitted:
            callback()
            return
        self._waiters.append((self.submitted, callback))

    def _advance(self) -> None:
        low, open_, top = self._low, self._open, self.submitted
        while low <= top and low not in open_:
            low += 1
        self._low = low
        waiters = self._waiters
        while waiters and waiters[0][0] < low:
            callback = waiters.popleft()[1]
            try:
                callback()
            except Exception:
                log.exception("callback after forwards were acknowledged failed")


# ---------------------------------------------------------------------------- peer state


class _Peer:
    """What we keep about one peer across its connections: queue, in-flight forwards, stats."""

    __slots__ = (
        "addr", "conn", "dialer", "dialing", "dropped_qos0", "duplicates_dropped", "forwards_acked",
        "forwards_received", "forwards_replayed", "forwards_sent", "gone", "inflight", "name",
        "next_pid", "queue", "up", "window",
    )  # fmt: skip

    def __init__(self, name: str, window: int) -> None:
        self.name = name
        self.addr: str | None = None
        self.conn: _Link | None = None  # the authenticated connection, if any
        self.dialer: asyncio.Task[None] | None = None
        self.dialing = False
        self.gone = False  # declared dead by peer_down
        self.up = asyncio.Event()  # set while conn is not None (or once gone, to wake waiters)
        # FIFO of (forward, gate token) not yet sent; token 0 for QoS 0 (and ungated replays).
        self.queue: deque[tuple[Forward, int]] = deque()
        # packet id -> (forward, gate token, encoded frame), in send order.
        self.inflight: dict[int, tuple[Forward, int, bytes]] = {}
        self.window = window
        self.next_pid = 1
        self.forwards_sent = 0
        self.forwards_received = 0
        self.forwards_acked = 0
        self.forwards_replayed = 0
        self.duplicates_dropped = 0
        self.dropped_qos0 = 0


class _Link(asyncio.Protocol):
    """One TCP connection to a peer: framing, coalesced writes, keepalive. ``expect`` is the
    peer we dialled (None on accepted connections until the CONNECT names it)."""

    def __init__(self, links: Links, expect: str | None) -> None:
        self.links = links
        self.expect = expect
        self.loop = asyncio.get_running_loop()
        self.peer: _Peer | None = None
        self.transport: asyncio.Transport | None = None
        # The codec decodes what is off the hot path; _receive frames and parses forwards.
        self.decoder = (
            Decoder(MAX_PACKET, version=MQTT_5, server_side=False)
            if expect is not None
            else Decoder(MAX_PACKET, server_side=True)
        )
        self.rx = bytearray()  # the incomplete frame at the end of the last read
        self.need = 0  # its length, once its header is in
        self.max_in = MAX_PACKET if expect is not None else PREAUTH_MAX_PACKET
        self.pending: list[bytes] | None = None
        self.pending_bytes = 0
        self.paused = False
        self.closing = False
        self.closed = False
        self.keepalive = links.keepalive
        self.max_out = MAX_PACKET  # the peer's maximum packet size
        self.remote_window = 65535
        self.takes_order = False  # the peer announced roost-order: forwards may carry roost-p
        self.started = self.last_rx = self.loop.time()
        self.timer: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.ready: asyncio.Future[None] = self.loop.create_future()  # authenticated

    @property
    def label(self) -> str:
        if self.peer is not None:
            return self.peer.name
        if self.expect is not None:
            return self.expect
        t = self.transport
        peer = t.get_extra_info("peername") if t is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    # asyncio side -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server's protocol gets a Transport; BaseTransport is only the base signature.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.links._conns.add(self)
        self.started = self.last_rx = self.loop.time()
        self.timer = self.loop.call_later(self.keepalive / 2, self._tick)
        if self.expect is not None:
            self.write(self.links._connect_frame(self.expect))

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        rx = self.rx
        if rx:
            rx += data
            if len(rx) < self.need:
                return  # still inside one large frame: do not re-parse it per read
            view = bytes(rx)  # one copy, so frames and payloads slice out as bytes
            rx.clear()
        else:
            view = data
        try:
            pos = self.links._receive(self, view)
        except (MQTTError, ValueError, IndexError) as e:
            # The stream cannot be re-framed after a bad frame.
            if not self.closed:
                log.warning("link %s: bad frame (%s); closing it", self.label, e)
                self.abort()
            return
        if pos < len(view):
            rx += view[pos:]

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        peer = self.peer
        if peer is not None and peer.conn is self and peer.queue:
            self.links._drain(peer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending = None
        if self.timer is not None:
            self.timer.cancel()
        self.links._conns.discard(self)
        if not self.ready.done():
            self.ready.set_exception(LinkError(f"link to {self.label} closed during handshake"))
            self.ready.exception()  # retrieved: nobody may be waiting any more
        if not self.lost.done():
            self.lost.set_result(None)
        self.links._link_lost(self)

    # our side ---------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        pending = self.pending
        if pending is None:
            if self.closing or self.closed:
                return  # after close(): nothing more goes out
            self.pending = [data]
            self.pending_bytes = len(data)
            self.loop.call_soon(self._flush)
        else:
            pending.append(data)
            self.pending_bytes += len(data)

    def _flush(self) -> None:
        pending = self.pending
        self.pending = None
        self.pending_bytes = 0
        t = self.transport
        if t is None or self.closed or t.is_closing():
            return
        if pending:
            t.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if self.closing:
            t.close()
            return
        # A drain stops at WRITE_HIGH_WATER bytes per turn; continue it if the socket keeps up.
        peer = self.peer
        if peer is not None and peer.queue and not self.paused and peer.conn is self:
            self.links._drain(peer)

    def close(self) -> None:
        """Close once what was written so far is on its way (e.g. a refusing CONNACK)."""
        if self.closing or self.closed:
            return
        self.closing = True
        if self.pending is None and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _tick(self) -> None:
        """Keepalive: the dialler pings every keepalive/2; silence for keepalive means dead."""
        if self.closed:
            return
        idle = self.loop.time() - self.last_rx
        if self.peer is None and self.loop.time() - self.started > HANDSHAKE_TIMEOUT:
            log.warning("link %s did not authenticate in time; closing it", self.label)
            self.abort()
            return
        if idle >= self.keepalive:
            log.warning("link to %s silent for %.1f s; closing it", self.label, idle)
            self.abort()
            return
        if self.expect is not None and self.peer is not None:
            self.write(_PINGREQ)
        self.timer = self.loop.call_later(self.keepalive / 2, self._tick)


# ---------------------------------------------------------------------------- the links


class Links:
    """All links of one node. See the module docstring for the protocol.

    ``on_forward`` gets every forward addressed to this node (once per origin and message id
    for QoS>=1). ``on_request(origin, kind, payload)`` answers requests; its exceptions become
    error replies. ``ack_gate``, if given (e.g. the store's ``after``), is called with a callback
    that sends the PUBACKs of the forwards just delivered: it may delay it until what
    ``on_forward`` stored is durable.
    """

    def __init__(
        self,
        node: str,
        cluster: str,
        secret: bytes,
        on_forward: Callable[[Forward], None],
        on_request: Callable[[str, str, bytes], Awaitable[bytes]],
        window: int = 1024,
        max_queue: int = 100_000,
        keepalive: float = 5.0,
        ack_gate: Callable[[Callable[[], None]], None] | None = None,
        dedup_memory: int = DEDUP_MEMORY,
    ) -> None:
        if not 1 <= window <= 65535:
            raise ValueError("window must be 1..65535 (MQTT Receive Maximum)")
        self.node = node
        self.cluster = cluster
        self.secret = secret.encode() if isinstance(secret, str) else bytes(secret)
        self.window = window
        self.max_queue = max_queue
        self.keepalive = keepalive
        self._on_forward = on_forward
        self._on_request = on_request
        self._ack_gate = ack_gate
        self._dedup_memory = max(dedup_memory, 2 * window)
        self._peers: dict[str, _Peer] = {}
        self._wanted: set[str] = set()
        self._conns: set[_Link] = set()  # every open connection, authenticated or not
        self._seen: dict[str, RecentIds] = {}
        self._gate = _Gate()
        #: The commit source for the broker's output gate (``submitted`` and ``after``), the
        #: gate itself rather than this object's properties: it is read once per packet.
        self.commit_source = self._gate
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._calls: dict[bytes, tuple[asyncio.Future[bytes], _Link]] = {}
        self._next_call = 0
        self._closed = False
        self._refusals: dict[str, float] = {}  # refusal reason -> when last logged
        # Message ids: a random per-start epoch above a 48-bit per-process counter.
        self._mid_base = secrets.randbits(32) << 48
        self._mid = 0
        self._clock = 0  # hybrid logical clock, in microseconds: see tick()
        self._origin_props: dict[str, bytes] = {node: _user_prop("roost-o", node)}
        self._connack_ok = encode(
            Connack(0, False, {
                "receive_maximum": window, "maximum_packet_size": MAX_PACKET,
                "user_property": [("roost-node", node), _TAKES_ORDER],
            }),
            MQTT_5,
        )  # fmt: skip

    def _connect_frame(self, to: str) -> bytes:
        props = {
            "receive_maximum": self.window, "maximum_packet_size": MAX_PACKET,
            "user_property": [("roost-cluster", self.cluster), ("roost-to", to), _TAKES_ORDER],
        }  # fmt: skip
        connect = Connect(client_id=self.node, protocol_version=MQTT_5, clean_start=True,
                          keepalive=max(1, round(self.keepalive)), password=self.secret,
                          properties=props)  # fmt: skip
        return encode(connect, MQTT_5)

    # ------------------------------------------------------------------------ lifecycle

    async def start(self, bind: str) -> tuple[str, int]:
        """Listen for links; returns the bound (host, port), so port 0 is fine."""
        host, port = parse_bind(bind)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Link(self, None), host, port, reuse_address=True, backlog=128
        )
        return self._server.sockets[0].getsockname()[:2]

    def set_peers(self, peers: dict[str, str]) -> None:
        """The nodes to keep links with (name -> "host:port"). We dial the ones whose names sort
        above ours. Removed peers' links are closed, but their unacknowledged forwards stay
        until ``peer_down`` (or a reconnection) settles them."""
        wanted: set[str] = set()
        for name, addr in peers.items():
            if name == self.node:
                continue
            wanted.add(name)
            known = self._peers.get(name)
            peer = known if known is not None else self._add_peer(name)
            peer.addr = addr
        for name in self._wanted - wanted:
            gone = self._peers.get(name)
            if gone is not None:
                self._disconnect(gone)
        self._wanted = wanted
        for name in wanted:
            peer = self._peers[name]
            if name > self.node and (peer.dialer is None or peer.dialer.done()):
                peer.dialer = asyncio.get_running_loop().create_task(self._dial_loop(peer))

    async def close(self) -> None:
        self._closed = True
        if self._server is not None:
            self._server.close()
        tasks = list(self._tasks)
        for peer in self._peers.values():
            if peer.dialer is not None:
                tasks.append(peer.dialer)
        for task in tasks:
            task.cancel()
        for conn in list(self._conns):
            if conn.peer is not None:
                conn.write(_DISCONNECT)
            conn.close()
        for fut, _ in self._calls.values():
            if not fut.done():
                fut.set_exception(LinkError("links closed"))
        await asyncio.gather(*tasks, return_exceptions=True)
        # Let the DISCONNECTs go out, but do not wait on a peer that stopped reading.
        for _ in range(100):
            if not self._conns:
                break
            await asyncio.sleep(0.01)
        for conn in list(self._conns):
            conn.abort()
        if self._server is not None:
            await self._server.wait_closed()

    # ------------------------------------------------------------------------ forwards

    def new_mid(self) -> int:
        """A message id never used before by this node, not even before a restart."""
        self._mid += 1
        return self._mid_base | self._mid

    def tick(self) -> int:
        """The next tick of this node's logical clock: above every tick before it here and
        every clock a peer's RPC showed (a session that moved here was taken over by one), and
        no lower than the wall clock, so it is comparable across nodes, in particular across a
        publisher's move from one to another."""
        t = self._clock = max(self._clock + 1, time.time_ns() // 1000)
        return t

    def _observe(self, props: dict[str, Any]) -> None:
        clock = _first_prop(props.get("user_property"), _CLOCK_PROP)
        if clock is not None:
            with contextlib.suppress(ValueError):
                self._clock = max(self._clock, int(clock, 16))

    def _clock_prop(self) -> list[tuple[str, str]]:
        return [(_CLOCK_PROP, f"{max(self._clock, time.time_ns() // 1000):x}")]

    @property
    def submitted(self) -> int:
        """QoS>=1 forwards ever submitted: the broker compares it across handling a packet."""
        return self._gate.submitted

    def after(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once every QoS>=1 forward submitted so far is acknowledged (or was
        declared lost); at once if none is outstanding. Callbacks run in registration order."""
        self._gate.after(callback)

    def forward(self, node: str, fwd: Forward) -> None:
        """Send ``fwd`` to ``node``, or queue it while the link is down or the window full."""
        peer = self._peers.get(node)
        if peer is None:
            if node == self.node:
                raise ValueError("cannot forward to this node itself")
            peer = self._add_peer(node)
        conn = peer.conn
        queue = peer.queue
        if fwd.qos:
            token = fwd.token
            if token:
                peer.forwards_replayed += 1
                if not self._gate.hold(token):
                    token = 0  # its waiters were already released: nothing left to gate
            else:
                token = self._gate.new()
            if conn is None or conn.paused or queue or len(peer.inflight) >= peer.window:
                queue.append((fwd, token))
            else:
                self._send_qos1(peer, conn, fwd, token)
        elif conn is None or conn.paused or queue:
            if len(queue) >= self.max_queue:
                peer.dropped_qos0 += 1
            else:
                queue.append((fwd, 0))
        else:
            self._send_qos0(peer, conn, fwd)

    def hold(self, token: int) -> bool:
        """Keep a replayed forward's ``after`` waiters waiting for one more thing; False when
        they were released already. ``release`` ends the hold."""
        return self._gate.hold(token)

    def release(self, token: int) -> None:
        self._gate.release(token)

    def peer_down(self, node: str) -> list[Forward]:
        """Forget ``node`` (its lease is gone): close its link and return its unacknowledged
        and queued QoS>=1 forwards, to replay with ``forward`` along current routes.

        The returned forwards carry their gate token: ``after`` waiters stay blocked until the
        replays are acknowledged. Replay them before yielding to the event loop; whatever was
        not replayed by the end of this loop turn counts as lost and stops blocking them.
        """
        peer = self._peers.pop(node, None)
        self._wanted.discard(node)
        if peer is None:
            return []
        peer.gone = True
        peer.up.set()  # wake requests waiting for it: they fail
        self._disconnect(peer)
        out: list[Forward] = []
        tokens: list[int] = []
        entries = [(f, t) for f, t, _ in peer.inflight.values()]
        entries.extend(e for e in peer.queue if e[0].qos)
        for f, t in entries:
            out.append(Forward(f.topic, f.payload, f.qos, f.retain, f.props, f.origin, f.mid,
                               f.group, f.order, t))  # fmt: skip
            if t:
                tokens.append(t)
        peer.inflight.clear()
        peer.queue.clear()
        if tokens:
            asyncio.get_running_loop().call_soon(self._release_tokens, tokens)
        return out

    def _release_tokens(self, tokens: list[int]) -> None:
        release = self._gate.release
        for t in tokens:
            release(t)

    def _add_peer(self, name: str) -> _Peer:
        peer = self._peers[name] = _Peer(name, self.window)
        return peer

    def _next_pid(self, peer: _Peer) -> int:
        pid = peer.next_pid
        inflight = peer.inflight
        while pid in inflight:
            pid = pid + 1 if pid < 65535 else 1
        peer.next_pid = pid + 1 if pid < 65535 else 1
        return pid

    def _frame(self, fwd: Forward, pid: int | None, conn: _Link) -> bytes:
        origin = self._origin_props.get(fwd.origin)
        if origin is None:
            origin = self._origin_props[fwd.origin] = _user_prop("roost-o", fwd.origin)
        mid = b"%x" % fwd.mid
        parts = [origin, _MID_HEAD, len(mid).to_bytes(2, "big"), mid, _QOS_PROPS[fwd.qos]]
        order = fwd.order
        if order is not None and conn.takes_order:
            parts.insert(4, _ORDER_HEAD + len(order).to_bytes(2, "big") + order)
        if fwd.group is not None:
            parts.insert(0, _GROUP_HEAD + encode_string(fwd.group))
        if fwd.props:
            parts.append(_props_body(fwd.props))
        body = b"".join(parts)
        return encode_publish(fwd.topic.encode(), fwd.payload, 1 if pid else 0, fwd.retain, False,
                              pid, encode_varint(len(body)) + body)  # fmt: skip

    def _too_large(self, conn: _Link, fwd: Forward, frame: bytes) -> bool:
        # The peer would drop the link on it, again at every resend: drop the forward instead.
        if len(frame) <= conn.max_out:
            return False
        log.warning("forward on %r of %d bytes exceeds %s's maximum packet size; dropped",
                    fwd.topic, len(frame), conn.label)  # fmt: skip
        return True

    def _send_qos0(self, peer: _Peer, conn: _Link, fwd: Forward) -> None:
        frame = self._frame(fwd, None, conn)
        if self._too_large(conn, fwd, frame):
            return
        conn.write(frame)
        peer.forwards_sent += 1

    def _send_qos1(self, peer: _Peer, conn: _Link, fwd: Forward, token: int) -> None:
        pid = self._next_pid(peer)
        frame = self._frame(fwd, pid, conn)
        if self._too_large(conn, fwd, frame):
            if token:
                self._gate.release(token)
            return
        peer.inflight[pid] = (fwd, token, frame)
        conn.write(frame)
        peer.forwards_sent += 1

    def _drain(self, peer: _Peer) -> None:
        """Send queued forwards as far as the window and this turn's write budget allow."""
        conn = peer.conn
        if conn is None or conn.paused:
            return
        queue, inflight, window = peer.queue, peer.inflight, peer.window
        while queue and conn.pending_bytes < WRITE_HIGH_WATER:
            fwd, token = queue[0]
            if fwd.qos:
                if len(inflight) >= window:
                    return
                queue.popleft()
                self._send_qos1(peer, conn, fwd, token)
            else:
                queue.popleft()
                self._send_qos0(peer, conn, fwd)

    # ------------------------------------------------------------------------ receiving

    def _receive(self, link: _Link, view: bytes) -> int:
        """Handle every complete frame in ``view``, in order; return where its incomplete tail
        starts. Forwards and PUBACKs are parsed here (the hot path), the rest by the codec."""
        peer = link.peer
        n = len(view)
        pos = 0
        acks: list[bytes] | None = None
        acked = False
        while n - pos >= 2 and not link.closing:
            first = view[pos]
            b = view[pos + 1]
            if b < 0x80:
                body = pos + 2
                end = body + b
            elif n - pos > 2 and view[pos + 2] < 0x80:  # two-byte length: most forwards
                body = pos + 3
                end = body + ((b & 0x7F) | (view[pos + 2] << 7))
            else:
                length, body = _remaining_length(view, pos + 1, n)
                if body < 0:
                    link.need = 0
                    break
                end = body + length
            if end - pos > link.max_in:
                raise MQTTError(f"frame of {end - pos} bytes exceeds {link.max_in}")
            if end > n:
                link.need = end - pos
                break
            parsed = (
                _parse_forward(first, view, body, end)
                if first >> 4 == 3 and peer is not None
                else None
            )
            if parsed is not None and peer is not None:  # parsed only with a peer
                fwd, pid = parsed
                peer.forwards_received += 1
                if pid is None:
                    self._deliver(fwd)
                else:
                    if acks is None:
                        acks = []
                    acks.append(_puback(pid, self._deliver_once(peer, fwd)))
            elif first == 0x40 and peer is not None:
                if end - body < 2:
                    raise MQTTError("PUBACK without a packet id")
                entry = peer.inflight.pop((view[body] << 8) | view[body + 1], None)
                if entry is not None:
                    peer.forwards_acked += 1
                    acked = True
                    if entry[1]:
                        self._gate.release(entry[1])
            else:
                for packet in link.decoder.feed(view[pos:end]):
                    self._on_packet(link, packet)
                peer = link.peer
            pos = end
        if acks is not None:
            self._send_acks(link, acks)
        if acked and peer is not None and peer.queue and peer.conn is link:
            self._drain(peer)
        return pos

    def _deliver_once(self, peer: _Peer, fwd: Forward) -> int:
        """Deliver a QoS 1 forward unless its (origin, id) was seen; the PUBACK reason code."""
        if fwd.group is not None and fwd.group[:1] in ("\x00", "\x01", "\x02"):
            # Addressed to one session that just moved (a relay), or to a dead node's sessions
            # (cluster/orphans.py): the node may have had its direct copy for its other
            # subscribers, so those sessions deduplicate, not us.
            return self._deliver(fwd)
        seen = self._seen.get(fwd.origin)
        if seen is None:
            seen = self._seen[fwd.origin] = RecentIds(self._dedup_memory)
        if seen.add(fwd.mid):
            return self._deliver(fwd)
        peer.duplicates_dropped += 1
        return 0

    def _deliver(self, fwd: Forward) -> int:
        """Hand a forward to the local broker; the PUBACK reason code to answer with."""
        try:
            self._on_forward(fwd)
        except Exception:
            log.exception("delivering a forward on %r from %s failed", fwd.topic, fwd.origin)
            return 0x80
        return 0

    def _send_acks(self, link: _Link, acks: list[bytes]) -> None:
        data = b"".join(acks)
        if self._ack_gate is None:
            link.write(data)
        else:
            self._ack_gate(lambda: link.write(data))

    def _on_packet(self, link: _Link, p: Packet) -> None:
        """A frame off the hot path, decoded by the codec: handshake, pings, RPC, DISCONNECT."""
        peer = link.peer
        t = p.type
        if peer is None:
            self._handshake(link, p)
        elif type(p) is Publish:  # type 3 (`type(p) is` narrows p for mypy)
            if p.topic.startswith("$roost/"):
                self._on_control(link, p)
            else:
                log.warning("link to %s sent a PUBLISH that is no forward", peer.name)
        elif type(p) is Puback:  # with a reason code or properties (not ours, but valid)
            entry = peer.inflight.pop(p.packet_id, None)
            if entry is not None:
                peer.forwards_acked += 1
                if entry[1]:
                    self._gate.release(entry[1])
        elif t == 12:
            link.write(_PINGRESP)
        elif t == 13:
            pass
        elif t == 14:
            log.info("link to %s disconnected by the peer", peer.name)
            link.close()
        else:
            log.warning("link to %s sent %s; closing it", peer.name, type(p).__name__)
            link.abort()

    # ------------------------------------------------------------------------ handshake

    def _handshake(self, link: _Link, first: Packet) -> None:
        """The first packet of a connection: CONNECT on accepted ones, CONNACK on dialled ones."""
        if link.expect is None and isinstance(first, Connect):
            self._on_connect(link, first)
        elif link.expect is not None and isinstance(first, Connack):
            self._on_connack(link, first)
        else:
            log.warning("link %s began with %s; closing it", link.label, type(first).__name__)
            link.abort()

    def _refuse(self, link: _Link, code: int, why: str) -> None:
        # A misconfigured node retries every few seconds: say it loudly once a minute.
        now = link.loop.time()
        if now - self._refusals.get(why, -_REFUSAL_LOG_EVERY) >= _REFUSAL_LOG_EVERY:
            if len(self._refusals) > 1000:
                self._refusals.clear()
            self._refusals[why] = now
            log.warning("refused a link from %s: %s", link.label, why)
        else:
            log.debug("refused a link from %s: %s", link.label, why)
        link.write(encode(Connack(code), MQTT_5))
        link.close()

    def _on_connect(self, link: _Link, c: Connect) -> None:
        name = c.client_id
        ups = c.properties.get("user_property")
        cluster = _first_prop(ups, "roost-cluster")
        to = _first_prop(ups, "roost-to")
        if not hmac.compare_digest(c.password or b"", self.secret):
            self._refuse(link, 0x86, f"node {name!r} gave a wrong link secret")
            return
        if cluster != self.cluster:
            self._refuse(link, 0x87, f"node {name!r} is in cluster {cluster!r}, not ours")
            return
        if c.protocol_version != MQTT_5 or not name or name == self.node:
            self._refuse(link, 0x87, f"bad node name {name!r}")
            return
        if to != self.node:
            # A stale address (e.g. a reused pod IP): refuse before it displaces a good link.
            self._refuse(link, 0x87, f"node {name!r} meant to reach {to!r}, not us")
            return
        if self._closed:
            self._refuse(link, 0x89, "this node is shutting down")
            return
        peer = self._peers.get(name)
        if name > self.node and peer is not None and (peer.dialing or peer.conn is not None):
            # Both dialled: keep the link dialled by the lower name, ours.
            log.info("refused a link from %s: we dial it", name)
            link.write(encode(Connack(0x89), MQTT_5))
            link.close()
            return
        if peer is None:
            peer = self._add_peer(name)
        link.takes_order = _TAKES_ORDER in (ups or ())
        link.keepalive = max(self.keepalive, float(c.keepalive or 0))
        link.remote_window = c.properties.get("receive_maximum", 65535)
        link.max_out = c.properties.get("maximum_packet_size", MAX_PACKET)
        link.write(self._connack_ok)
        self._attach(peer, link)

    def _on_connack(self, link: _Link, c: Connack) -> None:
        name = link.expect
        if c.reason_code:
            link.ready.set_exception(LinkError(f"{name} refused the link: 0x{c.reason_code:02x}"))
            link.abort()
            return
        ups = c.properties.get("user_property")
        actual = _first_prop(ups, "roost-node")
        if actual != name:
            link.ready.set_exception(LinkError(f"the address of {name} answers as {actual!r}"))
            link.abort()
            return
        peer = self._peers.get(name) if name is not None else None
        if peer is None or peer.gone:
            link.ready.set_exception(LinkError(f"{name} is no longer a peer"))
            link.abort()
            return
        link.takes_order = _TAKES_ORDER in (ups or ())
        link.remote_window = c.properties.get("receive_maximum", 65535)
        link.max_out = c.properties.get("maximum_packet_size", MAX_PACKET)
        self._attach(peer, link)

    def _attach(self, peer: _Peer, link: _Link) -> None:
        """Make ``link`` the peer's connection: resend what is unacknowledged, then the queue."""
        old = peer.conn
        if old is not None and old is not link:
            log.info("link from %s replaces its previous one", peer.name)
            self._detach(peer)
            old.abort()
        peer.conn = link
        link.peer = link.peer or peer
        link.max_in = MAX_PACKET
        peer.window = min(self.window, link.remote_window)
        for pid, (fwd, token, frame) in list(peer.inflight.items()):
            if fwd.order is not None and not link.takes_order:
                frame = self._frame(fwd, pid, link)  # the peer came back as an older version
            dup = bytes((frame[0] | 0x08,)) + frame[1:]  # DUP flag: the receiver de-duplicates
            peer.inflight[pid] = (fwd, token, dup)
            link.write(dup)
            peer.forwards_replayed += 1
        if not link.ready.done():
            link.ready.set_result(None)
        peer.up.set()
        log.info("link to %s is up", peer.name)
        self._drain(peer)

    def _detach(self, peer: _Peer) -> None:
        link = peer.conn
        if link is None:
            return
        peer.conn = None
        peer.up.clear()
        self._fail_calls(link, f"link to {peer.name} lost")

    def _disconnect(self, peer: _Peer) -> None:
        """Stop dialling ``peer`` and close its link."""
        if peer.dialer is not None:
            peer.dialer.cancel()
            peer.dialer = None
        link = peer.conn
        if link is not None:
            self._detach(peer)
            link.write(_DISCONNECT)
            link.close()

    def _link_lost(self, link: _Link) -> None:
        peer = link.peer
        if peer is not None and peer.conn is link:
            log.info("link to %s lost", peer.name)
            self._detach(peer)
        else:
            self._fail_calls(link, f"link to {link.label} lost")

    # ------------------------------------------------------------------------ dialling

    async def _dial_loop(self, peer: _Peer) -> None:
        delay = _MIN_BACKOFF
        failing = False
        while not self._closed and not peer.gone and peer.name in self._wanted:
            conn = peer.conn
            if conn is not None:
                await asyncio.shield(conn.lost)
                continue
            try:
                link = await self._dial(peer)
            except (OSError, LinkError) as e:
                level = logging.DEBUG if failing else logging.WARNING
                log.log(level, "cannot link to %s at %s: %s", peer.name, peer.addr, e)
                failing = True
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                top = _MAX_REFUSED_BACKOFF if isinstance(e, LinkError) else _MAX_BACKOFF
                delay = min(delay * 2, top)
                continue
            failing = False
            since = link.loop.time()
            await asyncio.shield(link.lost)
            if link.loop.time() - since < 1.0:
                # It went down at once: do not hammer the peer.
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, _MAX_BACKOFF)
            else:
                delay = _MIN_BACKOFF

    async def _dial(self, peer: _Peer) -> _Link:
        assert peer.addr is not None
        host, port = parse_bind(peer.addr)
        loop = asyncio.get_running_loop()
        link = _Link(self, peer.name)
        peer.dialing = True
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                await loop.create_connection(lambda: link, host, port)
                await asyncio.shield(link.ready)
        except BaseException:
            link.abort()
            raise
        finally:
            peer.dialing = False
        return link

    # ------------------------------------------------------------------------ requests

    async def request(self, node: str, kind: str, payload: bytes, timeout: float = 5.0) -> bytes:
        """Ask ``node``'s ``on_request`` handler; waits for the link up to ``timeout`` too."""
        peer = self._peers.get(node)
        if peer is None or peer.gone or self._closed:
            raise LinkError(f"no link to {node}")
        corr = self._new_call_id()
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                while peer.conn is None:
                    if peer.gone:
                        raise LinkError(f"{node} is down")
                    await peer.up.wait()
                conn = peer.conn
                props = encode_properties({"correlation_data": corr,
                                           "user_property": self._clock_prop()})  # fmt: skip
                frame = encode_publish((_RPC_PREFIX + kind).encode(), payload, 0, False, False,
                                       None, props)  # fmt: skip
                if len(frame) > conn.max_out:
                    raise LinkError(f"{kind} request of {len(payload)} bytes is too large")
                self._calls[corr] = (fut, conn)
                conn.write(frame)
                return await fut
        except TimeoutError:
            raise LinkError(f"{kind} request to {node} timed out after {timeout} s")
        finally:
            self._calls.pop(corr, None)

    def _new_call_id(self) -> bytes:
        self._next_call += 1
        return self._next_call.to_bytes(8, "big")

    def _fail_calls(self, link: _Link, why: str) -> None:
        for fut, conn in list(self._calls.values()):
            if conn is link and not fut.done():
                fut.set_exception(LinkError(why))

    def _on_control(self, link: _Link, p: Any) -> None:
        corr = p.properties.get("correlation_data")
        if corr is None:
            log.warning("link to %s sent %r without correlation data", link.label, p.topic)
            return
        self._observe(p.properties)
        if p.topic == _REPLY_TOPIC:
            call = self._calls.get(corr)
            if call is None or call[0].done():
                return  # late: the caller gave up
            error = _first_prop(p.properties.get("user_property"), _ERROR_PROP)
            if error is None:
                call[0].set_result(p.payload)
            else:
                call[0].set_exception(LinkError(f"{link.label}: {error}"))
        elif p.topic.startswith(_RPC_PREFIX):
            task = link.loop.create_task(
                self._serve(link, p.topic[len(_RPC_PREFIX) :], p.payload, corr)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            log.warning("link to %s sent unknown control topic %r", link.label, p.topic)

    async def _serve(self, link: _Link, kind: str, payload: bytes, corr: bytes) -> None:
        origin = link.label
        props: dict[str, Any] = {"correlation_data": corr}
        try:
            result = await self._on_request(origin, kind, payload)
            props["user_property"] = self._clock_prop()  # after the handler: e.g. a takeover
            if not isinstance(result, bytes | bytearray):
                raise TypeError(f"{kind} handler returned {type(result).__name__}, not bytes")
            if len(result) + 64 > link.max_out:
                raise LinkError(f"{kind} reply of {len(result)} bytes is too large")
        except Exception as e:
            log.debug("request %s from %s failed: %r", kind, origin, e)
            props["user_property"] = [(_ERROR_PROP, (str(e) or type(e).__name__)[:1000])]
            result = b""
        frame = encode_publish(_REPLY_TOPIC.encode(), bytes(result), 0, False, False, None,
                               encode_properties(props))  # fmt: skip
        link.write(frame)

    # ------------------------------------------------------------------------ stats

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "connected": int(p.conn is not None),
                "forwards_sent": p.forwards_sent,
                "forwards_received": p.forwards_received,
                "forwards_acked": p.forwards_acked,
                "forwards_replayed": p.forwards_replayed,
                "duplicates_dropped": p.duplicates_dropped,
                "queue_depth": len(p.queue),
                "inflight": len(p.inflight),
                "dropped_qos0": p.dropped_qos0,
            }
            for name, p in self._peers.items()
        }


__all__ = ["Forward", "LinkError", "Links"]
