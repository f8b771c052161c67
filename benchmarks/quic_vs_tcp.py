"""QUIC vs TCP: pub/sub throughput and connection setup time (TCP, QUIC full handshake, QUIC
0-RTT), against a real ``roost start`` subprocess on loopback. Prints the median of several runs.

    PYTHONPATH=src python3 benchmarks/quic_vs_tcp.py [--runs 5] [--messages 5000] [--size 64]

Both sides use the same kind of client: an asyncio Protocol with Roost's own codec for TCP, and
the package's aioquic client (roost.client.quic) for QUIC, so the figures compare transports, not
client libraries. Publisher and subscriber run in this process, the broker in another.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.brokerproc import BrokerProcess, free_port

from roost.client.quic import QuicClient
from roost.mqtt.codec import Decoder, encode
from roost.mqtt.packets import (
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
)

WINDOW = 32  # the broker's default Receive Maximum


class TcpClient(asyncio.Protocol):
    """The TCP twin of the QUIC client's control stream, enough for the benchmark."""

    def __init__(self) -> None:
        self.decoder = Decoder(version=MQTT_5, server_side=False)
        self.messages: asyncio.Queue[Publish] = asyncio.Queue()
        self.waiters: dict[tuple[int, int], asyncio.Future[Packet]] = {}
        self.connack: asyncio.Future[Connack] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.pid = 0

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
            if type(p) is Publish:
                if p.qos == 1:
                    self.transport.write(encode(Puback(p.packet_id), MQTT_5))  # type: ignore[union-attr, arg-type]
                self.messages.put_nowait(p)
            elif type(p) is Connack:
                self.connack.set_result(p)
            else:
                fut = self.waiters.pop((p.type, p.packet_id), None)  # type: ignore[attr-defined]
                if fut is not None:
                    fut.set_result(p)

    def _wait(self, ptype: int, pid: int) -> asyncio.Future[Packet]:
        fut = asyncio.get_running_loop().create_future()
        self.waiters[(ptype, pid)] = fut
        return fut

    async def subscribe(self, topic: str, qos: int) -> None:
        self.pid += 1
        fut = self._wait(Suback.type, self.pid)
        self.transport.write(encode(Subscribe(self.pid, [Subscription(topic, qos)]), MQTT_5))  # type: ignore[union-attr]
        await fut

    def publish_nowait(self, topic: str, payload: bytes, qos: int) -> asyncio.Future | None:
        if qos == 0:
            self.transport.write(encode(Publish(topic, payload), MQTT_5))  # type: ignore[union-attr]
            return None
        self.pid = self.pid % 65535 + 1
        fut = self._wait(Puback.type, self.pid)
        self.transport.write(encode(Publish(topic, payload, 1, packet_id=self.pid), MQTT_5))  # type: ignore[union-attr]
        return fut

    async def disconnect(self) -> None:
        self.transport.write(encode(Disconnect(0), MQTT_5))  # type: ignore[union-attr]
        self.transport.close()  # type: ignore[union-attr]


async def _quic(port: int, cid: str) -> QuicClient:
    c = QuicClient("127.0.0.1", port, cid)
    await c.connect()
    return c


async def throughput(
    kind: str, ports: dict[str, int], n: int, size: int, qos: int, run: int
) -> float:
    """Messages per second from one publisher through the broker to one subscriber."""
    topic = f"bench/{kind}/{qos}/{run}"
    if kind == "tcp":
        sub: TcpClient | QuicClient = await TcpClient.connect(ports["tcp"], f"s-{topic}")
        pub: TcpClient | QuicClient = await TcpClient.connect(ports["tcp"], f"p-{topic}")
        await sub.subscribe(topic, qos)
        publish = pub.publish_nowait
    else:
        sub = await _quic(ports["quic"], f"s-{topic}")
        pub = await _quic(ports["quic"], f"p-{topic}")
        await sub.control.subscribe(topic, qos)
        publish = pub.control.publish_nowait
    payload = b"x" * size
    received = 0

    async def consume() -> None:
        nonlocal received
        q = sub.messages
        while received < n:
            await q.get()
            received += 1

    consumer = asyncio.create_task(consume())
    t0 = time.perf_counter()
    window: list[asyncio.Future] = []
    for i in range(n):
        fut = publish(topic, payload, qos)
        if fut is not None:
            window.append(fut)
            if len(window) >= WINDOW:
                await window.pop(0)
        elif i % 64 == 63:
            await asyncio.sleep(0)  # let the writes go out and the subscriber read
    try:
        await asyncio.wait_for(consumer, 60)
    except TimeoutError:
        print(f"  ({kind} qos{qos}: {received}/{n} received)")
    elapsed = time.perf_counter() - t0
    await sub.disconnect()
    await pub.disconnect()
    return received / elapsed


async def setup_time(kind: str, ports: dict[str, int], reps: int) -> list[float]:
    """Seconds from nothing to CONNACK, ``reps`` times."""
    out = []
    ticket = None
    if kind == "quic-0rtt":
        warm = await _quic(ports["quic"], "warm")
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
            c = QuicClient("127.0.0.1", ports["quic"], f"setup-{i}", session_ticket=ticket)
            await c.connect()
            out.append(time.perf_counter() - t0)
            if kind == "quic-0rtt":
                assert c.handshake is None or c.handshake.early_data_accepted
                while c.session_ticket is None:  # tickets are single use: take the new one
                    await asyncio.sleep(0.002)
                ticket = c.session_ticket
        await c.disconnect()
    return out


async def main(args: argparse.Namespace) -> None:
    ports = {"tcp": free_port(), "quic": free_port()}
    cfg = {
        "listeners": {"quic": {"default": {"enabled": True, "bind": f"127.0.0.1:{ports['quic']}"}}},
        "log": {"level": "warning"},
        "sys_topics": {"enabled": False},
    }
    # Figures swing with whatever else runs on the machine: say how busy it was.
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    with BrokerProcess(cfg, port=ports["tcp"]):
        await asyncio.sleep(0.5)  # the QUIC listener starts just after TCP
        print(f"throughput: {args.messages} messages of {args.size} B, 1 publisher -> broker -> "
              f"1 subscriber, median of {args.runs} runs (msg/s)")  # fmt: skip
        for qos in (0, 1):
            for kind in ("tcp", "quic"):
                rates = [await throughput(kind, ports, args.messages, args.size, qos, r)
                         for r in range(args.runs)]  # fmt: skip
                print(f"  {kind:5} qos{qos}: {statistics.median(rates):9.0f}   "
                      f"(runs: {', '.join(f'{r:.0f}' for r in rates)})")  # fmt: skip
        print(f"connection setup to CONNACK, median of {args.runs} x {args.reps} (ms)")
        for kind in ("tcp", "quic-full", "quic-0rtt"):
            meds = []
            for _ in range(args.runs):
                meds.append(statistics.median(await setup_time(kind, ports, args.reps)))
            print(f"  {kind:10}: {statistics.median(meds) * 1000:7.2f}   "
                  f"(runs: {', '.join(f'{m * 1000:.2f}' for m in meds)})")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20, help="connections per setup-time run")
    asyncio.run(main(ap.parse_args()))
