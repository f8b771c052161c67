"""The once-a-second lines, in emqtt-bench's format, their JSON twins, and the final summary.

    1m5s pub total=6500 rate=100.00/sec
    1m5s publish_latency avg=1.20ms p50=1.10ms p90=1.90ms p99=3.80ms p999=7.60ms
    1m5s broker connections=11 msg_in=100.00/sec msg_out=1000.00/sec cpu=23.5%
"""

from __future__ import annotations

import json
import re
import sys
from typing import IO, Any

from roost.bench.histogram import Histogram
from roost.bench.stats import NAMES

LINE = re.compile(r"^(?P<uptime>(?:\d+h)?(?:\d+m)?\d+s) (?P<name>\w+) total=(?P<total>\d+) "
                  r"rate=(?P<rate>\d+\.\d\d)/sec$")  # fmt: skip
LATENCY = re.compile(r"^(?P<uptime>(?:\d+h)?(?:\d+m)?\d+s) publish_latency "
                     r"avg=(?P<avg>[\d.]+)ms p50=(?P<p50>[\d.]+)ms p90=(?P<p90>[\d.]+)ms "
                     r"p99=(?P<p99>[\d.]+)ms p999=(?P<p999>[\d.]+)ms$")  # fmt: skip


def uptime(seconds: float) -> str:
    """``5s``, ``1m5s``, ``2h0m5s``: whole seconds, as emqtt-bench prints them."""
    s = int(seconds + 0.5)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    if h:
        return f"{h}h{m}m{sec}s"
    if m:
        return f"{m}m{sec}s"
    return f"{sec}s"


def parse_uptime(text: str) -> int:
    total = 0
    for value, unit in re.findall(r"(\d+)([hms])", text):
        total += int(value) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


def _ms(v: float) -> str:
    return f"{v:.2f}ms" if v < 100 else f"{v:.0f}ms"


def latency_text(summary: dict[str, float]) -> str:
    return " ".join(f"{k}={_ms(summary[k])}" for k in ("avg", "p50", "p90", "p99", "p999"))


class Reporter:
    def __init__(self, command: str, text: IO[str] | None, json_out: IO[str] | None,
                 quiet: bool = False,
                 records: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
        self.records = records  # every tick and the summary, for library callers
        self.command = command
        self.quiet = quiet
        self.text = text
        self.json = json_out
        self.last: dict[str, int] = dict.fromkeys(NAMES, 0)
        self.last_t = 0.0
        self.total_latency = Histogram()
        self.broker_last: dict[str, Any] | None = None
        self.cpu = 0.0  # CPU seconds of every bench process since the start

    def _out(self, line: str, always: bool = False) -> None:
        if self.text is not None and (always or not self.quiet):
            self.text.write(line + "\n")
            self.text.flush()

    def _summary_line(self, line: str) -> None:
        self._out(line, always=True)

    def _json(self, record: dict[str, Any]) -> None:
        if self.records is not None:
            self.records.append(record)
        if self.json is not None:
            self.json.write(json.dumps(record) + "\n")
            self.json.flush()

    def tick(self, t: float, counters: dict[str, int], connected: int, window: Histogram,
             broker: dict[str, Any] | None) -> None:  # fmt: skip
        dt = max(t - self.last_t, 1e-6)
        up = uptime(t)
        changed: dict[str, dict[str, float]] = {}
        for name in NAMES:
            total = counters.get(name, 0)
            if total != self.last[name]:
                rate = (total - self.last[name]) / dt
                changed[name] = {"total": total, "rate": round(rate, 2)}
                self._out(f"{up} {name} total={total} rate={rate:.2f}/sec")
        self.last = {name: counters.get(name, 0) for name in NAMES}
        self.last_t = t
        lat = None
        if window.count:
            lat = window.summary()
            self._out(f"{up} publish_latency {latency_text(lat)}")
            self.total_latency.merge(window)
        if broker is not None:
            self.broker_last = broker
            self._out(f"{up} broker {broker_text(broker)}")
        self._json({"type": "tick", "uptime": round(t, 3), "connected": connected,
                    "counters": changed, "latency": lat, "broker": broker})  # fmt: skip

    def summary(self, t: float, counters: dict[str, int], why: str,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
        up = uptime(t)
        rates = {n: round(counters.get(n, 0) / t, 2) if t > 0 else 0.0 for n in NAMES}
        lat = self.total_latency.summary() if self.total_latency.count else None
        record = {"type": "summary", "command": self.command, "uptime": round(t, 3),
                  "ended": why, "counters": {n: counters.get(n, 0) for n in NAMES},
                  "rates": rates, "latency": lat, "broker": self.broker_last,
                  "bench_cpu": round(100 * self.cpu / t, 1) if t > 0 else 0.0,
                  **(extra or {})}  # fmt: skip
        out = self._summary_line
        out(f"--- summary after {up} ({why}) ---")
        for n in NAMES:
            # Loss and duplicates are worth a line even at zero once messages were checked.
            if counters.get(n, 0) or (n in ("lost", "dup") and counters.get("recv", 0)):
                out(f"{up} {n} total={counters.get(n, 0)} rate={rates[n]:.2f}/sec")
        if lat is not None:
            out(f"{up} publish_latency {latency_text(lat)} max={_ms(lat['max'])} "
                f"samples={lat['count']}")  # fmt: skip
        if self.broker_last is not None:
            out(f"{up} broker {broker_text(self.broker_last)}")
        out(f"{up} bench cpu={record['bench_cpu']:.1f}% (of one core, all bench processes)")
        self._json(record)
        return record


def broker_text(b: dict[str, Any]) -> str:
    if "error" in b:
        return f"unreachable ({b['error']})"
    parts = [f"connections={b.get('connections', '?')}"]
    for key in ("msg_in", "msg_out"):
        if key in b:
            parts.append(f"{key}={b[key]:.2f}/sec")
    if "cpu" in b:
        parts.append(f"cpu={b['cpu']:.1f}%")
    if "received" in b:
        parts.append(f"received={b['received']} sent={b['sent']}")
    return " ".join(parts)


def open_outputs(json_opt: str | None) -> tuple[IO[str] | None, IO[str] | None]:
    """(text stream, JSON stream): ``--json`` alone replaces the text on stdout."""
    if json_opt == "-":
        return None, sys.stdout
    if json_opt:
        return sys.stdout, open(json_opt, "a")  # closed by the caller at exit
    return sys.stdout, None


def steady_rate(records: list[dict[str, Any]], counter: str) -> float:
    """A counter's rate over the seconds it moved, without the first and the last such second
    (the ramp-up, and the part-second at the end): the figure a benchmark wants."""
    seen = [(r["uptime"], r["counters"][counter]["total"]) for r in records
            if r.get("type") == "tick" and counter in r["counters"]]  # fmt: skip
    if len(seen) < 4:
        # Too short a run to leave seconds out: the whole of it.
        if len(seen) >= 2:
            (t0, n0), (t1, n1) = seen[0], seen[-1]
            return (n1 - n0) / (t1 - t0)
        return 0.0
    (t0, n0), (t1, n1) = seen[1], seen[-2]
    return (n1 - n0) / (t1 - t0)
