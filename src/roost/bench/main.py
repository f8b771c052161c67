"""Runs a bench: its clients in this process or in -j worker processes, a report each second,
the broker's stats beside it (--api), and a summary when it ends (limit, --duration, Ctrl-C,
or every client gone)."""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import resource
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from roost.bench import options
from roost.bench.histogram import Histogram
from roost.bench.report import Reporter, open_outputs
from roost.bench.runner import Runner
from roost.bench.stats import NAMES

FD_SPARE = 64  # files besides the clients' sockets: pipes, the event loop, TLS files


def raise_fd_limit(needed: int) -> int:
    """Raise RLIMIT_NOFILE's soft limit toward ``needed`` (and the hard one when privileged);
    returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed <= soft:
        return soft
    if hard != resource.RLIM_INFINITY and needed > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))  # root may raise both
            return needed
        except (ValueError, OSError):
            needed = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


def partition(opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Each worker's clients, first connection slot, slot spacing and share of -L."""
    n = opts.workers
    seqs = list(range(opts.startnumber + 1, opts.startnumber + opts.count + 1))
    step = 1.0 / opts.connrate if opts.connrate > 0 else opts.interval / 1000.0
    limit = getattr(opts, "limit", 0)
    out = []
    for w in range(n):
        mine = seqs[w::n]
        budget = None
        if limit:
            # Shares in proportion to clients; the remainder goes to the first workers.
            budget = limit // n + (1 if w < limit % n else 0)
        out.append({"seqs": mine, "first_slot": w * step, "step": step * n, "budget": budget})
    return out


class LocalSource:
    """Clients in this process."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def poll(self) -> dict[str, Any]:
        return self.runner.snapshot()

    async def stop(self) -> dict[str, Any]:
        await self.runner.stop()
        return self.runner.snapshot()


class WorkerSource:
    """Clients in a worker process, asked for a snapshot over a pipe."""

    def __init__(self, proc: Any, conn: Connection) -> None:
        self.proc = proc
        self.conn = conn
        self.last: dict[str, Any] = {"counters": {}, "connected": 0, "latency": None,
                                     "finished": False, "complete": False}  # fmt: skip
        self._loop = asyncio.get_running_loop()
        self._replies: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._loop.add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            self._replies.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            self._loop.remove_reader(self.conn.fileno())
            self._replies.put_nowait(None)

    async def _ask(self, what: str, timeout: float) -> dict[str, Any]:
        try:
            self.conn.send(what)
            reply = await asyncio.wait_for(self._replies.get(), timeout)
        except (TimeoutError, OSError, BrokenPipeError):
            reply = None
        if reply is None:
            # A dead or stuck worker: keep its last counters, report no new latency.
            return {**self.last, "latency": None, "finished": True}
        self.last = reply
        return reply

    async def poll(self) -> dict[str, Any]:
        return await self._ask("snap", 0.9)

    async def stop(self) -> dict[str, Any]:
        snap = await self._ask("stop", 15)
        self._loop.remove_reader(self.conn.fileno())
        await asyncio.to_thread(self.proc.join, 5)
        if self.proc.is_alive():
            self.proc.kill()
            await asyncio.to_thread(self.proc.join, 2)
        return snap


def _worker_main(opts: argparse.Namespace, part: dict[str, Any], run_id: int,
                 conn: Connection) -> None:  # fmt: skip
    # Ctrl-C reaches the whole process group: the parent decides, workers wait to be told.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if conn.recv() != "go":  # the parent first takes the broker's baseline (--api)
        return
    _install_loop(opts)
    asyncio.run(_worker(opts, part, run_id, conn))


async def _worker(opts: argparse.Namespace, part: dict[str, Any], run_id: int,
                  conn: Connection) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    runner = Runner(opts, part["seqs"], part["first_slot"], part["step"], part["budget"], run_id)
    await runner.start()
    done = loop.create_future()

    def readable() -> None:
        try:
            what = conn.recv()
        except (EOFError, OSError):
            what = "stop"
        if what == "snap":
            conn.send(runner.snapshot())
        elif not done.done():
            loop.remove_reader(conn.fileno())
            done.set_result(None)

    loop.add_reader(conn.fileno(), readable)
    await done
    await runner.stop()
    try:
        conn.send(runner.snapshot())
    except OSError:
        pass


def _install_loop(opts: argparse.Namespace) -> None:
    """uvloop for TCP, TLS and WebSocket (about twice the messages per CPU-second); the
    standard loop for QUIC: aioquic's datagram handshakes stall on uvloop."""
    if os.environ.get("ROOST_BENCH_LOOP", "auto") == "asyncio" or opts.transport == "quic":
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def start_workers(opts: argparse.Namespace, run_id: int,
                  method: str = "fork") -> list[tuple[Any, Connection]]:  # fmt: skip
    """Start -j worker processes. Fork only before an event loop runs in this process (the
    CLI does): a forked child would inherit it as running."""
    ctx = mp.get_context(method)
    out = []
    for part in partition(opts):
        parent, child = ctx.Pipe()
        proc = ctx.Process(  # type: ignore[attr-defined]  # typeshed: concrete contexts only
            target=_worker_main, args=(opts, part, run_id, child), daemon=True
        )
        proc.start()
        child.close()
        out.append((proc, parent))
    return out


async def run_async(opts: argparse.Namespace, stop: asyncio.Event | None = None,
                    workers: list[tuple[Any, Connection]] | None = None,
                    run_id: int | None = None, silent: bool = False,
                    records: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run a bench in this event loop and return its summary record: the library entry
    point. With -j and no ``workers`` given, they are spawned (not forked) from here.
    ``silent`` prints nothing; ``records`` collects every tick's record and the summary's."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    text, json_out = open_outputs(opts.json)
    if silent:
        text = None
    reporter = Reporter(opts.bench_command, text, json_out, quiet=opts.quiet, records=records)
    run_id = run_id if run_id is not None else random.getrandbits(32)
    sampler = None
    if opts.api:
        from roost.bench.brokerapi import BrokerSampler

        sampler = BrokerSampler(opts.api, opts.api_key)
        await sampler.sample()  # the baseline: what the broker counts from here is ours
    sources: list[Any] = []
    if opts.workers == 1:
        part = partition(opts)[0]
        runner = Runner(opts, part["seqs"], 0.0, part["step"], part["budget"], run_id)
        await runner.start()
        sources.append(LocalSource(runner))
    else:
        if workers is None:
            workers = await asyncio.to_thread(start_workers, opts, run_id, "spawn")
        for proc, conn in workers:
            conn.send("go")
            sources.append(WorkerSource(proc, conn))
    t0 = loop.time()
    window = Histogram()
    why = "stopped"
    counters: dict[str, int] = {}

    cpu0 = [0.0] * len(sources)

    def merge(snaps: list[dict[str, Any]]) -> tuple[dict[str, int], int]:
        totals = dict.fromkeys(NAMES, 0)
        connected = 0
        reporter.cpu = sum(s.get("cpu", 0.0) for s in snaps) - sum(cpu0)
        for s in snaps:
            for k, v in s["counters"].items():
                totals[k] += v
            connected += s.get("connected", 0)
            if s.get("latency"):
                window.merge_sparse(s["latency"])
        return totals, connected

    cpu0[:] = [s.get("cpu", 0.0) for s in await asyncio.gather(*(s.poll() for s in sources))]
    try:
        next_tick = t0 + 1.0
        end_at = t0 + opts.duration if opts.duration else float("inf")
        while True:
            waits = [loop.create_task(stop.wait())]
            if opts.workers == 1:
                waits.append(loop.create_task(runner.complete.wait()))  # end at once after -L
            wake = min(next_tick, end_at)
            await asyncio.wait(waits, timeout=max(0.0, wake - loop.time()),
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            for w in waits:
                w.cancel()
            if stop.is_set():
                why = "interrupted"
                break
            if opts.workers == 1 and runner.complete.is_set():
                why = "publish limit reached"
                break
            if loop.time() >= end_at - 0.001 and end_at < next_tick - 0.05:
                why = "duration reached"  # between ticks: the summary has the rest
                break
            next_tick += 1.0
            snaps, broker = await asyncio.gather(
                asyncio.gather(*(s.poll() for s in sources)),
                sampler.sample() if sampler else _none(),
            )
            counters, connected = merge(snaps)
            reporter.tick(loop.time() - t0, counters, connected, window, broker)
            window.clear()
            if opts.duration and loop.time() - t0 >= opts.duration - 0.05:
                why = "duration reached"
                break
            if opts.bench_command == "pub" and opts.limit and all(s["complete"] for s in snaps):
                why = "publish limit reached"
                break
            if all(s["finished"] for s in snaps):
                why = "no client left"
                break
    finally:
        final = await asyncio.gather(*(s.stop() for s in sources))
        counters, _ = merge(final)
        firsts = [s["first_pub"] for s in final if s.get("first_pub") is not None]
        ends = [s["completed_at"] for s in final if s.get("completed_at") is not None]
        publish_seconds = None  # first publish to last ack, when -L was reached everywhere
        if firsts and len(ends) == len(final):
            publish_seconds = round(max(ends) - min(firsts), 6)
        broker = await sampler.sample() if sampler else None
        if broker is not None:
            reporter.broker_last = broker
        if window.count:
            reporter.total_latency.merge(window)
        if sampler is not None:
            await sampler.close()
        rss = sum(s.get("maxrss_kb", 0) for s in final) // 1024
        summary = reporter.summary(loop.time() - t0, counters, why,
                                   {"publish_seconds": publish_seconds,
                                    "bench_maxrss_mb": rss})  # fmt: skip
        if json_out is not None and json_out is not sys.stdout:
            json_out.close()
    return summary


async def _none() -> None:
    return None


def run(argv: list[str]) -> int:
    opts = options.parse(argv)
    return run_opts(opts)


def run_opts(opts: argparse.Namespace) -> int:
    per_process = -(-opts.count // opts.workers)
    sockets = per_process * (2 if opts.transport == "quic" else 1)  # a migration holds two
    limit = raise_fd_limit(sockets + FD_SPARE)
    if limit < sockets + FD_SPARE:
        print(f"warning: open file limit {limit} holds about {limit - FD_SPARE} connections "
              f"per process; use -j or raise the hard limit", file=sys.stderr)  # fmt: skip
    run_id = random.getrandbits(32)
    workers = start_workers(opts, run_id) if opts.workers > 1 else None
    _install_loop(opts)

    async def main() -> dict[str, Any]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await run_async(opts, stop, workers, run_id)

    summary = asyncio.run(main())
    c = summary["counters"]
    if summary["ended"] == "no client left" or (opts.count and not c["connect_succ"]):
        return 1
    return 0
