"""Node-to-node links (roost.cluster.link) over real loopback TCP.

Several ``Links`` run in this process, each on its own port; a small TCP relay (``Proxy``) sits
between two of them where a test must cut a connection or hold back one direction of it, and a
hand-written acceptor (``FakePeer``) stands in for a receiver whose reading and acks the test
controls. The one test that needs a receiver whose event loop is blocked runs it in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from roost.cluster.link import WRITE_HIGH_WATER, Forward, LinkError, Links
from roost.mqtt import (
    MQTT_5,
    Connack,
    Connect,
    Decoder,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    encode,
)

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

SECRET = b"link-secret"
CLUSTER = "test"


# ------------------------------------------------------------------------------- helpers


class Node:
    """One ``Links`` and what it received."""

    def __init__(self, name: str, **kw: Any) -> None:
        self.name = name
        self.got: list[Forward] = []
        self.requests: list[tuple[str, str]] = []
        on_forward = kw.pop("on_forward", self.got.append)
        self.links = Links(name, kw.pop("cluster", CLUSTER), kw.pop("secret", SECRET),
                           on_forward, self._on_request, **kw)  # fmt: skip
        self.port = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Node:
        _, self.port = await self.links.start("127.0.0.1:0")
        return self

    async def _on_request(self, origin: str, kind: str, payload: bytes) -> bytes:
        self.requests.append((origin, kind))
        if kind == "reverse":
            return payload[::-1]
        if kind == "fail":
            raise ValueError("no such session")
        if kind == "slow":
            await asyncio.sleep(10)
        return b"?"

    def connected(self, peer: str) -> bool:
        return bool(self.links.stats().get(peer, {}).get("connected"))

    def stat(self, peer: str, name: str) -> int:
        return self.links.stats()[peer][name]


MakeNode = Callable[..., Awaitable[Node]]


@pytest_asyncio.fixture
async def nodes() -> AsyncIterator[MakeNode]:
    made: list[Node] = []

    async def make(name: str, **kw: Any) -> Node:
        node = await Node(name, **kw).start()
        made.append(node)
        return node

    yield make
    for node in made:
        await node.links.close()


async def until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def fwd(links: Links, i: int, qos: int = 1, **kw: Any) -> Forward:
    return Forward(f"t/{i}", b"m%d" % i, qos, False, None, links.node, links.new_mid(), **kw)


def established(ports: set[int]) -> int:
    """TCP connections in ESTABLISHED state whose local port is one of ``ports``."""
    n = 0
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) in ports:
                n += 1
    return n


class Proxy:
    """TCP relay in front of a link listener: cut its connections, or hold one direction
    ("down": dialler to acceptor, "up": acceptor to dialler) of the current ones."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.pipes: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, r1: asyncio.StreamReader, w1: asyncio.StreamWriter) -> None:
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            w1.close()
            return
        pipe: dict[str, Any] = {"down": asyncio.Event(), "up": asyncio.Event(), "writers": (w1, w2)}
        pipe["down"].set()
        pipe["up"].set()
        self.pipes.append(pipe)
        await asyncio.gather(self._relay(r1, w2, pipe["down"]), self._relay(r2, w1, pipe["up"]),
                             return_exceptions=True)  # fmt: skip

    @staticmethod
    async def _relay(r: asyncio.StreamReader, w: asyncio.StreamWriter, gate: asyncio.Event) -> None:
        try:
            while data := await r.read(65536):
                await gate.wait()
                w.write(data)
                await w.drain()
        finally:
            w.close()

    def hold(self, direction: str) -> None:
        for pipe in self.pipes:
            pipe[direction].clear()

    def release(self, direction: str) -> None:
        for pipe in self.pipes:
            pipe[direction].set()

    def kill(self) -> None:
        """Reset every relayed connection; what was held back is lost."""
        for pipe in self.pipes:
            for w in pipe["writers"]:
                w.transport.abort()
            pipe["down"].set()
            pipe["up"].set()
        self.pipes.clear()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        self.kill()


MakeProxy = Callable[[int], Awaitable[tuple[Proxy, str]]]


@pytest_asyncio.fixture
async def proxies() -> AsyncIterator[MakeProxy]:
    made: list[Proxy] = []

    async def make(port: int) -> tuple[Proxy, str]:
        proxy = Proxy(port)
        made.append(proxy)
        return proxy, await proxy.start()

    yield make
    for proxy in made:
        proxy.close()


class FakePeer:
    """A hand-written acceptor: answers the link handshake as ``name``, records the PUBLISHes
    it reads, and acks them only when told to. ``reading`` cleared: it stops reading."""

    def __init__(self, name: str = "z", receive_maximum: int = 65535) -> None:
        self.name = name
        self.receive_maximum = receive_maximum
        self.publishes: list[Publish] = []
        self.acked = 0
        self.reading = asyncio.Event()
        self.reading.set()
        self.writer: asyncio.StreamWriter | None = None
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        dec = Decoder(64 << 20)
        while True:
            await self.reading.wait()
            data = await reader.read(1 << 16)
            if not data:
                break
            for p in dec.feed(data):
                if isinstance(p, Connect):
                    props = {"receive_maximum": self.receive_maximum,
                             "user_property": [("roost-node", self.name)]}  # fmt: skip
                    writer.write(encode(Connack(0, False, props), MQTT_5))
                elif isinstance(p, Publish):
                    self.publishes.append(p)
                elif isinstance(p, Pingreq):
                    writer.write(encode(Pingresp(), MQTT_5))

    def ack(self, n: int) -> None:
        assert self.writer is not None
        for p in self.publishes[self.acked : self.acked + n]:
            if p.qos:
                self.writer.write(encode(Puback(p.packet_id), MQTT_5))  # type: ignore[arg-type]
        self.acked = min(len(self.publishes), self.acked + n)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        if self.server is not None:
            self.server.close()


class LoopThread:
    """An event loop in a thread: a receiver whose loop the test can block."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def run(self, coro: Awaitable[Any]) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))  # type: ignore[arg-type]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# ------------------------------------------------------------------------------- forwards


async def test_forwards_arrive_intact_in_order_both_ways_over_one_connection(
    nodes: MakeNode,
) -> None:
    a, b = await nodes("a"), await nodes("b")
    # Both learn of each other in the same turn: only one connection may result.
    a.links.set_peers({"b": b.addr})
    b.links.set_peers({"a": a.addr})
    props = {
        "content_type": "text/plain", "message_expiry_interval": 30, "payload_format_indicator": 1,
        "response_topic": "reply/here", "correlation_data": b"\x00\x01",
        # The publisher's own user properties, including ones that look like ours.
        "user_property": [("k", "v"), ("roost-g", "not ours"), ("k", "again")],
    }  # fmt: skip
    sent = []
    for i in range(40):
        f = Forward(f"t/{i}", bytes([i]) * i, i % 3, i % 4 == 0, props if i % 2 else None, "a",
                    a.links.new_mid(), "grp $share/grp/t/#" if i % 5 == 0 else None)  # fmt: skip
        sent.append(f)
        a.links.forward("b", f)  # the first half before the link is up: queued
        if i == 19:
            await until(lambda: a.connected("b"), "the link")
    await until(lambda: len(b.got) == 40, "40 forwards at b")
    assert b.got == sent
    back = [fwd(b.links, i, qos=i % 2) for i in range(10)]
    for f in back:
        b.links.forward("a", f)
    await until(lambda: len(a.got) == 10, "10 forwards at a")
    assert a.got == back
    await asyncio.sleep(0.3)
    assert established({a.port, b.port}) == 1
    st = a.links.stats()["b"]
    assert st["connected"] == 1 and st["forwards_sent"] == 40 and st["inflight"] == 0
    assert st["forwards_acked"] == sum(1 for f in sent if f.qos)
    assert b.stat("a", "forwards_received") == 40 and b.stat("a", "duplicates_dropped") == 0


async def test_the_wire_format_from_a_hand_written_dialler_byte_by_byte(nodes: MakeNode) -> None:
    b = await nodes("b")
    reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
    props: dict[str, Any] = {"user_property": [("roost-cluster", CLUSTER), ("roost-to", "b")]}
    writer.write(encode(Connect("a", MQTT_5, password=SECRET, properties=props), MQTT_5))
    dec = Decoder(version=MQTT_5, server_side=False)
    connack: Any = dec.feed(await asyncio.wait_for(reader.read(1000), 5))[0]
    assert connack.reason_code == 0
    assert ("roost-node", "b") in connack.properties["user_property"]
    ours = [("roost-g", "g x/#"), ("roost-o", "a"), ("roost-m", "ff"), ("roost-q", "2")]
    p1 = Publish("x/1", b"one", 1, True, packet_id=7,
                 properties={"user_property": [*ours, ("k", "v")], "content_type": "c"})
    p2 = Publish("x/2", b"\x00" * 300, 0, properties={
        "user_property": [("roost-o", "a"), ("roost-m", "100"), ("roost-q", "0")]})
    data = encode(p1, MQTT_5) + encode(p2, MQTT_5)
    for i in range(len(data)):  # every frame split at every byte
        writer.write(data[i : i + 1])
        await asyncio.sleep(0.0005)
    await until(lambda: len(b.got) == 2, "both forwards")
    assert b.got == [
        Forward("x/1", b"one", 2, True, {"user_property": [("k", "v")], "content_type": "c"}, "a",
                0xFF, "g x/#"),
        Forward("x/2", b"\x00" * 300, 0, False, None, "a", 0x100),
    ]  # fmt: skip
    assert dec.feed(await asyncio.wait_for(reader.read(100), 5)) == [Puback(7)]
    writer.close()


async def test_after_waits_until_the_receiver_handed_the_forward_over(nodes: MakeNode) -> None:
    # b's on_forward blocks its own event loop (in a thread) until the test lets it go.
    handed = threading.Semaphore(0)
    got: list[Forward] = []

    def slow_deliver(f: Forward) -> None:
        assert handed.acquire(timeout=10)
        got.append(f)

    lt = LoopThread()

    async def make_b() -> Node:
        return await Node("b", on_forward=slow_deliver, keepalive=30).start()

    b = await lt.run(make_b())
    try:
        a = await nodes("a", keepalive=30)
        a.links.set_peers({"b": b.addr})
        calls: list[str] = []
        a.links.after(lambda: calls.append("idle"))
        assert calls == ["idle"]  # nothing outstanding: at once
        a.links.forward("b", fwd(a.links, 0, qos=0))
        assert a.links.submitted == 0  # QoS 0 is not gated
        a.links.forward("b", fwd(a.links, 1, qos=1))
        a.links.after(lambda: calls.append("first"))
        assert a.links.submitted == 1
        await until(lambda: a.stat("b", "forwards_sent") == 2, "forwards on the wire")
        await asyncio.sleep(0.3)
        assert calls == ["idle"]
        # b is stuck in its first on_forward: this one reaches it in a later read.
        a.links.forward("b", fwd(a.links, 2, qos=2))
        a.links.after(lambda: calls.append("second"))
        await asyncio.sleep(0.1)
        handed.release()  # the QoS 0 one
        handed.release()  # the first QoS 1 one
        await until(lambda: calls == ["idle", "first"], "the first callback")
        await asyncio.sleep(0.3)
        assert calls == ["idle", "first"]  # the second waits for the QoS 2 forward
        handed.release()
        await until(lambda: calls == ["idle", "first", "second"], "the second callback")
        assert [f.topic for f in got] == ["t/0", "t/1", "t/2"]
    finally:
        for _ in range(5):
            handed.release()
        await lt.run(b.links.close())
        lt.stop()


async def test_ack_gate_delays_pubacks_until_the_receiver_stored_the_forwards(
    nodes: MakeNode,
) -> None:
    held: list[Callable[[], None]] = []  # stands in for the receiving broker's store commit
    a, b = await nodes("a"), await nodes("b", ack_gate=held.append)
    a.links.set_peers({"b": b.addr})
    calls: list[int] = []
    a.links.forward("b", fwd(a.links, 0))
    a.links.after(lambda: calls.append(1))
    await until(lambda: len(b.got) == 1 and bool(held), "delivery, with its PUBACK held")
    await asyncio.sleep(0.2)
    assert calls == [] and a.stat("b", "inflight") == 1
    for release in held:
        release()
    await until(lambda: calls == [1], "the waiter once the gate let the PUBACK go")


async def test_bad_peers_are_refused_and_the_good_link_is_unaffected(
    nodes: MakeNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="roost.cluster.link")
    z = await nodes("z")
    good = await nodes("a")
    wrong_secret = await nodes("b", secret=b"guess")
    wrong_cluster = await nodes("c", cluster="other")
    for n in (good, wrong_secret, wrong_cluster):
        n.links.set_peers({"z": z.addr})
        n.links.forward("z", fwd(n.links, 0))
    # A stale address: "y" is believed to live where z is.
    good.links.set_peers({"z": z.addr, "y": z.addr})
    await until(lambda: len(z.got) == 1, "the good forward")
    await asyncio.sleep(0.5)
    assert [f.origin for f in z.got] == ["a"]
    assert set(z.links.stats()) == {"a"}
    for n in (wrong_secret, wrong_cluster):
        assert not n.connected("z") and n.stat("z", "queue_depth") == 1
    assert not good.connected("y")
    text = caplog.text
    assert "'b' gave a wrong link secret" in text
    assert "'c' is in cluster 'other'" in text
    assert "meant to reach 'y'" in text
    assert "replaces" not in text  # the misaddressed dial did not displace a's link

    # On the wire: a CONNECT with a wrong secret gets CONNACK 0x86, then the socket closes.
    reader, writer = await asyncio.open_connection("127.0.0.1", z.port)
    props = {"user_property": [("roost-cluster", CLUSTER), ("roost-to", "z")]}
    writer.write(encode(Connect("m", MQTT_5, password=b"nope", properties=props), MQTT_5))
    data = await asyncio.wait_for(reader.read(100), 5)
    refusal: Any = Decoder(version=MQTT_5, server_side=False).feed(data)[0]
    assert refusal.reason_code == 0x86
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    writer.close()

    good.links.forward("z", fwd(good.links, 1))
    await until(lambda: len(z.got) == 2, "a later good forward")
    assert good.connected("z") and good.stat("z", "forwards_acked") == 2


# ------------------------------------------------------------------------------- flow control


@pytest.mark.parametrize("receive_maximum, window", [(65535, 100), (30, 30)])
async def test_window_bounds_inflight_and_the_queue_drops_only_qos0(
    nodes: MakeNode, receive_maximum: int, window: int
) -> None:
    a = await nodes("a", window=100, max_queue=1000, keepalive=30)
    fake = FakePeer("z", receive_maximum)
    a.links.set_peers({"z": await fake.start()})
    try:
        await until(lambda: a.connected("z"), "the link")
        qos1 = [fwd(a.links, i) for i in range(600)]
        for f in qos1:
            a.links.forward("z", f)
        await until(lambda: len(fake.publishes) == window, "a window of forwards")
        await asyncio.sleep(0.2)
        assert len(fake.publishes) == window
        st = a.links.stats()["z"]
        assert st["inflight"] == window and st["queue_depth"] == 600 - window
        qos0 = [fwd(a.links, 1000 + i, qos=0) for i in range(1000)]
        for f in qos0:
            a.links.forward("z", f)
        st = a.links.stats()["z"]
        assert st["queue_depth"] == 1000 and st["dropped_qos0"] == 600 - window
        late = [fwd(a.links, 5000 + i) for i in range(10)]
        for f in late:  # QoS>=1 is queued past max_queue: the broker bounds it upstream
            a.links.forward("z", f)
        assert a.stat("z", "queue_depth") == 1010

        fake.ack(20)
        await until(lambda: len(fake.publishes) == window + 20, "20 more after 20 acks")
        await asyncio.sleep(0.2)
        assert len(fake.publishes) == window + 20 and a.stat("z", "inflight") == window
        expected = qos1 + qos0[: 1000 - (600 - window)] + late
        while len(fake.publishes) < len(expected):
            fake.ack(len(fake.publishes))
            await asyncio.sleep(0.01)
        mids = [int(dict(p.properties["user_property"])["roost-m"], 16) for p in fake.publishes]
        assert mids == [f.mid for f in expected]
        assert [p.qos for p in fake.publishes] == [f.qos for f in expected]
    finally:
        fake.close()


async def test_a_receiver_that_stops_reading_bounds_the_senders_memory(nodes: MakeNode) -> None:
    a = await nodes("a", max_queue=200, keepalive=30)
    fake = FakePeer("z")
    a.links.set_peers({"z": await fake.start()})
    try:
        await until(lambda: a.connected("z"), "the link")
        fake.reading.clear()
        payload = b"x" * (64 << 10)
        n = 2000  # 128 MiB if nothing held back
        for i in range(n):
            a.links.forward("z", Forward(f"t/{i}", payload, 0, False, None, "a", i))
            if i % 20 == 0:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.2)
        st = a.links.stats()["z"]
        # Kernel socket buffers plus WRITE_HIGH_WATER hold a few MiB; the rest queued or dropped.
        assert st["forwards_sent"] * len(payload) < 16 * WRITE_HIGH_WATER + (16 << 20)
        assert st["queue_depth"] == 200
        assert st["forwards_sent"] + st["queue_depth"] + st["dropped_qos0"] == n
        fake.reading.set()
        total = st["forwards_sent"] + st["queue_depth"]
        await until(lambda: len(fake.publishes) == total, "everything not dropped", 20)
        assert a.stat("z", "queue_depth") == 0
    finally:
        fake.close()


# ------------------------------------------------------------------------------- failures


async def test_link_drop_resends_unacked_forwards_and_the_receiver_dedups(
    nodes: MakeNode, proxies: MakeProxy
) -> None:
    a, b = await nodes("a"), await nodes("b")
    proxy, via = await proxies(b.port)
    a.links.set_peers({"b": via})
    await until(lambda: a.connected("b") and b.connected("a"), "the link")
    proxy.hold("up")  # b's PUBACKs never reach a
    sent = [fwd(a.links, i) for i in range(50)]
    for f in sent:
        a.links.forward("b", f)
    await until(lambda: len(b.got) == 50, "50 forwards at b")
    assert a.stat("b", "inflight") == 50
    calls: list[int] = []
    a.links.after(lambda: calls.append(1))
    proxy.kill()  # the held PUBACKs die with the connection
    await until(lambda: not a.connected("b"), "a noticing the drop")
    more = [fwd(a.links, 100 + i) for i in range(10)]
    for f in more:  # while the link is down: queued
        a.links.forward("b", f)
    await until(lambda: a.stat("b", "inflight") == 0 and len(b.got) == 60, "resent and acked")
    assert [f.mid for f in b.got] == [f.mid for f in sent + more]  # each once, in order
    assert b.stat("a", "duplicates_dropped") == 50
    assert a.stat("b", "forwards_replayed") == 50
    assert calls == [1]


async def test_a_silent_peer_is_detected_by_keepalive(nodes: MakeNode, proxies: MakeProxy) -> None:
    a, b = await nodes("a", keepalive=0.6), await nodes("b", keepalive=0.6)
    proxy, via = await proxies(b.port)
    a.links.set_peers({"b": via})
    await until(lambda: a.connected("b"), "the link")
    proxy.hold("down")
    proxy.hold("up")  # the TCP connection stays open but nothing gets through
    stalled = time.monotonic()
    f = fwd(a.links, 0)
    a.links.forward("b", f)
    await until(lambda: not a.connected("b"), "a declaring the link dead", 3)
    assert time.monotonic() - stalled < 2.0
    await until(lambda: a.connected("b") and b.got == [f], "a new link delivering the forward")
    await until(lambda: a.stat("b", "inflight") == 0, "its ack")


async def test_peer_down_returns_unacked_forwards_for_replay_and_receivers_dedup(
    nodes: MakeNode, proxies: MakeProxy
) -> None:
    a, b, c = await nodes("a"), await nodes("b"), await nodes("c")
    proxy_b, via_b = await proxies(b.port)
    proxy_c, via_c = await proxies(c.port)
    a.links.set_peers({"b": via_b, "c": via_c})
    await until(lambda: a.connected("b") and a.connected("c"), "both links")
    proxy_b.hold("up")  # b receives but its acks never arrive
    sent = [fwd(a.links, i, qos=1 + i % 2, group="g t/#" if i == 3 else None) for i in range(10)]
    for f in sent:
        a.links.forward("b", f)
    queued = fwd(a.links, 99)
    await until(lambda: len(b.got) == 10, "10 forwards at b")
    a.links.forward("b", queued)  # goes out, unacked like the others
    await until(lambda: len(b.got) == 11, "the 11th")
    sent.append(queued)
    calls: list[str] = []
    a.links.after(lambda: calls.append("acked"))

    proxy_c.hold("up")  # so the test sees the waiter blocked until c's acks arrive
    replay = a.links.peer_down("b")
    key = [(f.topic, f.payload, f.qos, f.retain, f.props, f.origin, f.mid, f.group) for f in sent]
    assert [(f.topic, f.payload, f.qos, f.retain, f.props, f.origin, f.mid, f.group)
            for f in replay] == key  # fmt: skip
    assert "b" not in a.links.stats()
    for f in replay:
        a.links.forward("c", f)
    await until(lambda: len(c.got) == 11, "the replays at c")
    await asyncio.sleep(0.3)
    assert calls == []  # acked by nobody yet: b's acks are lost, c's held
    proxy_c.release("up")
    await until(lambda: calls == ["acked"], "the waiter after c's acks")
    assert [f.mid for f in c.got] == [f.mid for f in sent]
    assert a.stat("c", "forwards_replayed") == 11

    # b was alive after all and comes back: a replay of what it had is dropped there.
    a.links.set_peers({"b": via_b, "c": via_c})
    for f in replay:
        a.links.forward("b", f)
    await until(lambda: a.connected("b") and a.stat("b", "inflight") == 0, "the replays at b")
    assert len(b.got) == 11 and b.stat("a", "duplicates_dropped") == 11


async def test_forwards_peer_down_returns_but_nobody_replays_count_as_lost(nodes: MakeNode) -> None:
    a = await nodes("a")
    a.links.forward("ghost", fwd(a.links, 0))  # never connects: queued
    a.links.forward("ghost", fwd(a.links, 1, qos=0))
    calls: list[int] = []
    a.links.after(lambda: calls.append(1))
    assert a.stat("ghost", "queue_depth") == 2
    replay = a.links.peer_down("ghost")
    assert [f.topic for f in replay] == ["t/0"]  # QoS 0 is not replayed
    assert calls == []  # the caller may still replay them in this turn
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert calls == [1]
    assert a.links.peer_down("ghost") == []


async def test_message_ids_are_unique_across_restarts() -> None:
    first = Links("a", CLUSTER, SECRET, lambda f: None, lambda o, k, p: asyncio.sleep(0, b""))
    restarted = Links("a", CLUSTER, SECRET, lambda f: None, lambda o, k, p: asyncio.sleep(0, b""))
    ids = [first.new_mid() for _ in range(1000)]
    again = [restarted.new_mid() for _ in range(1000)]
    assert len(set(ids)) == 1000 and not set(ids) & set(again)


# ------------------------------------------------------------------------------- requests


async def test_requests_get_replies_errors_and_timeouts(nodes: MakeNode) -> None:
    a, b = await nodes("a"), await nodes("b")
    a.links.set_peers({"b": b.addr})
    b.links.set_peers({"a": a.addr})
    big = bytes(range(256)) * (8 << 10)  # 2 MiB
    # Asked before the link is up: waits for it.
    assert await a.links.request("b", "reverse", big, timeout=5) == big[::-1]
    assert await b.links.request("a", "reverse", b"abc") == b"cba"  # the other way
    assert b.requests[0] == ("a", "reverse") and a.requests[0] == ("b", "reverse")
    with pytest.raises(LinkError, match="no such session"):
        await a.links.request("b", "fail", b"")
    started = time.monotonic()
    with pytest.raises(LinkError, match="timed out"):
        await a.links.request("b", "slow", b"", timeout=0.3)
    assert time.monotonic() - started < 1.5
    with pytest.raises(LinkError, match="no link"):
        await a.links.request("nobody", "reverse", b"")
    assert await a.links.request("b", "reverse", b"still") == b"llits"


async def test_the_publishers_order_travels_only_to_a_peer_that_announced_it(
    nodes: MakeNode,
) -> None:
    """``roost-p`` (publisher and clock tick) reaches a peer of this version; an older one, which
    would refuse the property as malformed, gets the forward without it."""
    a = await nodes("a")
    b = await nodes("b")
    old = FakePeer("z")  # answers the handshake without roost-order, like an older version
    a.links.set_peers({"b": b.addr, "z": await old.start()})
    try:
        await until(lambda: a.connected("b") and a.connected("z"), "both links")
        for peer in ("b", "z"):
            a.links.forward(peer, fwd(a.links, 1, order=b"1234 pub/1"))
        await until(lambda: len(b.got) == 1 and len(old.publishes) == 1, "both forwards")
        assert b.got[0].order == b"1234 pub/1" and b.got[0].topic == "t/1"
        names = [k for k, _ in old.publishes[0].properties["user_property"]]
        assert names == ["roost-o", "roost-m", "roost-q"]
    finally:
        old.close()


async def test_an_rpc_moves_each_sides_clock_past_the_others(nodes: MakeNode) -> None:
    """A node whose wall clock runs 10 s behind still ticks past what the node it asked (e.g.
    to take a session over) had ticked, and the asked node past the asker's."""
    a = await nodes("a")
    b = await nodes("b")
    a.links.set_peers({"b": b.addr})
    b.links.set_peers({"a": a.addr})
    await until(lambda: a.connected("b") and b.connected("a"), "the link")
    ahead = time.time_ns() // 1000 + 10_000_000
    a.links._clock = ahead
    assert b.links.tick() < ahead
    assert await b.links.request("a", "reverse", b"xy") == b"yx"
    assert b.links.tick() > ahead  # from a's reply
    b.links._clock = ahead + 5_000_000
    a.links._clock = 0
    await b.links.request("a", "reverse", b"xy")
    assert a.links.tick() > ahead + 5_000_000  # from b's request
