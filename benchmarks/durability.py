"""Messages stored per second in each durability mode, and what `sync` costs against `memory`.

    python benchmarks/durability.py [--runs 3] [--messages 20000] [--window 100]

One publisher sends QoS 1 messages (at most --window unacknowledged) to a topic that an offline
persistent session subscribes to, so every message must be stored before its PUBACK. The figure
is acknowledged messages per second (`roost bench pub -q 1 -F WINDOW -L N`, first publish to
last PUBACK); the median of --runs runs is printed for each mode.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.brokerproc import BrokerProcess

from roost.bench import options, run_async

TOPIC = "bench/durable"


async def _load(port: int, n: int, window: int) -> float:
    """An offline persistent subscriber (session expiry 3600 s), then one `roost bench`
    publisher: acknowledged QoS 1 messages per second, first publish to last PUBACK."""
    common = ["-h", "127.0.0.1", "-p", str(port), "-c", "1", "-i", "0", "-q", "1"]
    # The subscriber leaves when the bench ends; its session stays and must store everything.
    offline = options.parse(["sub", *common, "-t", TOPIC, "-C", "false", "-x", "3600",
                             "--prefix", "durability-sub", "--shortids",
                             "--duration", "1"])  # fmt: skip
    await run_async(offline, silent=True)
    pub = options.parse(["pub", *common, "-t", TOPIC, "-I", "0", "-s", "64", "-F", str(window),
                         "-L", str(n), "--prefix", "durability-pub", "--shortids"])  # fmt: skip
    summary = await run_async(pub, silent=True)
    assert summary["counters"]["pub"] == n, summary["counters"]
    return n / summary["publish_seconds"]


def run(mode: str, n: int, window: int) -> float:
    cfg = {"persistence": {"durability": mode}, "sys_topics": {"enabled": False},
           "mqtt": {"max_mqueue_len": n + 10}, "log": {"level": "warning"}}  # fmt: skip
    with BrokerProcess(cfg) as b:
        return asyncio.run(_load(b.port, n, window))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--window", type=int, default=100)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"memory": [], "sync": [], "batch": []}
    for _ in range(args.runs):  # interleaved, so background noise hits every mode alike
        for mode in results:
            results[mode].append(run(mode, args.messages, args.window))
    med = {m: statistics.median(v) for m, v in results.items()}
    print(f"{'durability':<10} {'stored msgs/s (median)':>24} {'vs memory':>10}   runs")
    for mode, rates in results.items():
        runs = ", ".join(f"{r:,.0f}" for r in rates)
        print(f"{mode:<10} {med[mode]:>24,.0f} {med[mode] / med['memory']:>9.2f}x   {runs}")


if __name__ == "__main__":
    main()
