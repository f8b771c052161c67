"""Hundreds of abusive connections while good clients publish and receive, losing nothing."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

from tests.clients import PahoClient


def _abuser(port: int, kind: str, stop: threading.Event, stats: dict[str, int]) -> None:
    rnd = random.Random(os.getpid() ^ hash(kind))
    socks: list[socket.socket] = []
    try:
        while not stop.is_set():
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                stats["refused"] += 1
                time.sleep(0.05)
                continue
            stats[kind] += 1
            try:
                if kind == "garbage":
                    s.sendall(rnd.randbytes(rnd.randint(1, 300)))
                elif kind == "slowloris":
                    s.sendall(b"\x10\x20\x00\x04MQ")  # a CONNECT that never finishes
                elif kind == "oversize":
                    s.sendall(b"\x10\xff\xff\xff\x7f" + b"\x00" * 1000)  # announces 256 MB
                elif kind == "flood":
                    s.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
            except OSError:
                pass
            socks.append(s)
            if kind == "flood" or len(socks) > 60:
                socks.pop(0).close()
            time.sleep(0.01)
    finally:
        for s in socks:
            s.close()


def test_abuse_does_not_cost_good_clients_a_message(make_broker):
    b = make_broker({"mqtt": {"connect_timeout": 2, "max_packet_size": 65536}})
    sub = PahoClient(b.port, "good-sub")
    sub.connect()
    sub.subscribe("good/t", 1)
    pub = PahoClient(b.port, "good-pub")
    pub.connect()
    stop = threading.Event()
    stats = {"garbage": 0, "slowloris": 0, "oversize": 0, "flood": 0, "refused": 0}
    threads = [
        threading.Thread(target=_abuser, args=(b.port, kind, stop, stats), daemon=True)
        for kind in ("garbage", "slowloris", "oversize", "flood")
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    try:
        n = 2000
        for i in range(n):  # spread over about 4 s, while the abusers keep coming
            pub.publish("good/t", str(i), 1, wait=(i % 100 == 99))
            if i % 100 == 99:
                time.sleep(0.2)
        got = [int(m.payload) for m in sub.recv_all(n, timeout=60)]
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert got == list(range(n))  # every message, in order, no duplicates
    assert sum(stats[k] for k in ("garbage", "slowloris", "oversize", "flood")) >= 1000, stats
    assert "Traceback" not in b.log()
    pub.publish("good/t", b"after", 1)
    assert sub.recv().payload == b"after"
    sub.disconnect()
    pub.disconnect()
