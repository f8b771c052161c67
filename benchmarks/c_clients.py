"""Fan-in with ordinary clients: Debian's mosquitto_pub and mosquitto_sub as the load.

P ``mosquitto_pub --repeat N`` publishers (MQTT 3.1.1, 64-byte payloads) on ``c/in/<i>`` and
one ``mosquitto_sub -t 'c/in/+'``, its output to a file. The broker runs pinned to CPU 0, every
client to CPU 1 (``taskset``), so the broker cannot take the clients' core nor they its.
Brokers alternate; each figure is the median of ``--runs``:

- msg/s: messages the subscriber printed, over the time from the first publisher's start to
  the subscriber's last line;
- delivered: printed / published (QoS 0 may be dropped by a broker under load);
- broker CPU and client CPU (publishers and subscriber, from their rusage) per message
  delivered, in µs.

    python benchmarks/c_clients.py --qos 0 1 --runs 3
    python benchmarks/c_clients.py --brokers roost roost-nagle   # a second Roost command
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import session_cpu_seconds
from throughput import HOST, Broker

ROOST = f"taskset -c 0 {sys.executable} -m roost start"
MOSQUITTO = "taskset -c 0 /usr/sbin/mosquitto -c {mosquitto_conf}"


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> float:
    """Wait for ``proc`` (killing it after ``timeout``); its user + system CPU seconds."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return ru.ru_utime + ru.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            deadline = float("inf")
        time.sleep(0.01)


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def run_once(name: str, template: str, qos: int, pubs: int, n: int, work: Path) -> dict[str, float]:
    with Broker(name, template, work) as broker:
        out = work / f"sub-{broker.port}.txt"
        common = ["-h", HOST, "-p", str(broker.port), "-V", "mqttv311", "-q", str(qos)]
        with open(out, "wb") as f:
            sub = subprocess.Popen(["taskset", "-c", "1", "mosquitto_sub", *common, "-t", "c/in/+"],
                                   stdout=f)  # fmt: skip
        time.sleep(0.5)
        cpu0 = session_cpu_seconds(broker.pid)
        start = time.monotonic()
        procs = [subprocess.Popen(["taskset", "-c", "1", "mosquitto_pub", *common, "-t",
                                   f"c/in/{i}", "-m", "x" * 64, "--repeat", str(n)])
                 for i in range(pubs)]  # fmt: skip
        pub_cpu = sum(_wait(p, 300) for p in procs)
        # Until the subscriber has printed everything, or nothing more comes for 1 s.
        last, last_t = -1, time.monotonic()
        while time.monotonic() - last_t < 1.0:
            got = _lines(out)
            if got != last:
                last, last_t = got, time.monotonic()
            if got >= pubs * n:
                break
            time.sleep(0.05)
        broker_cpu = session_cpu_seconds(broker.pid) - cpu0
        sub.terminate()
        sub_cpu = _wait(sub, 10)
        got = _lines(out)
        elapsed = last_t - start
        return {"rate": got / elapsed, "delivered": got / (pubs * n),
                "broker_us": broker_cpu / got * 1e6, "client_us": (pub_cpu + sub_cpu) / got * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--qos", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument("--messages", type=int, default=100_000, help="per publisher")
    ap.add_argument("--brokers", nargs="+", default=["roost", "mosquitto"])
    ap.add_argument("--cmd", action="append", default=[], metavar="NAME=TEMPLATE",
                    help="command of a broker name (default: roost, mosquitto)")  # fmt: skip
    args = ap.parse_args(argv)
    if shutil.which("mosquitto_pub") is None or shutil.which("taskset") is None:
        print("needs mosquitto-clients and taskset (util-linux)", file=sys.stderr)
        return 2
    cmds = {"roost": ROOST, "mosquitto": MOSQUITTO}
    cmds.update(dict(c.split("=", 1) for c in args.cmd))
    print(f"fan-in, {args.publishers} mosquitto_pub x {args.messages:,} to 1 mosquitto_sub, "
          f"broker on CPU 0, clients on CPU 1; median of {args.runs}")  # fmt: skip
    print(f"{'broker':<14} qos {'msg/s':>9} {'delivered':>9} {'broker µs/msg':>13} "
          f"{'clients µs/msg':>14}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="roost-cclients-") as tmp:
        for qos in args.qos:
            runs: dict[str, list[dict[str, float]]] = {b: [] for b in args.brokers}
            for _ in range(args.runs):
                for b in args.brokers:
                    runs[b].append(run_once(b, cmds[b], qos, args.publishers, args.messages,
                                            Path(tmp)))  # fmt: skip
            for b, rs in runs.items():
                med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                print(f"{b:<14} {qos:>3} {med['rate']:>9,.0f} {med['delivered']:>9.1%} "
                      f"{med['broker_us']:>13.2f} {med['client_us']:>14.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
