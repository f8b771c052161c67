"""Soak: many clients, mixed QoS, for a long time; the broker's memory and descriptors stay flat
and no QoS 1/2 message is lost (not part of the test suite: it takes as long as you ask).

    PYTHONPATH=src python3 benchmarks/soak.py [--clients 1000] [--duration 600] [--rate 1000]

``--clients`` MQTT 3.1.1 clients each subscribe to ``soak/<n>/#`` at QoS 2 and publish, at
``--rate`` messages per second in all, to ``soak/<random peer>/<n>`` with QoS 0, 1 and 2 in turn.
A tenth of them have persistent sessions and go away and come back every ``--churn`` seconds
(their messages wait in their sessions meanwhile). Every ``--sample`` seconds the broker's RSS
and open descriptors are printed; at the end, how many messages of each QoS were sent,
received, lost and received twice, and whether RSS and descriptors stayed flat (RSS within
``--rss-slack`` of its value after the warm-up, descriptors back to where they were).
Exit status 0 when nothing was lost and both stayed flat, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tests.brokerproc import BrokerProcess, rss_kb

from roost.mqtt import Decoder, encode
from roost.mqtt.packets import (
    MQTT_3_1_1,
    Connack,
    Connect,
    Disconnect,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Subscription,
)

V = MQTT_3_1_1


class Totals:
    def __init__(self) -> None:
        self.sent = [0, 0, 0]
        self.acked = [0, 0, 0]  # QoS 1/2 publishes the broker acknowledged (PUBACK/PUBCOMP)
        self.expected: dict[tuple[int, int], int] = {}  # (sender, seq) -> qos, for acked ones
        self.received: set[tuple[int, int]] = set()
        self.dups = [0, 0, 0]


class Client:
    def __init__(self, n: int, port: int, persistent: bool, totals: Totals) -> None:
        self.n = n
        self.port = port
        self.persistent = persistent
        self.t = totals
        self.writer: asyncio.StreamWriter | None = None
        self.connected = False
        self.seq = 0
        self.next_pid = 1
        self.inflight: dict[int, tuple[int, int]] = {}  # pid -> (seq, qos)
        # QoS 2 packet ids received and not released yet, kept across reconnects as a real
        # client must (MQTT 4.3.3): a PUBLISH again with one of them is the same message.
        self.rel_pending: set[int] = set()
        self.reader_task: asyncio.Task[None] | None = None
        self._acked = asyncio.Event()

    async def connect(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer = writer
        dec = Decoder(version=V, server_side=False)
        writer.write(encode(Connect(f"soak-{self.n}", V, not self.persistent, 60), V))
        writer.write(encode(Subscribe(1, [Subscription(f"soak/{self.n}/#", 2)]), V))
        got: list = []
        # A resumed session's queued messages may come before the SUBACK.
        while not any(isinstance(p, Suback) for p in got):
            data = await reader.read(65536)
            if not data:
                raise ConnectionError(f"soak-{self.n}: closed during setup")
            got += dec.feed(data)
        assert isinstance(got[0], Connack) and got[0].reason_code == 0, got[0]
        self.connected = True
        rest = [p for p in got[1:] if not isinstance(p, Suback)]
        self.reader_task = asyncio.create_task(self._read(reader, dec, rest))

    async def _read(self, reader: asyncio.StreamReader, dec: Decoder, first: list) -> None:
        packets = first
        while True:
            for p in packets:
                self._handle(p)
            data = await reader.read(65536)
            if not data:
                return
            packets = dec.feed(data)

    def _handle(self, p: object) -> None:
        w = self.writer
        assert w is not None
        t = type(p)
        if t is Publish:
            sender, _, seq = p.payload.partition(b":")  # type: ignore[attr-defined]
            key = (int(sender), int(seq))
            resent = p.qos == 2 and p.packet_id in self.rel_pending  # type: ignore[attr-defined]
            if key in self.t.received and not resent:
                self.t.dups[p.qos] += 1  # type: ignore[attr-defined]
            self.t.received.add(key)
            if p.qos == 2:  # type: ignore[attr-defined]
                self.rel_pending.add(p.packet_id)  # type: ignore[attr-defined]
            if p.qos == 1:  # type: ignore[attr-defined]
                w.write(encode(Puback(p.packet_id), V))  # type: ignore[attr-defined]
            elif p.qos == 2:  # type: ignore[attr-defined]
                w.write(encode(Pubrec(p.packet_id), V))  # type: ignore[attr-defined]
        elif t is Pubrel:
            self.rel_pending.discard(p.packet_id)  # type: ignore[attr-defined]
            w.write(encode(Pubcomp(p.packet_id), V))  # type: ignore[attr-defined]
        elif t is Pubrec:
            w.write(encode(Pubrel(p.packet_id), V))  # type: ignore[attr-defined]
        elif t in (Puback, Pubcomp):
            done = self.inflight.pop(p.packet_id, None)  # type: ignore[attr-defined]
            if done is not None:
                seq, qos = done
                self.t.acked[qos] += 1
                self.t.expected[(self.n, seq)] = qos
            if not self.inflight:
                self._acked.set()

    def publish(self, target: int, qos: int) -> None:
        if not self.connected or len(self.inflight) >= 1000:
            return
        assert self.writer is not None
        self.seq += 1
        pid = None
        if qos:
            pid = self.next_pid
            self.next_pid = self.next_pid % 65535 + 1
            self.inflight[pid] = (self.seq, qos)
        payload = f"{self.n}:{self.seq}".encode()
        topic = f"soak/{target}/{self.n}"
        self.writer.write(encode(Publish(topic, payload, qos, packet_id=pid), V))
        self.t.sent[qos] += 1
        if qos == 0:
            self.t.expected[(self.n, self.seq)] = 0

    async def go_away(self) -> None:
        """Leave cleanly: once the broker acknowledged our publishes, DISCONNECT."""
        self.connected = False
        if self.inflight:
            self._acked.clear()
            try:
                await asyncio.wait_for(self._acked.wait(), 10)
            except TimeoutError:
                pass
        assert self.writer is not None
        self.writer.write(encode(Disconnect(), V))
        try:
            await self.writer.drain()
            if self.reader_task is not None:
                await asyncio.wait_for(self.reader_task, 5)
        except (TimeoutError, ConnectionError):
            pass
        self.writer.close()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def soak(args: argparse.Namespace, port: int, pid: int) -> int:
    totals = Totals()
    clients = [Client(n, port, n % 10 == 0, totals) for n in range(args.clients)]
    t0 = time.monotonic()
    for i in range(0, len(clients), 100):
        await asyncio.gather(*(c.connect() for c in clients[i : i + 100]))
    print(f"{len(clients)} clients connected in {time.monotonic() - t0:.1f} s", flush=True)
    rng = random.Random(12)
    samples: list[tuple[float, int, int]] = []
    start = time.monotonic()
    next_sample = start
    next_churn = start + args.churn
    churning: set[asyncio.Task[None]] = set()
    i = 0
    tick = 0.01
    per_tick = args.rate * tick
    owed = 0.0
    print(f"{'t (s)':>6} {'RSS MiB':>8} {'fds':>6} {'sent':>9} {'received':>9}", flush=True)
    while (now := time.monotonic()) - start < args.duration:
        owed += per_tick
        while owed >= 1:
            owed -= 1
            i += 1
            c = clients[rng.randrange(len(clients))]
            c.publish(rng.randrange(len(clients)), i % 3)
        if now >= next_sample:
            rss, fds = rss_kb(pid), _fds(pid)
            samples.append((now - start, rss, fds))
            print(f"{now - start:6.0f} {rss / 1024:8.1f} {fds:6d} {sum(totals.sent):9d} "
                  f"{len(totals.received):9d}", flush=True)  # fmt: skip
            next_sample += args.sample
        if now >= next_churn:
            next_churn += args.churn
            for c in clients[:: 10]:  # the persistent ones: away for a few seconds, then back
                churning.add(asyncio.create_task(_away_and_back(c, rng.uniform(1, 5))))
            churning = {t for t in churning if not t.done()}
        await asyncio.sleep(tick)
    await asyncio.gather(*churning)
    # Let the last messages arrive, then everyone leaves.
    await asyncio.gather(*(c.go_away() for c in clients))
    for c in clients[:: 10]:  # collect what waited in the persistent sessions
        await c.connect()
    await asyncio.sleep(2)
    await asyncio.gather(*(c.go_away() for c in clients[:: 10]))
    await asyncio.sleep(1)
    end_rss, end_fds = rss_kb(pid), _fds(pid)

    lost = [0, 0, 0]
    for key, qos in totals.expected.items():
        if key not in totals.received:
            lost[qos] += 1
    print()
    for qos in range(3):
        acked = f", acknowledged {totals.acked[qos]}" if qos else ""
        print(f"QoS {qos}: sent {totals.sent[qos]}{acked}, lost {lost[qos]},"
              f" received twice {totals.dups[qos]}")  # fmt: skip
    warm = [s for s in samples if s[0] >= args.warmup] or samples
    base_rss = warm[0][1]
    peak_rss = max(s[1] for s in warm)
    growth = (peak_rss - base_rss) / base_rss
    print(f"RSS after warm-up {base_rss / 1024:.1f} MiB, peak {peak_rss / 1024:.1f} MiB "
          f"({growth:+.1%}), at the end {end_rss / 1024:.1f} MiB")  # fmt: skip
    fds_live = [s[2] for s in warm]
    print(f"descriptors: {samples[0][2]} with every client connected, {min(fds_live)}-"
          f"{max(fds_live)} during the run, {end_fds} after all left")  # fmt: skip
    flat = growth <= args.rss_slack and max(fds_live) <= samples[0][2] + args.clients // 10
    ok = lost[1] == lost[2] == 0 and totals.dups[2] == 0 and flat
    print("OK" if ok else "NOT OK: lost QoS 1/2 messages, QoS 2 duplicates, or growth")
    return 0 if ok else 1


async def _away_and_back(c: Client, seconds: float) -> None:
    await c.go_away()
    await asyncio.sleep(seconds)
    await c.connect()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=600, help="seconds of load")
    ap.add_argument("--rate", type=float, default=1000, help="publishes per second, in all")
    ap.add_argument("--churn", type=float, default=30, help="seconds between reconnect rounds")
    ap.add_argument("--sample", type=float, default=10, help="seconds between RSS samples")
    ap.add_argument("--warmup", type=float, default=30, help="seconds before RSS is the base")
    ap.add_argument("--rss-slack", type=float, default=0.15, help="RSS growth allowed")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.clients + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the broker inherits it
    cfg = {"sys_topics": {"enabled": True, "interval": 10}, "log": {"level": "warning"}}
    with BrokerProcess(cfg) as b:
        assert b.proc is not None
        return asyncio.run(soak(args, b.port, b.proc.pid))


if __name__ == "__main__":
    sys.exit(main())
