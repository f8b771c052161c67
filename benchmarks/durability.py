"""Messages stored per second in each durability mode, and what `sync` costs against `memory`.

    python benchmarks/durability.py [--runs 3] [--messages 20000] [--window 100]

One publisher sends QoS 1 messages (at most --window unacknowledged) to a topic that an offline
persistent session subscribes to, so every message must be stored before its PUBACK. The figure
is acknowledged messages per second; the median of --runs runs is printed for each mode.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.brokerproc import BrokerProcess


def _connect(port: int, client_id: str, clean: bool, expiry: int | None = None) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    cid = client_id.encode()
    props = b"\x00" if expiry is None else b"\x05\x11" + struct.pack("!I", expiry)
    body = b"\x00\x04MQTT\x05" + bytes([2 if clean else 0]) + b"\x00\x3c" + props
    body += struct.pack("!H", len(cid)) + cid
    s.sendall(bytes([0x10, len(body)]) + body)
    s.recv(64)
    return s


def _subscribe_offline(port: int) -> None:
    s = _connect(port, "durability-sub", clean=True, expiry=3600)
    f = b"bench/durable"
    body = b"\x00\x01\x00" + struct.pack("!H", len(f)) + f + b"\x01"
    s.sendall(bytes([0x82, len(body)]) + body)
    s.recv(64)
    s.sendall(b"\xe0\x00")
    s.close()


def _publish(port: int, n: int, window: int) -> float:
    s = _connect(port, "durability-pub", clean=True)
    topic = b"bench/durable"
    payload = b"x" * 64
    head = bytes([0x32, 2 + len(topic) + 2 + 1 + len(payload)]) + struct.pack("!H", len(topic))
    sent = acked = 0
    buf = b""
    t0 = time.perf_counter()
    while acked < n:
        burst = []
        while sent - acked < window and sent < n:
            burst.append(head + topic + struct.pack("!H", sent % 65535 + 1) + b"\x00" + payload)
            sent += 1
        if burst:
            s.sendall(b"".join(burst))
        buf += s.recv(65536)
        while len(buf) >= 2 and len(buf) >= 2 + buf[1]:
            if buf[0] >> 4 == 4:
                acked += 1
            buf = buf[2 + buf[1] :]
    elapsed = time.perf_counter() - t0
    s.close()
    return n / elapsed


def run(mode: str, n: int, window: int) -> float:
    cfg = {"persistence": {"durability": mode}, "sys_topics": {"enabled": False},
           "mqtt": {"max_mqueue_len": n + 10}, "log": {"level": "warning"}}  # fmt: skip
    with BrokerProcess(cfg) as b:
        _subscribe_offline(b.port)
        return _publish(b.port, n, window)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--window", type=int, default=100)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"memory": [], "sync": [], "batch": []}
    for _ in range(args.runs):  # interleaved, so background noise hits every mode alike
        for mode in results:
            results[mode].append(run(mode, args.messages, args.window))
    med = {m: statistics.median(v) for m, v in results.items()}
    print(f"{'durability':<10} {'stored msgs/s (median)':>24} {'vs memory':>10}   runs")
    for mode, rates in results.items():
        runs = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"{mode:<10} {med[mode]:>24,.0f} {med[mode] / med['memory']:>9.2f}x   {runs}")


if __name__ == "__main__":
    main()
