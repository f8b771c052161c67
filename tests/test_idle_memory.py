"""An idle connection costs the broker about 2 KB (issue 17 item 4).

A real ``roost start`` process; 3,000 MQTT 3.1.1 connections from raw sockets, each CONNECTed
and acknowledged, then left idle. The broker's RSS from /proc before and after. The figures
against mosquitto come from benchmarks/idle_connections.py; this guards against a regression
(slots lost on the Channel, per-connection buffers made eagerly: over 4 KB each before).
"""

from __future__ import annotations

import socket
import struct
import time

from tests.brokerproc import rss_kb

N = 3000
LIMIT = 2600  # bytes per connection; measured 2,000-2,100


def _connect(cid: str) -> bytes:
    body = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", 600) + struct.pack("!H", len(cid))
    return bytes([0x10, len(body) + len(cid)]) + body + cid.encode()


def test_idle_connections_cost_about_two_kilobytes_each(make_broker):
    b = make_broker({"sys_topics": {"enabled": False}})
    time.sleep(0.5)
    before = rss_kb(b.proc.pid) * 1024
    socks = []
    try:
        for i in range(N):
            s = socket.create_connection(("127.0.0.1", b.port), timeout=10)
            s.sendall(_connect(f"idle-{i}"))
            socks.append(s)
        for s in socks:
            ack = b""
            while len(ack) < 4:
                chunk = s.recv(4 - len(ack))
                assert chunk, "the broker closed an idle connection"
                ack += chunk
            assert ack == b"\x20\x02\x00\x00", ack
        time.sleep(1.0)
        per = (rss_kb(b.proc.pid) * 1024 - before) / N
        assert per < LIMIT, f"{per:.0f} bytes of broker RSS per idle connection"
    finally:
        for s in socks:
            s.close()
