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
    # The NAMES counters, declared for the checker (set to 0 in __init__).
    connect_succ: int
    connect_fail: int
    reconnect_succ: int
    conn_lost: int
    connect_0rtt: int
    sub: int
    sub_fail: int
    pub: int
    pub_fail: int
    recv: int
    lost: int
    dup: int
    migrate: int
    migrate_fail: int

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
    """Per publisher: the next sequence number a subscriber expects, and the numbers skipped.

    The first message of a publisher sets the baseline (a subscriber may join mid-stream). A
    skipped number is only missing at first: QUIC data streams (and redeliveries) may bring it
    late. It counts as lost once ``REORDER`` newer messages of that publisher have arrived, or
    when the run ends; a number that was neither missing nor new counts as a duplicate.
    """

    __slots__ = ("expect", "missing")
    REORDER = 1024

    def __init__(self) -> None:
        self.expect: dict[int, int] = {}
        self.missing: dict[int, set[int]] = {}

    def check(self, key: int, seq: int, stats: Stats) -> None:
        exp = self.expect.get(key)
        if exp is None or seq == exp:
            self.expect[key] = seq + 1
        else:
            self.out_of_order(key, seq, exp, stats)

    def out_of_order(self, key: int, seq: int, exp: int, stats: Stats) -> None:
        """``seq`` is not the expected ``exp``: a gap, a late arrival or a duplicate."""
        if seq > exp:
            miss = self.missing.setdefault(key, set())
            floor = seq - self.REORDER
            if exp < floor:
                stats.lost += floor - exp
                exp = floor
            miss.update(range(exp, seq))
            self.expect[key] = seq + 1
            old = [m for m in miss if m < floor] if miss and min(miss) < floor else ()
            if old:
                stats.lost += len(old)
                miss.difference_update(old)
            return
        late = self.missing.get(key)
        if late and seq in late:
            late.discard(seq)  # late, not lost
        else:
            stats.dup += 1

    def settle(self, stats: Stats) -> None:
        """At the end of a run: whatever is still missing is lost."""
        for miss in self.missing.values():
            stats.lost += len(miss)
            miss.clear()
