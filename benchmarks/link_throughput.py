"""Node-to-node link throughput: forwards per second and CPU per forward, QoS 0 and QoS 1.

Exact command (repository root; PYTHONPATH=src to measure this checkout)::

    PYTHONPATH=src python benchmarks/link_throughput.py --runs 5 --count 200000

Two processes on loopback: this one is node "a" and forwards ``--count`` messages (``--payload``
bytes, no properties) to node "b", a receiver subprocess whose ``on_forward`` only counts. The
sender runs closed-loop: it hands the link ``--batch`` forwards per event-loop turn and, at
QoS 0, waits while more than ``--backlog`` are queued on the link (so nothing is dropped); at
QoS 1 it waits, through ``after()``, while more than ``--backlog`` are unacknowledged. A QoS 0
run ends with one QoS 1 marker forward: the link keeps order, so its PUBACK means every QoS 0
forward before it was handed over. A QoS 1 run ends when ``after()`` fires.

Reported per QoS level, medians over ``--runs``: forwards per second (wall clock), and CPU
microseconds per forward in the sender (including building the Forward records, as a broker
would) and in the receiver (process CPU time, read through the link's own RPC).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from roost.cluster.link import Forward, Links

SECRET = b"bench-secret"
CLUSTER = "bench"


# ------------------------------------------------------------------------------- receiver


async def receive() -> None:
    count = 0

    def on_forward(f: Forward) -> None:
        nonlocal count
        count += 1

    async def on_request(origin: str, kind: str, payload: bytes) -> bytes:
        if kind == "count":
            return str(count).encode()
        if kind == "cpu":
            return repr(time.process_time()).encode()
        raise ValueError(kind)

    links = Links("b", CLUSTER, SECRET, on_forward, on_request)
    _, port = await links.start("127.0.0.1:0")
    print(port, flush=True)
    # Run until the parent closes our stdin.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await links.close()


# ------------------------------------------------------------------------------- sender


async def one_run(links: Links, qos: int, count: int, payload: bytes, batch: int,
                  backlog: int) -> tuple[float, float, float]:  # fmt: skip
    """(forwards/s, sender µs per forward, receiver µs per forward)."""
    rcpu0 = float(await links.request("b", "cpu", b""))
    t0 = time.perf_counter()
    c0 = time.process_time()
    loop = asyncio.get_running_loop()
    forward, new_mid = links.forward, links.new_mid
    acked: deque[asyncio.Future[None]] = deque()  # one per QoS 1 batch, in order
    sent = 0
    while sent < count:
        n = min(batch, count - sent)
        for _ in range(n):
            forward("b", Forward("bench/link/aa", payload, qos, False, None, "a", new_mid()))
        sent += n
        if qos:  # wait on acks, no polling: at most `backlog` forwards unacknowledged
            fut = loop.create_future()
            links.after(functools.partial(fut.set_result, None))
            acked.append(fut)
            if len(acked) * batch > backlog:
                await acked.popleft()
        else:
            await asyncio.sleep(0)
            while links.stats()["b"]["queue_depth"] > backlog:
                await asyncio.sleep(0.0005)
    if qos == 0:
        forward("b", Forward("bench/link/end", b"", 1, False, None, "a", new_mid()))
    done = loop.create_future()
    links.after(lambda: done.set_result(None))
    await done
    elapsed = time.perf_counter() - t0
    scpu = time.process_time() - c0
    rcpu = float(await links.request("b", "cpu", b"")) - rcpu0
    return count / elapsed, scpu / count * 1e6, rcpu / count * 1e6


async def bench(args: argparse.Namespace) -> None:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--receiver"]
    if args.uvloop:
        cmd.append("--uvloop")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())

        async def no_requests(origin: str, kind: str, payload: bytes) -> bytes:
            raise ValueError(kind)

        links = Links("a", CLUSTER, SECRET, lambda f: None, no_requests)
        await links.start("127.0.0.1:0")
        links.set_peers({"b": f"127.0.0.1:{port}"})
        await links.request("b", "count", b"", timeout=10)  # the link is up
        payload = b"x" * args.payload
        await one_run(links, 1, min(args.count, 20_000), payload, args.batch, args.backlog)  # warm
        print(f"{args.count} forwards of {args.payload} B per run, median of {args.runs} runs, "
              f"{'uvloop' if args.uvloop else 'asyncio'}")  # fmt: skip
        print(f"{'QoS':>3}  {'forwards/s':>11}  {'sender µs/fwd':>13}  {'receiver µs/fwd':>15}")
        for qos in args.qos:
            results = [
                await one_run(links, qos, args.count, payload, args.batch, args.backlog)
                for _ in range(args.runs)
            ]
            rate, scpu, rcpu = (statistics.median(r[i] for r in results) for i in range(3))
            dropped = links.stats()["b"]["dropped_qos0"]
            print(f"{qos:>3}  {rate:>11,.0f}  {scpu:>13.2f}  {rcpu:>15.2f}"
                  + (f"  ({dropped} dropped)" if dropped else ""))  # fmt: skip
        await links.close()
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=200_000, help="forwards per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--payload", type=int, default=64, help="payload bytes")
    ap.add_argument("--qos", type=int, nargs="+", default=[0, 1], choices=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=500, help="forwards per event-loop turn")
    ap.add_argument("--backlog", type=int, default=5000, help="queued forwards before waiting")
    ap.add_argument("--uvloop", action="store_true", help="run both processes on uvloop")
    ap.add_argument("--receiver", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.uvloop:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    asyncio.run(receive() if args.receiver else bench(args))


if __name__ == "__main__":
    main()
