"""The counters of one bench process, bumped in place on the hot path and read once a second."""

from __future__ import annotations

from typing import Any

from roost.bench.histogram import Histogram

#: Every counter, in the order they are printed (emqtt-bench's names first).
NAMES = (
    "connect_succ",
    "connect_fail",
    "reconnect_succ",
    "conn_lost",
    "connect_0rtt",
    "sub",
    "sub_fail",
    "pub",
    "pub_fail",
    "recv",
    "lost",
    "dup",
    "migrate",
    "migrate_fail",
)


class Stats:
    """Plain int attributes (``stats.recv += n``: the cheapest thing Python can do), the
    latency samples since the last snapshot, and the live connection count."""

    __slots__ = (*NAMES, "connected", "latency")

    def __init__(self) -> None:
        for name in NAMES:
            setattr(self, name, 0)
        self.connected = 0
        self.latency = Histogram()

    def totals(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in NAMES}

    def snapshot(self) -> dict[str, Any]:
        """Counter totals, and the latency histogram since the previous snapshot (then reset:
        the reader merges windows, so each sample travels once)."""
        snap = {"counters": self.totals(), "connected": self.connected,
                "latency": self.latency.to_sparse()}  # fmt: skip
        self.latency.clear()
        return snap


class Sequences:
    """Per publisher: the next sequence number a subscriber expects.

    The first message of a publisher sets the baseline (a subscriber may join mid-stream); a
    jump counts the skipped numbers as lost, a step back counts one duplicate.
    """

    __slots__ = ("expect",)

    def __init__(self) -> None:
        self.expect: dict[int, int] = {}

    def check(self, key: int, seq: int, stats: Stats) -> None:
        exp = self.expect.get(key)
        if exp is None or seq == exp:
            self.expect[key] = seq + 1
        elif seq > exp:
            stats.lost += seq - exp
            self.expect[key] = seq + 1
        else:
            stats.dup += 1
