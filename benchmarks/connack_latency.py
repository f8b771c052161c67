"""Time to CONNACK for persistent sessions while the store is busy with fsyncs.

    python benchmarks/connack_latency.py [--seconds 20] [--publishers 4] [--hog-mb 4]

The load: ``--publishers`` clients publish retained QoS 1 messages back to back (every commit
is an fsync before its PUBACK), and a disk hog in the broker's data directory writes
``--hog-mb`` MiB and fsyncs it, over and over, as another process on the machine would. Meanwhile
one client connects with a Session Expiry Interval, disconnects and reconnects, again and
again: the first CONNACK of each client id is a new session (it must wait for one commit), the
others resume a stored session (they need not). Printed: p50, p99 and max time to CONNACK for
each kind, in milliseconds, and the fsync rate the load reached.

Goal (issue 12): p99 of the resumed-session CONNACK under 20 ms.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.brokerproc import BrokerProcess


def _connect_packet(client_id: str, clean: bool, expiry: int) -> bytes:
    cid = client_id.encode()
    props = b"\x05\x11" + struct.pack("!I", expiry)
    body = b"\x00\x04MQTT\x05" + bytes([2 if clean else 0]) + b"\x00\x3c" + props
    body += struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def _read_connack(s: socket.socket) -> bytes:
    data = b""
    while len(data) < 2 or len(data) < 2 + data[1]:
        chunk = s.recv(256)
        if not chunk:
            raise ConnectionError("closed before CONNACK")
        data += chunk
    if data[0] != 0x20 or data[3] != 0:
        raise RuntimeError(f"CONNACK refused: {data!r}")
    return data


def _connack_ms(port: int, client_id: str, clean: bool) -> tuple[float, bool]:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        t0 = time.perf_counter()
        s.sendall(_connect_packet(client_id, clean, 600))
        ack = _read_connack(s)
        ms = (time.perf_counter() - t0) * 1000
        s.sendall(b"\xe0\x00")
        s.recv(16)  # the broker closes after DISCONNECT
        return ms, bool(ack[2] & 1)
    finally:
        s.close()


def _publisher(port: int, n: int, stop: threading.Event, acks: list[int]) -> None:
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(_connect_packet(f"fsync-load-{n}", True, 0))
    _read_connack(s)
    topic = f"load/{n}".encode()
    payload = b"x" * 256
    pid = 0
    while not stop.is_set():
        pid = pid % 65535 + 1
        body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", pid) + b"\x00" + payload
        # Retained: stored (and fsynced) before the PUBACK, one commit per round trip.
        s.sendall(bytes([0x33]) + _vbi(len(body)) + body)
        data = s.recv(64)
        if not data:
            break
        acks[n] += 1
    s.close()


def _vbi(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _disk_hog(path: Path, mb: int, stop: threading.Event, fsyncs: list[int]) -> None:
    block = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while not stop.is_set():
            os.lseek(fd, 0, os.SEEK_SET)
            for _ in range(mb):
                os.write(fd, block)
            os.fsync(fd)
            fsyncs[0] += 1
    finally:
        os.close(fd)


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--hog-mb", type=int, default=4, help="MiB written per hog fsync (0: none)")
    ap.add_argument("--reconnects", type=int, default=10, help="resumes per new session")
    args = ap.parse_args()
    cfg = {"sys_topics": {"enabled": False}, "log": {"level": "warning"},
           "persistence": {"durability": "sync", "fsync": True}}  # fmt: skip
    with BrokerProcess(cfg) as b:
        stop = threading.Event()
        acks = [0] * args.publishers
        hog = [0]
        threads = [threading.Thread(target=_publisher, args=(b.port, i, stop, acks), daemon=True)
                   for i in range(args.publishers)]  # fmt: skip
        if args.hog_mb:
            hog_path = Path(b.tmp.name) / "hog.bin"
            threads.append(threading.Thread(target=_disk_hog, daemon=True,
                                            args=(hog_path, args.hog_mb, stop, hog)))  # fmt: skip
        for t in threads:
            t.start()
        time.sleep(1.0)  # let the load reach its pace
        new: list[float] = []
        resumed: list[float] = []
        n = 0
        t_end = time.monotonic() + args.seconds
        acks0, t0 = sum(acks), time.monotonic()
        while time.monotonic() < t_end:
            cid = f"connack-{n}"
            n += 1
            ms, present = _connack_ms(b.port, cid, True)
            assert not present
            new.append(ms)
            for _ in range(args.reconnects):
                ms, present = _connack_ms(b.port, cid, False)
                assert present, "the session was not resumed"
                resumed.append(ms)
        elapsed = time.monotonic() - t0
        commits = (sum(acks) - acks0) / elapsed
        stop.set()
        for t in threads:
            t.join(5)
    print(f"load: {commits:.0f} stored PUBACKs/s from {args.publishers} publishers, "
          f"{hog[0] / elapsed:.1f} hog fsyncs/s of {args.hog_mb} MiB")  # fmt: skip
    for name, values in (("new session", new), ("resumed session", resumed)):
        print(f"{name:16} n={len(values):5}  p50 {statistics.median(values):7.2f} ms  "
              f"p99 {_pct(values, 99):7.2f} ms  max {max(values):7.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
