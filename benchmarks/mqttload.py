"""Raw-socket MQTT 3.1.1 load generator used by ``throughput.py``.

The generator must cost far less CPU than the broker it loads, so nothing here touches a message
one at a time in Python on the steady path:

* publishers send pre-encoded PUBLISH frames in large batches with one ``sendall``;
* every frame of one stream has the same length (same topic length, same payload), so a receive
  buffer is checked and counted with strided slices (C speed) instead of walking it frame by
  frame; QoS 1 PUBACKs are assembled from the same strided slices;
* anything unexpected (a frame of another type or length) falls back to a plain header walk, so
  counts stay exact even if a broker sends something we did not plan for.

Workers run in separate processes (``multiprocessing``, fork) and talk to the parent through
queues: a setup report when connected and subscribed, then one result dict when done.
"""

from __future__ import annotations

import select
import selectors
import socket
import struct
import time
import traceback
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from typing import Any

HOST = "127.0.0.1"
RECV_SIZE = 1 << 20
MAX_PARTIAL = 1 << 16  # room kept for an incomplete packet between reads
# Socket operations time out so that a stalled broker cannot hang a run forever.
SOCK_TIMEOUT = 10.0
SETUP_TIMEOUT = 30.0
# Readers nap between reads that bring in only a few messages, so that one wake-up handles many
# messages and the generator stays cheap. Subscribers adapt their nap to read about BIG_READ
# frames per socket, up to MAX_NAP. Waiting for more data in the kernel instead (SO_RCVLOWAT)
# stalls for 40 ms at a time against a broker that uses Nagle's algorithm (mosquitto's
# default): its next segment waits for our ACK, and Linux delays that ACK until we read.
NAP = 0.0005
MAX_NAP = 0.005
BIG_READ = 64

DISCONNECT = b"\xe0\x00"


class LoadError(RuntimeError):
    """The broker answered something the benchmark cannot work with."""


# --- encoding (only at setup time, never per message) --------------------------------------------


def _vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str, clean: bool = True) -> bytes:
    # MQTT 3.1.1, keepalive 0 (off) so no PINGREQ is ever needed. Clean session 0 makes the
    # session persistent (the broker stores its deliveries).
    flags = 0x02 if clean else 0
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 0) + _utf8(client_id)
    return b"\x10" + _vbi(len(body)) + body


def subscribe_packet(packet_id: int, topic_filter: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + _utf8(topic_filter) + bytes([qos])
    return b"\x82" + _vbi(len(body)) + body


def publish_packet(topic: str, payload: bytes, qos: int, packet_id: int = 0) -> bytes:
    body = _utf8(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | qos << 1]) + _vbi(len(body)) + body


# --- setup-time I/O -------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise LoadError("broker closed the connection during setup")
        data += chunk
    return bytes(data)


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    first = _recv_exact(sock, 1)[0]
    length, shift = 0, 0
    while True:
        b = _recv_exact(sock, 1)[0]
        length |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            break
    return first, _recv_exact(sock, length)


def open_client(port: int, client_id: str, clean: bool = True) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=SETUP_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id, clean))
    first, body = _read_packet(sock)
    if first != 0x20 or len(body) != 2 or body[1] != 0:
        raise LoadError(f"bad CONNACK for {client_id}: {first:#x} {body.hex()}")
    sock.settimeout(SOCK_TIMEOUT)
    return sock


def subscribe(sock: socket.socket, topic_filter: str, qos: int) -> None:
    sock.sendall(subscribe_packet(1, topic_filter, qos))
    first, body = _read_packet(sock)
    if first != 0x90 or body[:2] != b"\x00\x01" or body[2:] != bytes([qos]):
        raise LoadError(f"bad SUBACK for {topic_filter!r} qos {qos}: {first:#x} {body.hex()}")


# --- steady-state counting ------------------------------------------------------------------------


class FrameCounter:
    """Counts frames of one packet type in a socket's byte stream; builds PUBACKs if asked.

    Every expected frame is ``frame`` bytes long and starts with ``prefix`` (fixed header, and
    for PUBLISH the topic length), give or take the DUP flag. The fast path checks each prefix
    byte of every frame in a buffer with one strided slice per byte; if any check fails the
    buffer is walked header by header instead.
    """

    def __init__(self, prefix: bytes, frame: int, pid_at: int = -1) -> None:
        self.kind = prefix[0] >> 4
        self.frame = frame
        self.count = 0
        self.other = 0  # frames of another type (should stay 0; reported as a warning)
        self.slow = 0  # buffers that needed the header walk
        self.recvs = 0  # recv calls: count / recvs shows how well reads are batched
        self._prefix = prefix
        self._pid_at = pid_at  # where a QoS 1 PUBLISH frame's packet id is; -1: send no PUBACKs
        self._buf = bytearray(RECV_SIZE + MAX_PARTIAL)
        self._view = memoryview(self._buf)
        self._filled = 0

    @classmethod
    def for_publish(cls, topic: str, payload_len: int, qos: int) -> FrameCounter:
        """Counts the PUBLISHes a subscriber gets (and acknowledges them at QoS 1)."""
        frame = publish_packet(topic, bytes(payload_len), qos, 1)
        topic_len = len(topic.encode())
        header = 1 + len(_vbi(2 + topic_len + (2 if qos else 0) + payload_len))
        return cls(frame[: header + 2], len(frame), header + 2 + topic_len if qos else -1)

    @classmethod
    def for_puback(cls) -> FrameCounter:
        return cls(b"\x40\x02", 4)

    def feed(self, sock: socket.socket) -> int:
        """One ``recv``; count what completed; send PUBACKs. Returns bytes read (0 on EOF)."""
        start = self._filled
        n = sock.recv_into(self._view[start : start + RECV_SIZE], RECV_SIZE)
        if not n:
            return 0
        self.recvs += 1
        end = start + n
        consumed, acks = self._process(end)
        rest = end - consumed
        if rest > MAX_PARTIAL:
            raise LoadError(f"a packet of more than {MAX_PARTIAL} bytes from the broker")
        if rest:
            self._buf[:rest] = self._buf[consumed:end]
        self._filled = rest
        if acks:
            sock.sendall(acks)
        return n

    def _process(self, end: int) -> tuple[int, bytes]:
        buf, fl, prefix = self._buf, self.frame, self._prefix
        n = end // fl
        stop = n * fl
        if n:
            heads = buf[0:stop:fl]
            ok = heads.count(prefix[0]) + heads.count(prefix[0] | 0x08) == n
            for i in range(1, len(prefix)):
                ok = ok and buf[i:stop:fl].count(prefix[i]) == n
            if ok:
                self.count += n
                at = self._pid_at
                if at < 0:
                    return stop, b""
                acks = bytearray(4 * n)
                acks[0::4] = b"\x40" * n
                acks[1::4] = b"\x02" * n
                acks[2::4] = buf[at:stop:fl]
                acks[3::4] = buf[at + 1 : stop : fl]
                return stop, bytes(acks)
        self.slow += 1
        return self._walk(end)

    def _walk(self, end: int) -> tuple[int, bytes]:
        buf = self._buf
        acks = bytearray()
        i = 0
        while i + 2 <= end:
            first = buf[i]
            length, shift, j = 0, 0, i + 1
            while True:
                if j >= end:
                    return i, bytes(acks)
                b = buf[j]
                j += 1
                length |= (b & 0x7F) << shift
                shift += 7
                if b < 0x80:
                    break
                if shift > 21:
                    raise LoadError("malformed remaining length from broker")
            if j + length > end:
                break
            if first >> 4 == self.kind:
                self.count += 1
                if self._pid_at >= 0 and (first >> 1) & 3:
                    tl = buf[j] << 8 | buf[j + 1]
                    acks += b"\x40\x02" + buf[j + 2 + tl : j + 4 + tl]
            else:
                self.other += 1
            i = j + length
        return i, bytes(acks)


# --- workers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    warmup: float
    duration: float
    # After the window a subscriber stops once it has every message published, or after this long
    # without data (messages were lost), or in any case drain_max after the window.
    quiet: float
    drain_max: float


@dataclass
class Control:
    """What the parent shares with every worker of one run (inherited through fork)."""

    timing: Timing
    ready: Queue  # ("ok" | "error", text) once connected (and subscribed)
    results: Queue  # one dict per worker at the end
    go: Event
    # time.monotonic() at which the load starts: CLOCK_MONOTONIC is the same in every process.
    start_at: Synchronized
    # progress[i]: messages sent by publisher i, then messages received by each subscriber process.
    progress: Any
    done: Any  # done[i] set once publisher i has sent its last message
    publishers: int
    sub_sizes: list[int]  # subscriber connections in each subscriber process
    # Publishers hold back while a subscriber process is, per connection, more than this many
    # messages behind what was published; 0 means no limit (open loop).
    max_outstanding: int

    def behind(self) -> int:
        """Messages published but not yet received, per connection of the slowest process."""
        p, n = self.progress, self.publishers
        return sum(p[:n]) - min(p[n + j] // size for j, size in enumerate(self.sub_sizes))

    def all_sent(self) -> int | None:
        """Messages published in all, once every publisher is done; None before."""
        if all(self.done[: self.publishers]):
            return sum(self.progress[: self.publishers])
        return None

    def wait_go(self) -> float:
        if not self.go.wait(SETUP_TIMEOUT * 2):
            raise LoadError("never told to start")
        return float(self.start_at.value)

    def setup_failed(self, who: str) -> None:
        self.ready.put(("error", f"{who}: {traceback.format_exc()}"))


def run_publisher(
    index: int,
    name: str,
    port: int,
    topic: str,
    payload: bytes,
    qos: int,
    window: int,
    batch: int,
    ctl: Control,
) -> None:
    """Publish as fast as the broker (and the end-to-end limit) allows until the window closes."""
    try:
        sock = open_client(port, name)
        plan = _Plan(topic, payload, qos, window, batch)
    except Exception:
        ctl.setup_failed(name)
        return
    ctl.ready.put(("ok", name))
    try:
        t_stop = ctl.wait_go() + ctl.timing.warmup + ctl.timing.duration
        result = _publish(sock, index, plan, t_stop, ctl)
        sock.sendall(DISCONNECT)
        sock.close()
        ctl.results.put({"role": "pub", "name": name, **result})
    except Exception:
        ctl.results.put({"role": "pub", "name": name, "error": traceback.format_exc()})


class _Plan:
    """A publisher's pre-encoded traffic: every batch is a slice of one block.

    QoS 1 uses packet ids 1..ids; brokers acknowledge in order, so with at most ``window``
    (< ids) unacknowledged no id is reused while still in flight. Batches of at most half a
    window keep the pipe full while waiting for acks.
    """

    def __init__(self, topic: str, payload: bytes, qos: int, window: int, batch: int) -> None:
        self.qos = qos
        if qos:
            self.window = max(2, window)
            self.batch = max(1, min(batch, self.window // 2))
            ids = (65535 // self.batch) * self.batch
            packets = (publish_packet(topic, payload, 1, pid) for pid in range(1, ids + 1))
            self.block = memoryview(b"".join(packets))
        else:
            self.window = 0
            self.batch = ids = max(1, batch)
            self.block = memoryview(publish_packet(topic, payload, 0) * ids)
        self.step = len(self.block) // ids * self.batch
        self.nbatches = ids // self.batch


def _publish(
    sock: socket.socket, index: int, plan: _Plan, t_stop: float, ctl: Control
) -> dict[str, int]:
    qos, window, batch, step, view = plan.qos, plan.window, plan.batch, plan.step, plan.block
    acks = FrameCounter.for_puback()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    progress, limit, behind = ctl.progress, ctl.max_outstanding - batch, ctl.behind
    sent = k = held = 0
    clock = time.monotonic
    last_ack = clock()
    while clock() < t_stop:
        if ctl.max_outstanding and behind() > limit:
            # Subscribers are behind: wait for them rather than pile messages up in the broker.
            held += 1
            time.sleep(NAP)
            continue
        if qos and sent - acks.count + batch > window:
            if poller.poll(200):
                if not acks.feed(sock):
                    raise LoadError("broker closed the publisher connection")
                last_ack = clock()
                if sent - acks.count + batch > window:
                    time.sleep(NAP)  # let the rest of the acks arrive; see NAP
            elif clock() - last_ack > SOCK_TIMEOUT:
                raise LoadError(f"no PUBACK for {SOCK_TIMEOUT}s ({sent - acks.count} unacked)")
            continue
        sock.sendall(view[k * step : (k + 1) * step])
        sent += batch
        progress[index] = sent
        k = (k + 1) % plan.nbatches
    ctl.done[index] = 1
    if qos:
        # Collect the outstanding acks: they prove the broker took every message.
        deadline = clock() + ctl.timing.drain_max
        while acks.count < sent and clock() < deadline:
            if poller.poll(200) and not acks.feed(sock):
                break
        if acks.other:
            raise LoadError(f"{acks.other} unexpected packets on a publisher connection")
    return {"sent": sent, "acked": acks.count, "recvs": acks.recvs, "held": held}


def run_subscribers(
    index: int,
    name: str,
    port: int,
    count: int,
    topic_filter: str,
    topic: str,
    payload_len: int,
    qos: int,
    ctl: Control,
    clean: bool = True,
) -> None:
    """``count`` subscriber connections in one process; counts PUBLISHes inside the window.

    Every message is expected on a topic as long as ``topic``, with ``payload_len`` bytes.
    ``clean`` False: persistent sessions (the broker stores what it delivers to them)."""
    socks: list[socket.socket] = []
    try:
        for i in range(count):
            sock = open_client(port, f"{name}-{i}", clean)
            socks.append(sock)
            subscribe(sock, topic_filter, qos)
    except Exception:
        ctl.setup_failed(name)
        return
    ctl.ready.put(("ok", name))
    try:
        result = _subscribe_loop(socks, index, topic, payload_len, qos, ctl)
        for sock in socks:
            try:
                sock.sendall(DISCONNECT)
            except OSError:
                pass
            sock.close()
        ctl.results.put({"role": "sub", "name": name, **result})
    except Exception:
        ctl.results.put({"role": "sub", "name": name, "error": traceback.format_exc()})


def _subscribe_loop(
    socks: list[socket.socket],
    index: int,
    topic: str,
    payload_len: int,
    qos: int,
    ctl: Control,
) -> dict[str, Any]:
    counters = [FrameCounter.for_publish(topic, payload_len, qos) for _ in socks]
    sel = selectors.DefaultSelector()
    for sock, counter in zip(socks, counters, strict=True):
        sel.register(sock, selectors.EVENT_READ, counter)
    nap = 0.0
    slot = ctl.publishers + index
    timing = ctl.timing
    t0 = ctl.wait_go() + timing.warmup
    t1 = t0 + timing.duration
    hard_end = t1 + timing.drain_max
    received = 0
    snap0 = snap1 = -1
    clock = time.monotonic
    last_data = now = clock()
    closed = 0
    drain_cut = False
    while True:
        events = sel.select(0.05)
        got = received
        for key, _ in events:
            counter = key.data
            before = counter.count
            if not counter.feed(key.fileobj):
                sel.unregister(key.fileobj)
                closed += 1
            received += counter.count - before
        ctl.progress[slot] = received
        now = clock()
        if events:
            last_data = now
            if received - got < BIG_READ * len(events):
                nap = min(MAX_NAP, nap * 1.25 + 0.0001)
            else:
                nap *= 0.8
            if nap > 0.0001:
                time.sleep(nap)
        if snap0 < 0 and now >= t0:
            snap0 = received
        if snap1 < 0 and now >= t1:
            snap1 = received
        if snap1 >= 0:
            published = ctl.all_sent()
            if published is not None and received >= published * len(socks):
                break
            if now - max(last_data, t1) > timing.quiet:
                break
        if now > hard_end:
            drain_cut = True
            break
        if closed == len(socks):
            raise LoadError("broker closed every subscriber connection")
    return {
        "window": snap1 - snap0,
        "after_window": received - snap1,
        "drain_cut": drain_cut,
        "total": received,
        "other": sum(c.other for c in counters),
        "slow": sum(c.slow for c in counters),
        "recvs": sum(c.recvs for c in counters),
        "closed": closed,
    }
