"""Memory per idle connection: Roost against mosquitto, side by side.

Each run starts a fresh broker, reads its RSS, opens N MQTT 3.1.1 connections (clean session,
keep-alive 600 s, one SUBSCRIBE each unless ``--no-subscribe``), waits for every CONNACK and
SUBACK, lets the broker settle and reads its RSS again. The figure is (RSS after - RSS before)
/ N, in bytes. Brokers alternate (roost, mosquitto, roost, ...) and each figure is the median
of ``--runs``.

The connections come from ``--clients`` processes (each under the open-file limit) on
127.0.0.1..127.0.0.N source addresses, so the port range is not the limit. The open-file
limit is: 20,000 per process on this machine, so one broker holds at most about 19,900.

    python benchmarks/idle_connections.py --counts 10000 19000 --runs 3
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import selectors
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.brokerproc import rss_kb
from throughput import HOST, Broker, free_port

ROOST = f"{sys.executable} -m roost start"
MOSQUITTO = "/usr/sbin/mosquitto -c {mosquitto_conf}"


def _connect_packet(cid: str, keepalive: int) -> bytes:
    body = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", keepalive)
    body += struct.pack("!H", len(cid)) + cid.encode()
    return bytes([0x10, len(body)]) + body


def _subscribe_packet(topic: str) -> bytes:
    body = struct.pack("!H", 1) + struct.pack("!H", len(topic)) + topic.encode() + b"\x00"
    return bytes([0x82, len(body)]) + body


def _hold(port: int, first: int, count: int, subscribe: bool, net: int, ready: mp.Event,
          stop: mp.Event, errors: mp.Queue) -> None:  # fmt: skip
    """Open ``count`` connections, answer nothing more, hold them until ``stop``."""
    try:
        sel = selectors.DefaultSelector()
        socks = []
        want = 4 + (5 if subscribe else 0)  # CONNACK, then SUBACK
        got: dict[socket.socket, int] = {}
        for i in range(first, first + count):
            # 5,000 per source address, a fresh 127.<net>.x.1 per run: no port collides with
            # an earlier run's TIME_WAIT.
            src = f"127.{net}.{1 + i // 5000 % 250}.1"
            s = socket.socket()
            s.bind((src, 0))
            s.connect((HOST, port))
            s.sendall(_connect_packet(f"idle-{i}", 600)
                      + (_subscribe_packet(f"idle/{i}") if subscribe else b""))  # fmt: skip
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
            socks.append(s)
            got[s] = 0
            while len(socks) - sum(1 for n in got.values() if n >= want) > 500:
                _read(sel, got, 1.0)  # keep at most 500 handshakes in flight
        deadline = time.monotonic() + 120
        while any(n < want for n in got.values()):
            if time.monotonic() > deadline:
                raise RuntimeError("not every connection was acknowledged in 120 s")
            _read(sel, got, 1.0)
        ready.set()
        stop.wait(600)
        for s in socks:
            s.close()
    except Exception as e:  # reported to the parent, which fails the run
        errors.put(repr(e))
        ready.set()


def _read(sel: selectors.BaseSelector, got: dict[socket.socket, int], timeout: float) -> None:
    for key, _ in sel.select(timeout):
        s = key.fileobj
        assert isinstance(s, socket.socket)
        data = s.recv(4096)
        if not data:
            raise RuntimeError("the broker closed a connection")
        got[s] += len(data)


def measure(name: str, template: str, n: int, procs: int, subscribe: bool, work: Path) -> float:
    """Bytes of broker RSS per idle connection."""
    broker = Broker(name, template, work)
    broker.env["ROOST_API__BIND"] = f"{HOST}:{free_port()}"  # brokers may run side by side
    with broker:
        time.sleep(1.0)
        before = rss_kb(broker.pid) * 1024
        ctx = mp.get_context("fork")
        stop, errors = ctx.Event(), ctx.Queue()
        per = -(-n // procs)
        net = random.randint(1, 250)
        holders = []
        for k in range(procs):
            ready = ctx.Event()
            p = ctx.Process(target=_hold, args=(broker.port, k * per, min(per, n - k * per),
                                                subscribe, net, ready, stop, errors))  # fmt: skip
            p.start()
            holders.append((p, ready))
        try:
            for _, ready in holders:
                if not ready.wait(180):
                    raise RuntimeError("clients not connected in 180 s")
            if not errors.empty():
                raise RuntimeError(errors.get())
            time.sleep(3.0)  # let the broker settle (allocator, lazy buffers)
            after = rss_kb(broker.pid) * 1024
        finally:
            stop.set()
            for p, _ in holders:
                p.join(10)
                if p.is_alive():
                    p.kill()
        return (after - before) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--counts", type=int, nargs="+", default=[10000, 19000])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--clients", type=int, default=2, help="client processes")
    ap.add_argument("--no-subscribe", action="store_true", help="CONNECT only")
    ap.add_argument("--brokers", nargs="+", default=["roost", "mosquitto"])
    ap.add_argument("--roost-cmd", default=ROOST)
    ap.add_argument("--mosquitto-cmd", default=MOSQUITTO)
    args = ap.parse_args(argv)
    cmds = {"roost": args.roost_cmd, "mosquitto": args.mosquitto_cmd}
    what = "CONNECT" if args.no_subscribe else "CONNECT + 1 SUBSCRIBE"
    print(f"broker RSS per idle connection ({what}), median of {args.runs} runs, bytes")
    print(f"{'connections':>11} " + " ".join(f"{b:>10}" for b in args.brokers)
          + ("      ratio" if len(args.brokers) == 2 else ""))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="roost-idle-") as tmp:
        for n in args.counts:
            runs: dict[str, list[float]] = {b: [] for b in args.brokers}
            for _ in range(args.runs):
                for b in args.brokers:
                    runs[b].append(measure(b, cmds[b], n, args.clients, not args.no_subscribe,
                                           Path(tmp)))  # fmt: skip
            med = {b: statistics.median(v) for b, v in runs.items()}
            line = f"{n:>11} " + " ".join(f"{med[b]:>10.0f}" for b in args.brokers)
            if len(args.brokers) == 2:
                a, b = args.brokers
                line += f"  {med[a] / med[b]:8.2f}x"
            print(line, "  runs:", {b: [round(x) for x in v] for b, v in runs.items()},
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
