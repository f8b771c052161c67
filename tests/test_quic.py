"""MQTT over QUIC with the package's own aioquic client: streams, migration, 0-RTT, limits,
timeouts, takeover, and refusals that must not disturb connected clients."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from roost.client.quic import QuicClient, QuicMqttError
from roost.mqtt.packets import MQTT_3_1_1, Pingreq, Subscribe, Subscription, Will
from tests.brokerproc import BrokerProcess, free_port
from tests.clients import V5, PahoClient, props
from tests.listenerutil import wait_listening


def run(coro: Coroutine[Any, Any, Any], timeout: float = 40) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


#: Every broker-side test runs on each QUIC stack the listener offers (transport/quicstack.py).
STACKS = ["aioquic", "qh3"]


def known_qh3_gap(request: pytest.FixtureRequest, qb: Any, why: str) -> None:
    """A behaviour qh3 does not give yet (docs/listeners.md): the test still runs and must
    fail there; not strict, since on a busy machine one of them sometimes passes."""
    if qb.stack == "qh3":
        request.applymarker(pytest.mark.xfail(strict=False, reason=why))


@pytest.fixture(scope="module", params=STACKS)
def qb(request):
    quic, small, ws = free_port(), free_port(), free_port()
    stack = request.param
    cfg = {
        "listeners": {
            "quic": {
                "default": {"enabled": True, "bind": f"127.0.0.1:{quic}", "stack": stack},
                # A second QUIC listener with tight limits for the limit and timeout tests.
                "small": {"bind": f"127.0.0.1:{small}", "max_connections": 2, "stack": stack,
                          "handshake_idle_timeout": 1, "stream_open_timeout": 1},
            },
            "ws": {"default": {"enabled": True, "bind": f"127.0.0.1:{ws}"}},
        }
    }  # fmt: skip
    b = BrokerProcess(cfg).start(timeout=60)  # a generous start: the machine may be busy
    try:
        for label in ("quic:default", "quic:small", "ws:default"):
            wait_listening(b, label)
        b.quic, b.small, b.ws = quic, small, ws  # type: ignore[attr-defined]
        b.stack = stack  # type: ignore[attr-defined]
        yield b
    finally:
        b.stop()
        b.tmp.cleanup()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_cross_listener_pubsub(qb, qos):
    """QUIC subscriber, TCP publisher, WebSocket subscriber; then QUIC publishes to both."""

    async def main() -> None:
        q = QuicClient("127.0.0.1", qb.quic, f"x-quic-{qos}")
        await q.connect()
        assert await q.control.subscribe("x/#", qos) == [qos]
        ws = PahoClient(qb.ws, f"x-ws-{qos}", V5, transport="websockets")
        ws.connect()
        ws.subscribe("x/#", qos)
        tcp = PahoClient(qb.port, f"x-tcp-{qos}")
        tcp.connect()
        tcp.subscribe("x/from-quic", qos)
        tcp.publish("x/from-tcp", b"tcp", qos)
        m = await q.recv()
        assert (m.topic, m.payload, m.qos) == ("x/from-tcp", b"tcp", qos)
        assert (await asyncio.to_thread(ws.recv)).payload == b"tcp"
        assert await q.control.publish("x/from-quic", b"quic", qos) == 0
        assert (await asyncio.to_thread(tcp.recv)).payload == b"quic"
        assert (await asyncio.to_thread(ws.recv)).payload == b"quic"
        assert (await q.recv()).payload == b"quic"  # its own subscription matches too
        await q.disconnect()
        assert q.terminated is not None and q.terminated.error_code == 0
        ws.disconnect()
        tcp.disconnect()

    run(main())


def test_multi_stream(qb):
    async def main() -> None:
        held: list = []

        def open_early(c: QuicClient) -> None:
            # A data stream used before the CONNECT: the broker holds it until CONNACK.
            s = c.open_stream()
            s.send(Subscribe(7, [Subscription("ms/a", 1)]))
            held.append(s)

        q = QuicClient("127.0.0.1", qb.quic, "multi", version=MQTT_3_1_1)
        await q.connect(before_connect=open_early)
        a = held[0]
        b = q.open_stream()
        assert await b.subscribe("ms/b", 2) == [2]
        assert await q.control.subscribe("ms/c", 1) == [1]
        tcp = PahoClient(qb.port, "multi-pub")
        tcp.connect()
        for topic in ("ms/a", "ms/b", "ms/c", "ms/a", "ms/b"):
            tcp.publish(topic, topic.encode(), 1)
        got = [await asyncio.wait_for(q.messages.get(), 10) for _ in range(5)]
        by_stream = {(sid, p.topic, p.packet_id) for sid, p in got}
        # Each stream delivers its own subscriptions with its own packet-id space.
        assert by_stream == {(a.stream_id, "ms/a", 1), (a.stream_id, "ms/a", 2),
                             (b.stream_id, "ms/b", 1), (b.stream_id, "ms/b", 2),
                             (q.control.stream_id, "ms/c", 1)}  # fmt: skip
        # Acks come back on the stream of the request; a PUBLISH from a data stream is routed.
        assert await b.publish("ms/c", b"from b", 1) == 0
        sid, p = await asyncio.wait_for(q.messages.get(), 10)
        assert (sid, p.payload) == (q.control.stream_id, b"from b")
        # UNSUBSCRIBE on another stream than the SUBSCRIBE finds nothing (3.1.1: empty UNSUBACK
        # either way, so check by publishing).
        await b.unsubscribe("ms/a")
        tcp.publish("ms/a", b"still a", 1)
        sid, p = await asyncio.wait_for(q.messages.get(), 10)
        assert (sid, p.payload) == (a.stream_id, b"still a")
        # Closing a data stream ends its subscriptions only.
        a.close()
        await asyncio.sleep(0.3)
        tcp.publish("ms/a", b"gone", 1)
        tcp.publish("ms/b", b"b alive", 1)
        sid, p = await asyncio.wait_for(q.messages.get(), 10)
        assert (sid, p.payload) == (b.stream_id, b"b alive")
        assert q.terminated is None
        # Control packets are not allowed on a data stream: the connection ends.
        b.send(Pingreq())
        t = await q.wait_closed(5)
        assert q.pingresps == 0 and t is not None
        tcp.disconnect()

    run(main())


def test_no_local_on_a_data_stream(qb):
    async def main() -> None:
        q = QuicClient("127.0.0.1", qb.quic, "nolocal-quic")
        await q.connect()
        s = q.open_stream()
        assert await s.subscribe("nlq/t", 1, no_local=True) == [1]
        assert await s.subscribe("nlq/other", 1) == [1]
        await q.control.publish("nlq/t", b"mine", 1)  # the same client, another stream
        await q.control.publish("nlq/other", b"echo", 1)
        sid, p = await asyncio.wait_for(q.messages.get(), 10)
        assert (sid, p.topic) == (s.stream_id, "nlq/other")  # "mine" was not echoed
        await q.disconnect()

    run(main())


def test_unsubscribe_on_other_stream_v5(qb):
    async def main() -> None:
        q = QuicClient("127.0.0.1", qb.quic, "multi5")
        await q.connect()
        s1, s2 = q.open_stream(), q.open_stream()
        assert await s1.subscribe("u5/t", 1) == [1]
        assert await s2.unsubscribe("u5/t") == [0x11]  # no subscription existed (on s2)
        assert await s1.unsubscribe("u5/t") == [0]
        await q.disconnect()

    run(main())


def test_migration_keeps_every_qos1_message(qb):
    n = 300

    async def main() -> None:
        q = QuicClient("127.0.0.1", qb.quic, "migrant")
        await q.connect()
        await q.control.subscribe("mig/t", 1)
        pub = PahoClient(qb.port, "mig-pub")
        pub.connect()

        def produce() -> None:
            for i in range(n):
                pub.publish("mig/t", str(i).encode(), 1)
                time.sleep(0.002)

        th = threading.Thread(target=produce, daemon=True)
        th.start()
        before = q.local_address
        got = []
        moved = None
        while len(got) < n:
            m = await q.recv(10)
            got.append(int(m.payload))
            if len(got) == n // 3:
                moved = await q.migrate()
        th.join(10)
        assert moved is not None and moved != before
        assert q.local_address == moved
        assert sorted(set(got)) == list(range(n))  # every message, none lost
        assert q.terminated is None  # the same connection all along
        # And the client can still publish from its new address.
        assert await q.control.publish("mig/t", b"after", 1) == 0
        assert (await q.recv()).payload == b"after"
        await q.disconnect()
        pub.disconnect()

    run(main())


def test_zero_rtt_connect(qb):
    async def main() -> None:
        first = QuicClient("127.0.0.1", qb.quic, "zrtt")
        await first.connect()
        assert first.handshake is not None and not first.handshake.session_resumed
        for _ in range(200):
            if first.session_ticket is not None:
                break
            await asyncio.sleep(0.01)
        ticket = first.session_ticket
        assert ticket is not None and ticket.max_early_data_size
        await first.disconnect()

        watcher = PahoClient(qb.port, "zrtt-watch")
        watcher.connect()
        watcher.subscribe("zrtt/data", 1)
        early: list = []

        def in_early_data(c: QuicClient) -> None:
            # As emqtt does: a data-stream PUBLISH in 0-RTT too, before the CONNECT.
            early.append(c.open_stream().publish_nowait("zrtt/data", b"early", 1))

        again = QuicClient("127.0.0.1", qb.quic, "zrtt", session_ticket=ticket)
        connack = await again.connect(before_connect=in_early_data)  # CONNECT in 0-RTT data
        assert connack.reason_code == 0
        assert await asyncio.wait_for(early[0], 5) == 0
        assert (await asyncio.to_thread(watcher.recv)).payload == b"early"
        watcher.disconnect()
        for _ in range(200):
            if again.handshake is not None:
                break
            await asyncio.sleep(0.01)
        hs = again.handshake
        assert hs is not None and hs.session_resumed and hs.early_data_accepted
        await again.disconnect()

        # A ticket is single-use: replaying it resumes no early data.
        replay = QuicClient("127.0.0.1", qb.quic, "zrtt-replay", session_ticket=ticket)
        await replay.connect(early_data=False)
        assert replay.handshake is not None and not replay.handshake.early_data_accepted
        await replay.disconnect()

    run(main())


def test_takeover_closes_with_application_code(qb, request):
    known_qh3_gap(request, qb, "qh3: the DISCONNECT 0x8E before the close does not arrive")
    async def main() -> None:
        a = QuicClient("127.0.0.1", qb.quic, "taken")
        await a.connect()
        b = QuicClient("127.0.0.1", qb.quic, "taken")
        await b.connect()
        t = await a.wait_closed(5)
        assert a.disconnect_packet is not None and a.disconnect_packet.reason_code == 0x8E
        assert t.error_code == 0x8E
        await b.disconnect()

    run(main())


def test_limits_and_timeouts(qb, request):
    known_qh3_gap(request, qb, "qh3: the code-1 close does not reach the client")
    async def main() -> None:
        # No stream opened within stream_open_timeout (1 s): closed with code 1.
        idle = QuicClient("127.0.0.1", qb.small, "")
        idle.protocol = None
        conf = idle.configuration
        quic = QuicConnection(configuration=conf)
        from roost.client.quic import _Protocol

        idle.protocol = _Protocol(quic, idle)
        idle._transport = await idle._open_socket()
        idle.protocol.connect(("127.0.0.1", qb.small))
        await idle.protocol.wait_connected()
        t = await idle.wait_closed(5)
        assert t.error_code == 1

        # Keepalive 1 s and silence: DISCONNECT (keepalive timeout) within 1.5 s and a bit.
        quiet = QuicClient("127.0.0.1", qb.small, "quiet", keepalive=1)
        await quiet.connect()
        t0 = time.monotonic()
        await quiet.wait_closed(5)
        assert time.monotonic() - t0 < 4
        assert quiet.disconnect_packet is not None
        assert quiet.disconnect_packet.reason_code == 0x8D

        # max_connections 2: the third is refused with code 2 (overloaded).
        c1 = QuicClient("127.0.0.1", qb.small, "lim-1")
        c2 = QuicClient("127.0.0.1", qb.small, "lim-2")
        await c1.connect()
        await c2.connect()
        c3 = QuicClient("127.0.0.1", qb.small, "lim-3")
        with pytest.raises((QuicMqttError, ConnectionError)):
            await c3.connect()
        assert c3.terminated is not None and c3.terminated.error_code == 2
        await c1.disconnect()
        await c2.disconnect()
        await c3.aclose()

    run(main())


def test_handshake_timeout(qb, request):
    """A client that stops after its first flight is dropped after handshake_idle_timeout."""
    known_qh3_gap(request, qb, "qh3: no close for a silent client (amplification)")
    conf = QuicConfiguration(is_client=True, alpn_protocols=["mqtt"], verify_mode=ssl.CERT_NONE)
    conn = QuicConnection(configuration=conf)
    addr = ("127.0.0.1", qb.small)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        t0 = time.monotonic()
        conn.connect(addr, now=t0)
        for data, _ in conn.datagrams_to_send(now=time.monotonic()):
            s.sendto(data, addr)
        # Read what the server sends (never answering) until it gives up with a close.
        deadline = time.monotonic() + 8
        terminated = None
        while time.monotonic() < deadline and terminated is None:
            s.settimeout(0.1)
            try:
                data, _ = s.recvfrom(65536)
                conn.receive_datagram(data, addr, now=time.monotonic())
            except TimeoutError:
                pass
            timer = conn.get_timer()
            if timer is not None and time.monotonic() >= timer:
                conn.handle_timer(now=time.monotonic())  # ends the draining period
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, events.ConnectionTerminated):
                    terminated = ev
            # Never answer, so the server never sees the handshake finish.
            conn.datagrams_to_send(now=time.monotonic())
    assert terminated is not None
    # handshake_idle_timeout is 1 s on this listener (the client's own idle timeout is 60 s).
    assert 0.9 < time.monotonic() - t0 < 5, terminated


def fake_initial() -> bytes:
    """A well-formed QUIC v1 Initial header (so the server makes a connection for it) around
    a payload that decrypts to nothing."""
    head = b"\xc0\x00\x00\x00\x01" + b"\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + b"\x00"
    rest = 1200 - len(head) - 2
    return head + (0x4000 | rest).to_bytes(2, "big") + os.urandom(rest)


def test_wrong_alpn_and_garbage_flood_refused(qb):
    async def main() -> None:
        live = QuicClient("127.0.0.1", qb.quic, "flood-live")
        await live.connect()
        await live.control.subscribe("flood/t", 1)

        wrong = QuicClient("127.0.0.1", qb.quic, "wrong-alpn", alpn="h3")
        with pytest.raises((QuicMqttError, ConnectionError)):
            await wrong.connect(timeout=5)
        await wrong.aclose()

        rnd = random.Random(3)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(3000):
                # A third look like QUIC v1 Initials, the rest is noise of any size.
                body = fake_initial() if i % 3 == 0 else os.urandom(rnd.randint(1, 1400))
                s.sendto(body, ("127.0.0.1", qb.quic))
                if i % 200 == 0:
                    await asyncio.sleep(0)

        tcp = PahoClient(qb.port, "flood-pub")
        tcp.connect()
        tcp.publish("flood/t", b"unharmed", 1)
        assert (await live.recv()).payload == b"unharmed"
        fresh = QuicClient("127.0.0.1", qb.quic, "flood-fresh")
        assert (await fresh.connect()).reason_code == 0
        await fresh.disconnect()
        await live.disconnect()
        tcp.disconnect()

    run(main())


def test_shutdown_sends_disconnect(make_broker):
    port = free_port()
    quic_cfg = {"enabled": True, "bind": f"127.0.0.1:{port}"}
    b = make_broker({"listeners": {"quic": {"default": quic_cfg}}})
    wait_listening(b, "quic:default")

    async def main() -> None:
        q = QuicClient("127.0.0.1", port, "bye")
        await q.connect()
        await asyncio.to_thread(b.stop)
        await q.wait_closed(5)
        assert q.disconnect_packet is not None
        assert q.disconnect_packet.reason_code == 0x8B  # server shutting down

    run(main())


def test_kick_closes_with_administrative_action(tmp_path):
    """In-process (there is no kick API yet): the node kicks a client as the REST API will."""
    from roost.broker.node import Broker
    from roost.config import Config
    from roost.mqtt import reason_codes as RC
    from roost.transport.quic import start_quic_listener

    async def main() -> None:
        port = free_port()
        cfg = Config.model_validate({
            "node": {"data_dir": str(tmp_path)},
            "listeners": {"quic": {"default": {"bind": f"127.0.0.1:{port}"}}},
        })  # fmt: skip
        broker = Broker(cfg)
        server = await start_quic_listener(broker, "quic:default", cfg.listeners.quic["default"],
                                           str(tmp_path))  # fmt: skip
        try:
            q = QuicClient("127.0.0.1", port, "kicked")
            await q.connect()
            [ch] = [c for c in broker.registry.channels() if c.client_id == "kicked"]
            ch.disconnect(RC.ADMINISTRATIVE_ACTION)
            t = await q.wait_closed(5)
            assert q.disconnect_packet is not None
            assert q.disconnect_packet.reason_code == RC.ADMINISTRATIVE_ACTION
            assert t.error_code == RC.ADMINISTRATIVE_ACTION
            assert server.state.connections == 0
        finally:
            server.close()
            await asyncio.sleep(0.1)

    run(main())


def test_fake_initials_are_dropped_early(tmp_path):
    """Datagrams that only look like QUIC Initials do not linger as connections."""
    from roost.broker.node import Broker
    from roost.config import Config
    from roost.transport.quic import start_quic_listener

    async def main() -> None:
        port = free_port()
        cfg = Config.model_validate({
            "node": {"data_dir": str(tmp_path)},
            "listeners": {"quic": {"default": {"bind": f"127.0.0.1:{port}"}}},
        })  # fmt: skip
        broker = Broker(cfg)
        server = await start_quic_listener(broker, "quic:default", cfg.listeners.quic["default"],
                                           str(tmp_path))  # fmt: skip
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(200):
                    body = fake_initial()
                    s.sendto(body, ("127.0.0.1", port))
                    await asyncio.sleep(0)
            await asyncio.sleep(0.3)
            assert server.state.live > 100  # aioquic made a connection object for each
            for _ in range(100):
                if server.state.live == 0:
                    break
                await asyncio.sleep(0.1)
            assert server.state.live == 0  # gone after ~3 s, well before the 10 s timeout
            assert server.state.connections == 0
        finally:
            server.close()
            await asyncio.sleep(0.1)

    run(main())


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_control_stream_end_ends_the_connection(qb, how):
    """Closing the control stream without DISCONNECT is a lost connection: the will goes out."""

    async def main() -> None:
        watcher = PahoClient(qb.port, f"will-watch-{how}")
        watcher.connect()
        watcher.subscribe(f"will/{how}", 1)
        q = QuicClient("127.0.0.1", qb.quic, f"will-{how}", will=Will(f"will/{how}", b"gone", 1))
        await q.connect()
        data = q.open_stream()
        assert await data.subscribe("will/data", 1) == [1]
        assert q.protocol is not None
        if how == "fin":
            q.control.close()
        else:
            q.protocol._quic.reset_stream(q.control.stream_id, 0)
            q.protocol.transmit()
        t = await q.wait_closed(5)
        assert t.error_code == (0 if how == "fin" else 1)
        m = await asyncio.to_thread(watcher.recv)
        assert (m.topic, m.payload) == (f"will/{how}", b"gone")
        watcher.disconnect()

    run(main())


def test_keepalive_counts_traffic_on_any_stream(qb):
    """Keepalive 1 s, and the control stream silent for 3 s: PUBLISHes on a data stream keep
    the connection alive."""

    async def main() -> None:
        q = QuicClient("127.0.0.1", qb.quic, "ka-streams", keepalive=1)
        await q.connect()
        data = q.open_stream()
        for i in range(10):
            await data.publish("ka/data", str(i).encode(), 1)
            await asyncio.sleep(0.3)
        assert q.terminated is None and q.disconnect_packet is None
        await q.disconnect()

    run(main())


def test_session_hops_between_listeners(qb):
    """One persistent session taken over from TCP by QUIC, then resumed over WebSocket."""

    async def main() -> None:
        tcp = PahoClient(qb.port, "hopper")
        tcp.connect(clean_start=False, properties=props(SessionExpiryInterval=300))
        tcp.subscribe("hop/t", 1)
        q = QuicClient("127.0.0.1", qb.quic, "hopper", clean_start=False,
                       properties={"session_expiry_interval": 300})  # fmt: skip
        connack = await q.connect()
        assert connack.session_present
        rc = await asyncio.to_thread(tcp.disconnects.get, True, 5)
        assert rc.value == 0x8E  # the TCP connection was taken over
        pub = PahoClient(qb.port, "hop-pub")
        pub.connect()
        pub.publish("hop/t", b"to quic", 1)
        assert (await q.recv()).payload == b"to quic"  # the subscription came along
        await q.disconnect()
        pub.publish("hop/t", b"queued", 1)  # the session is offline: kept for it
        ws = PahoClient(qb.ws, "hopper", V5, transport="websockets")
        flags, _, _ = ws.connect(clean_start=False, properties=props(SessionExpiryInterval=0))
        assert flags.session_present
        assert (await asyncio.to_thread(ws.recv)).payload == b"queued"
        ws.disconnect()
        pub.disconnect()

    run(main())
