"""How much load one `roost bench` process gives, against mosquitto (faster than Roost, so the
broker is not what limits it), and the same loads from mosquitto's own C clients.

Exact command (repository root; PYTHONPATH=src to measure this checkout)::

    PYTHONPATH=src python benchmarks/bench_speed.py --runs 3 --duration 8

Each scenario runs ``--runs`` times, each time against a fresh mosquitto on a free loopback
port, and prints medians: the steady rate (from the bench's own JSON ticks, leaving out the
first and last second), the bench's CPU and mosquitto's CPU in % of one core over the run.
A bench well under 100 % of a core while it meets its rate is not the bottleneck.

``idle`` opens 20,000 connections (-R 5000) and holds them: it needs an open-file limit above
20,000 for both processes; as root the hard limit is raised for mosquitto, and `roost bench`
raises its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import procstat

HOST = "127.0.0.1"
MOSQUITTO = "/usr/sbin/mosquitto"
PAYLOAD = 64
# Connections for "idle": the hard open-file limit is 20,000 here for every process (no
# CAP_SYS_RESOURCE to raise it), and the broker needs one descriptor per client too.
IDLE = int(os.environ.get("BENCH_IDLE", "19900"))

# name -> (subscriber args or None, publisher/conn args, what the figure is)
SCENARIOS: dict[str, tuple[list[str] | None, list[str], str]] = {
    "qos0-flat": (None, ["pub", "-c", "10", "-I", "0", "-s", str(PAYLOAD), "-t", "s/%i"],
                  "QoS 0 published/s, 10 clients as fast as the sockets take"),
    "qos0-paced": (None, ["pub", "-c", "100", "-I", "1", "-s", str(PAYLOAD), "-t", "s/%i"],
                   "QoS 0 published/s, 100 clients x 1000 msg/s (-I 1)"),
    "qos1-flat": (None, ["pub", "-c", "10", "-I", "0", "-q", "1", "-F", "100", "-s",
                         str(PAYLOAD), "-t", "s/%i"],
                  "QoS 1 acknowledged/s, 10 clients, 100 in flight each"),
    "qos1-paced": (None, ["pub", "-c", "30", "-I", "1", "-q", "1", "-F", "10", "-s",
                          str(PAYLOAD), "-t", "s/%i"],
                   "QoS 1 acknowledged/s, 30 clients x 1000 msg/s (-I 1)"),
    "sub-fanout": (["sub", "-c", "10", "-t", "f/x"],
                   ["pub", "-c", "1", "-I", "0.1", "-s", str(PAYLOAD), "-t", "f/x"],
                   "QoS 0 received/s by one sub process: 1 publisher x 10,000 msg/s to 10"),
    # Two source addresses: past ~14,000 connections from one address to one port, Linux's
    # connect() searches the odd half of the ephemeral ports, slowly (a ms per connection).
    "idle": (None, ["conn", "-c", str(IDLE), "-R", "2000", "--ifaddr", "127.0.0.1,127.0.0.2"],
             f"connections held by one process ({IDLE:,} asked, -R 2000, 2 source addresses)"),
}  # fmt: skip


class Mosquitto:
    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        conf = workdir / f"mosquitto-{self.port}.conf"
        conf.write_text(f"listener {self.port} {HOST}\nallow_anonymous true\n"
                        "persistence false\nmax_queued_messages 100000\n"
                        "max_connections -1\nlog_dest none\n")  # fmt: skip
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], start_new_session=True,
                                     preexec_fn=_more_files, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("mosquitto did not start") from None
                time.sleep(0.05)

    def cpu(self) -> float:
        return procstat.cpu_seconds([self.proc.pid])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _more_files() -> None:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, 65536))  # root only; else as is
    except (ValueError, OSError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _bench(args: list[str], port: int, duration: float, out: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "roost", "bench", *args, "-h", HOST, "-p", str(port), "-i", "0",
           "--duration", str(duration), "--json", str(out), "--quiet"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL)


def _wait_cpu(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait for a child; its CPU seconds (user + system, with its own children)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"bench did not end within {timeout}s")


def steady_rate(path: Path, counter: str) -> float:
    """Rate of ``counter`` over the seconds it moved, leaving out the first and last such
    second (the load ramping up, and the part-second at the end)."""
    ticks = [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "tick"]
    seen = [(r["uptime"], r["counters"][counter]["total"]) for r in ticks
            if counter in r["counters"]]  # fmt: skip
    if len(seen) < 4:
        return 0.0
    (t0, n0), (t1, n1) = seen[1], seen[-2]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def run_scenario(name: str, duration: float, tmp: Path) -> dict[str, Any]:
    sub_args, main_args, _ = SCENARIOS[name]
    broker = Mosquitto(tmp)
    try:
        cpu0, t0 = broker.cpu(), time.monotonic()
        sub = None
        if sub_args:
            sub_out = tmp / f"{name}-sub-{broker.port}.jsonl"
            sub = _bench(sub_args, broker.port, duration + 2, sub_out)
            time.sleep(1.5)  # subscribed before anything is published
        main_out = tmp / f"{name}-{broker.port}.jsonl"
        if name == "idle":
            duration = max(duration, IDLE / 2000 + 5)  # all connected, then held 5 s
        main = _bench(main_args, broker.port, duration, main_out)
        main_cpu = _wait_cpu(main, duration + 60)
        sub_cpu = _wait_cpu(sub, duration + 60) if sub else 0.0
        span = time.monotonic() - t0
        broker_cpu = broker.cpu() - cpu0
    finally:
        broker.stop()
    summary = json.loads(main_out.read_text().splitlines()[-1])
    bench_cpu = sub_cpu if sub is not None else main_cpu
    if name == "idle":
        c = summary["counters"]
        figure = float(c["connect_succ"] - c["conn_lost"])
        extra: dict[str, Any] = {"conn_lost": c["conn_lost"], "rss_mb": summary["bench_maxrss_mb"],
                                 "cpu_s": round(main_cpu, 1)}
    elif sub is not None:
        figure = steady_rate(sub_out, "recv")
        s = json.loads(sub_out.read_text().splitlines()[-1])
        extra = {"lost": s["counters"]["lost"], "p99_ms": (s["latency"] or {}).get("p99"),
                 "us_per_msg": round(1e6 * bench_cpu / max(1, s["counters"]["recv"]), 2)}
    else:
        figure = steady_rate(main_out, "pub")
        extra = {"us_per_msg": round(1e6 * bench_cpu / max(1, summary["counters"]["pub"]), 2)}
    # bench_cpu: the process the figure is about, % of one core over its own run.
    return {"figure": figure, "bench_cpu": 100 * bench_cpu / (duration + (2 if sub else 0)),
            "broker_cpu": 100 * broker_cpu / span, **extra}  # fmt: skip


def c_clients(n: int, tmp: Path) -> dict[str, float]:
    """mosquitto_pub (--repeat) publishing n QoS 0 messages, and mosquitto_sub receiving them:
    messages per second and CPU microseconds per message of each C client."""
    broker = Mosquitto(tmp)
    try:
        base = ["-h", HOST, "-p", str(broker.port), "-t", "c/x"]
        sub = subprocess.Popen(["mosquitto_sub", *base, "-C", str(n), "-W", "120"],
                               stdout=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.5)
        t0 = time.monotonic()
        pub = subprocess.Popen(["mosquitto_pub", *base, "-m", "x" * PAYLOAD, "--repeat", str(n),
                                "--repeat-delay", "0"])  # fmt: skip
        pub_cpu = _wait_cpu(pub, 120)
        t_pub = time.monotonic() - t0
        sub_cpu = _wait_cpu(sub, 120)
        t_sub = time.monotonic() - t0
    finally:
        broker.stop()
    return {"pub_rate": n / t_pub, "pub_us": 1e6 * pub_cpu / n, "sub_rate": n / t_sub,
            "sub_us": 1e6 * sub_cpu / n}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list")
    ap.add_argument("--c-messages", type=int, default=200_000,
                    help="messages for the mosquitto_pub/mosquitto_sub comparison "
                         "(0: skip)")  # fmt: skip
    args = ap.parse_args()
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} cores, load average {load:.1f} before; {args.runs} runs x "
          f"{args.duration:g}s; medians")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as d:
        tmp = Path(d)
        for name in args.scenarios.split(","):
            results = [run_scenario(name, args.duration, tmp) for _ in range(args.runs)]
            med = {k: statistics.median(r[k] for r in results if r.get(k) is not None)
                   for k in results[0] if any(r.get(k) is not None for r in results)}  # fmt: skip
            runs = ", ".join(f"{r['figure']:,.0f}" for r in results)
            extra = "".join(f"  {k}={med[k]:g}" for k in med
                            if k not in ("figure", "bench_cpu", "broker_cpu"))  # fmt: skip
            print(f"{name:11} {med['figure']:>10,.0f}  bench cpu {med['bench_cpu']:5.1f}%  "
                  f"mosquitto cpu {med['broker_cpu']:5.1f}%{extra}   (runs: {runs})")
            print(f"{'':11} {SCENARIOS[name][2]}", flush=True)
        if args.c_messages:
            rs = [c_clients(args.c_messages, tmp) for _ in range(args.runs)]
            m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            print(f"mosquitto_pub --repeat {args.c_messages}: {m['pub_rate']:,.0f} msg/s, "
                  f"{m['pub_us']:.2f} us CPU/msg; mosquitto_sub -C: {m['sub_rate']:,.0f} "
                  f"msg/s, {m['sub_us']:.2f} us CPU/msg")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.1f}; command: "
          f"{shlex.join([sys.executable, *sys.argv])}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
