"""QUIC vs TCP: pub/sub throughput, broker CPU per message, connection setup time (TCP, QUIC
full handshake, QUIC 0-RTT) and memory per idle QUIC connection, against one real ``roost
start`` subprocess on loopback with a TCP listener and one QUIC listener per stack (aioquic,
qh3: see transport/quicstack.py), so every stack is measured side by side in one run, the runs
interleaved. Prints medians and ratios to TCP.

    PYTHONPATH=src python3 benchmarks/quic_vs_tcp.py [--runs 5] [--duration 3] [--size 64]
        [--stacks aioquic,qh3] [--idle 1000]

Broker CPU per message is the broker process's user+system CPU during a run divided by the
messages the subscriber received in it (the broker does nothing else meanwhile).

Throughput is measured with `roost bench`: a subscriber process and a publisher process sending
as fast as the connection allows (QoS 1: at most 32 in flight, the broker's default Receive
Maximum), over TCP or over QUIC, so the figures compare transports with the same client. The
figure is the subscriber's steady receive rate (the bench's per-second counts, leaving out the
first and last second). This is an open loop: a publisher faster than the subscriber fills the
broker's queue for it, and what the broker drops (QoS 0; QoS 1 past the queue limits only under
mqueue_full_policy drop_oldest, else it is refused, see docs/queues.md) shows as "lost", found
from the sequence numbers in the payloads.
Connection setup times and idle connections use the package's aioquic client (roost.client.quic).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from procstat import cpu_seconds  # benchmarks/, this script's directory
from tests.brokerproc import BrokerProcess, free_port, rss_kb

from roost.bench import steady_rate
from roost.client.quic import QuicClient
from roost.mqtt.codec import Decoder, encode
from roost.mqtt.packets import MQTT_5, Connack, Connect, Disconnect

WINDOW = 32  # the broker's default Receive Maximum


class TcpClient(asyncio.Protocol):
    """Just enough MQTT over TCP to time a connection's setup to CONNACK."""

    def __init__(self) -> None:
        self.decoder = Decoder(version=MQTT_5, server_side=False)
        self.connack: asyncio.Future[Connack] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def connect(cls, port: int, client_id: str) -> TcpClient:
        loop = asyncio.get_running_loop()
        _, c = await loop.create_connection(cls, "127.0.0.1", port)
        c.transport.write(encode(Connect(client_id, MQTT_5), MQTT_5))  # type: ignore[union-attr]
        await c.connack
        return c

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        for p in self.decoder.feed(data):
            if type(p) is Connack and not self.connack.done():
                self.connack.set_result(p)

    async def disconnect(self) -> None:
        self.transport.write(encode(Disconnect(0), MQTT_5))  # type: ignore[union-attr]
        self.transport.close()  # type: ignore[union-attr]


async def _quic(port: int, cid: str) -> QuicClient:
    c = QuicClient("127.0.0.1", port, cid)
    await c.connect()
    return c


async def throughput(
    kind: str, ports: dict[str, int], duration: float, size: int, qos: int, run: int, pid: int
) -> tuple[float, int, float]:
    """(messages per second, messages lost, broker CPU seconds per message received) from one
    publisher through the broker to one subscriber: two `roost bench` processes, so neither
    client waits for the other's CPU."""
    topic = f"bench/{kind}/{qos}/{run}"
    common = ["-h", "127.0.0.1", "-p", str(ports[kind]), "-c", "1", "-i", "0", "-q", str(qos),
              "--quiet"] + (["--quic"] if kind != "tcp" else [])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="qvt-") as tmp:
        out = Path(tmp) / "sub.jsonl"
        sub = await _bench("sub", *common, "-t", topic, "--duration", str(duration + 2),
                           "--json", str(out))  # fmt: skip
        await asyncio.sleep(1.0)  # subscribed before the first message
        cpu0 = cpu_seconds([pid])
        pub = await _bench("pub", *common, "-t", topic, "-I", "0", "-s", str(size),
                           "-F", str(WINDOW), "--duration", str(duration))  # fmt: skip
        await asyncio.wait_for(asyncio.gather(pub.wait(), sub.wait()), duration + 30)
        cpu = cpu_seconds([pid]) - cpu0
        records = [json.loads(line) for line in out.read_text().splitlines()]
    received = records[-1]["counters"]["recv"]
    per_msg = cpu / received if received else float("nan")  # nothing came through: no figure
    return steady_rate(records, "recv"), records[-1]["counters"]["lost"], per_msg


async def _bench(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roost", "bench", *args, stdout=asyncio.subprocess.DEVNULL
    )


async def setup_time(kind: str, ports: dict[str, int], reps: int) -> list[float]:
    """Seconds from nothing to CONNACK, ``reps`` times; ``kind`` is tcp or STACK-full|0rtt."""
    out = []
    ticket = None
    stack = kind.split("-")[0]
    if kind.endswith("0rtt"):
        warm = await _quic(ports[stack], "warm")
        while warm.session_ticket is None:
            await asyncio.sleep(0.005)
        ticket = warm.session_ticket
        await warm.disconnect()
    for i in range(reps):
        t0 = time.perf_counter()
        if kind == "tcp":
            c: TcpClient | QuicClient = await TcpClient.connect(ports["tcp"], f"setup-{i}")
            out.append(time.perf_counter() - t0)
        else:
            c = QuicClient("127.0.0.1", ports[stack], f"setup-{i}", session_ticket=ticket)
            await c.connect()
            out.append(time.perf_counter() - t0)
            if kind.endswith("0rtt"):
                assert c.handshake is None or c.handshake.early_data_accepted
                while c.session_ticket is None:  # tickets are single use: take the new one
                    await asyncio.sleep(0.002)
                ticket = c.session_ticket
        await c.disconnect()
    return out


async def idle_memory(port: int, pid: int, n: int) -> float:
    """KiB of broker memory (RSS growth) per idle QUIC connection, with ``n`` open at once."""
    base = rss_kb(pid)
    clients = []
    try:
        for i in range(0, n, 50):  # in batches, so handshakes do not time out under load
            batch = [QuicClient("127.0.0.1", port, f"idle-{i + j}") for j in range(min(50, n - i))]
            await asyncio.gather(*(c.connect() for c in batch))
            clients += batch
        await asyncio.sleep(1.0)  # handshakes settled (tickets sent, packets acknowledged)
        return (rss_kb(pid) - base) / n
    finally:
        await asyncio.gather(*(c.disconnect() for c in clients), return_exceptions=True)


async def main(args: argparse.Namespace) -> None:
    stacks = args.stacks.split(",")
    ports = {"tcp": free_port()} | {s: free_port() for s in stacks}
    cfg = {
        "listeners": {"quic": {s: {"enabled": True, "bind": f"127.0.0.1:{ports[s]}", "stack": s}
                               for s in stacks} | {"default": {"enabled": False}}},
        "log": {"level": "warning"},
        "sys_topics": {"enabled": False},
    }  # fmt: skip
    kinds = ["tcp", *stacks]
    # Figures swing with whatever else runs on the machine: say how busy it was.
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    # A generous start timeout: on a busy machine the broker takes a while to import.
    broker = BrokerProcess(cfg, port=ports["tcp"]).start(timeout=90)
    try:
        assert broker.proc is not None
        pid = broker.proc.pid
        await asyncio.sleep(1.0)  # the QUIC listeners start just after TCP
        print(f"throughput: {args.duration:g} s of {args.size} B messages, 1 publisher -> "
              f"broker -> 1 subscriber (roost bench, aioquic client), median of {args.runs} "
              "runs, transports interleaved")  # fmt: skip
        for qos in (0, 1):
            got: dict[str, list[tuple[float, int, float]]] = {k: [] for k in kinds}
            for r in range(args.runs):
                for kind in kinds:
                    got[kind].append(
                        await throughput(kind, ports, args.duration, args.size, qos, r, pid))
            tcp_rate = statistics.median(x[0] for x in got["tcp"])
            for kind in kinds:
                rates = [x[0] for x in got[kind]]
                cpu = statistics.median(x[2] for x in got[kind]) * 1e6
                lost = sum(x[1] for x in got[kind])
                print(f"  {kind:8} qos{qos}: {statistics.median(rates):8.0f} msg/s "
                      f"{statistics.median(rates) / tcp_rate:5.2f}x tcp  "
                      f"broker {cpu:5.1f} us/msg   "
                      f"(runs: {', '.join(f'{r:.0f}' for r in rates)}; lost {lost})")  # fmt: skip
        print(f"connection setup to CONNACK, median of {args.runs} x {args.reps} (ms)")
        for kind in ["tcp"] + [f"{s}-{h}" for s in stacks for h in ("full", "0rtt")]:
            meds = []
            for _ in range(args.runs):
                meds.append(statistics.median(await setup_time(kind, ports, args.reps)))
            print(f"  {kind:12}: {statistics.median(meds) * 1000:7.2f}   "
                  f"(runs: {', '.join(f'{m * 1000:.2f}' for m in meds)})")  # fmt: skip
        if args.idle:
            print(f"broker memory per idle QUIC connection, {args.idle} open (KiB)")
            for s in stacks:
                print(f"  {s:8}: {await idle_memory(ports[s], pid, args.idle):7.1f}")
    finally:
        broker.stop()
        broker.tmp.cleanup()
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--duration", type=float, default=3.0, help="publishing seconds per run")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20, help="connections per setup-time run")
    ap.add_argument("--stacks", default="aioquic,qh3", help="QUIC stacks, comma-separated")
    ap.add_argument("--idle", type=int, default=1000, help="idle QUIC connections (0: skip)")
    asyncio.run(main(ap.parse_args()))
