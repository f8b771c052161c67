"""A WebSocket or QUIC subscriber that stops reading must not make the broker hold unbounded
memory, and everyone else keeps receiving (the TCP case is in test_slow_consumer.py)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from roost.client.quic import QuicClient
from roost.mqtt import Subscribe, Subscription, encode
from roost.mqtt.packets import MQTT_5
from tests.brokerproc import free_port, rss_kb
from tests.clients import PahoClient
from tests.listenerutil import wait_listening
from tests.test_websocket import RawWs


def _stall_ws(port: int) -> RawWs:
    ws = RawWs(port)
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    from roost.mqtt.packets import Connect

    ws.send_frame(2, encode(Connect("stalled-ws", MQTT_5), MQTT_5))
    ws.recv_packets(1)
    ws.send_frame(2, encode(Subscribe(1, [Subscription("flood/t", 0)]), MQTT_5))
    ws.recv_packets(1)  # SUBACK; from now on it never reads
    return ws


def _stall_quic(port: int) -> None:
    async def main() -> None:
        q = QuicClient("127.0.0.1", port, "stalled-quic")
        await q.connect()
        await q.control.subscribe("flood/t", 0)
        assert q._transport is not None
        q._transport.close()  # gone without a word: no more ACKs, ever

    asyncio.run(asyncio.wait_for(main(), 20))


@pytest.mark.parametrize("kind", ["ws", "quic"])
def test_stalled_subscriber_is_bounded(make_broker, kind):
    lport = free_port()
    b = make_broker({
        "mqtt": {"max_mqueue_len": 1000},
        "listeners": {kind: {"default": {"enabled": True, "bind": f"127.0.0.1:{lport}"}}},
    })  # fmt: skip
    wait_listening(b, f"{kind}:default")
    stalled = _stall_ws(lport) if kind == "ws" else _stall_quic(lport)
    healthy = PahoClient(b.port, "healthy")
    healthy.connect()
    healthy.subscribe("flood/t", 0)
    pub = PahoClient(b.port, "flooder")
    pub.connect()
    payload = b"z" * 1000
    before = rss_kb(b.proc.pid)
    # 20 MB aimed at a reader that reads nothing, in chunks the healthy subscriber keeps up with.
    for chunk in range(40):
        for _ in range(500):
            pub.publish("flood/t", payload, 0, wait=False)
        got = healthy.recv_all(500, timeout=20)
        assert len(got) == 500, f"healthy subscriber stalled in chunk {chunk}"
    grown_mb = (rss_kb(b.proc.pid) - before) / 1024
    # Write high-water (1 MB) + 1000 queued messages (about 3 MB), not the 20 MB sent.
    print(f"broker grew by {grown_mb:.1f} MB")
    assert grown_mb < 8, f"broker grew by {grown_mb:.1f} MB"
    if stalled is not None:
        stalled.sock.close()
    healthy.disconnect()
    pub.disconnect()
