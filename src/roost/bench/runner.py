"""The clients of one bench process: their connection schedule, shared budget and counters."""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import socket
import ssl
import sys
import time
from typing import Any

from roost.bench.client import Client
from roost.bench.stats import Stats

#: Error lines printed per kind before the rest are only counted.
MAX_REPORTS = 5


class Runner:
    """``seqs`` are the client sequence numbers this process runs. Connection attempts (first
    ones and reconnects) take slots ``step`` seconds apart from ``first_slot`` on: client k of
    -c in -j workers gets the slot it would have had in a single process."""

    def __init__(self, opts: argparse.Namespace, seqs: list[int], first_slot: float,
                 step: float, budget: int | None, run_id: int | None = None) -> None:  # fmt: skip
        self.opts = opts
        self.seqs = seqs
        self.stats = Stats()
        self.stopping = False
        self.budget = budget  # messages left to publish (-L); None: no limit
        self.run_id = run_id if run_id is not None else random.getrandbits(32)
        self.ip = opts.host
        self.ssl_context: ssl.SSLContext | None = None
        self.clients: list[Client] = []
        self.finished = 0
        self.all_gone = asyncio.Event()
        self.complete = asyncio.Event()  # -L published and acknowledged
        self.first_pub: float | None = None  # time.monotonic(): the same clock in every worker
        self.completed_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._first_slot = first_slot
        self._step = step
        self._next_slot = 0.0
        self.handshakes = asyncio.Semaphore(max(1, opts.max_connecting))
        self._reports: dict[str, int] = {}
        self._loop = asyncio.get_running_loop()
        self._sleepers: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        o = self.opts
        kind = socket.SOCK_DGRAM if o.transport == "quic" else socket.SOCK_STREAM
        infos = await self._loop.getaddrinfo(o.host, o.port, type=kind)
        # Resolved once, not per connection; IPv4 first, since "localhost" often lists ::1
        # first and many brokers listen on IPv4 only.
        infos.sort(key=lambda i: i[0] != socket.AF_INET)
        self.ip = infos[0][4][0]
        if o.transport in ("ssl", "wss"):
            self.ssl_context = make_ssl_context(o.cafile, o.certfile, o.keyfile)
        self._next_slot = self._loop.time() + self._first_slot
        addrs = o.ifaddrs or [""]
        for seq in self.seqs:
            c = Client(self, seq, addrs[(seq - o.startnumber - 1) % len(addrs)])
            self.clients.append(c)
            self._tasks.append(self._loop.create_task(c.run()))
        if not self.clients:
            self.all_gone.set()

    async def wait_slot(self) -> None:
        """Wait for this connection attempt's turn (-i / -R); then take ``handshakes``."""
        if self._step > 0:
            now = self._loop.time()
            at = max(now, self._next_slot)
            self._next_slot = at + self._step
            if at > now:
                await self.sleep(at - now)

    async def sleep(self, delay: float) -> None:
        """A sleep that ``stop`` cuts short."""
        fut: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not fut.done():
                fut.set_result(None)

        handle = self._loop.call_later(delay, wake)
        self._sleepers.add(fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._sleepers.discard(fut)

    def take_budget(self, n: int) -> int:
        if n > 0 and self.first_pub is None:
            self.first_pub = time.monotonic()
        if self.budget is None or n <= 0:
            return max(n, 0)
        n = min(n, self.budget)
        self.budget -= n
        return n

    def check_complete(self) -> None:
        """Called once -L is used up, after each ack: notes when the last one came in."""
        if self.completed_at is None and self.publish_complete:
            self.completed_at = time.monotonic()
            self.complete.set()

    @property
    def publish_complete(self) -> bool:
        """-L reached and every message of it acknowledged (or its connection gone)."""
        if self.budget != 0:
            return False
        return not any(c.conn is not None and c.conn.inflight for c in self.clients)

    def client_finished(self, c: Client) -> None:
        self.finished += 1
        if self.finished == len(self.clients):
            self.all_gone.set()

    def report(self, c: Client, what: str, detail: object) -> None:
        n = self._reports.get(what, 0) + 1
        self._reports[what] = n
        if n <= MAX_REPORTS:
            text = str(detail) or type(detail).__name__
            print(f"client({c.seq}): {what} - {text}", file=sys.stderr, flush=True)
        if n == MAX_REPORTS:
            print(f"(further '{what}' lines are only counted)", file=sys.stderr, flush=True)

    def snapshot(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        snap["finished"] = self.all_gone.is_set() and not self.stopping
        snap["complete"] = self.publish_complete
        snap["first_pub"] = self.first_pub
        snap["completed_at"] = self.completed_at
        snap["cpu"] = time.process_time()  # this process's CPU seconds, to show it is no bottleneck
        snap["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return snap

    async def stop(self, drain: float = 2.0) -> None:
        self.stopping = True
        for fut in list(self._sleepers):
            if not fut.done():
                fut.set_result(None)
        for c, task in zip(self.clients, self._tasks, strict=True):
            if c.opening:
                task.cancel()
        await asyncio.gather(*(c.close(drain) for c in self.clients), return_exceptions=True)
        # Each client's task ends when its socket is closed; a broker that does not close
        # within 5 s gets its connections aborted.
        _, pending = await asyncio.wait(self._tasks, timeout=5) if self._tasks else (set(), set())
        for c in self.clients:
            if c.conn is not None:
                c.conn.abort()
        if pending:
            _, pending = await asyncio.wait(pending, timeout=1)
        for t in pending:
            t.cancel()
        for c in self.clients:
            c.seqs.settle(self.stats)


def make_ssl_context(cafile: str | None, certfile: str | None,
                     keyfile: str | None) -> ssl.SSLContext:  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False  # emqtt-bench does not verify the broker by default
        ctx.verify_mode = ssl.CERT_NONE
    if certfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx
