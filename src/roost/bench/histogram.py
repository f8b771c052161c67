"""An HDR-style latency histogram: log-linear buckets, cheap to record, mergeable across processes.

Values are integers (microseconds here). Below ``2 * SUB`` every value has its own bucket; above,
each power of two is split into ``SUB`` equal buckets, so a bucket is never wider than 1/SUB of
its value (under 1.6 % with SUB = 64): two significant digits, at a fixed cost per record.
"""

from __future__ import annotations

from typing import Any

SUB_BITS = 6
SUB = 1 << SUB_BITS
_LINEAR = 2 * SUB  # values below this are exact
_MAX_SHIFT = 40  # 2**46 µs is over two years: nothing real is larger
SIZE = _LINEAR + _MAX_SHIFT * SUB


def bucket(value: int) -> int:
    if value < _LINEAR:
        return value if value > 0 else 0
    shift = value.bit_length() - SUB_BITS - 1
    if shift > _MAX_SHIFT:
        return SIZE - 1
    return _LINEAR + (shift - 1) * SUB + (value >> shift) - SUB


def bucket_value(index: int) -> float:
    """The middle of a bucket, the value reported for every sample in it."""
    if index < _LINEAR:
        return float(index)
    shift = (index - _LINEAR) // SUB + 1
    low = (SUB + (index - _LINEAR) % SUB) << shift
    return low + ((1 << shift) - 1) / 2


class Histogram:
    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * SIZE
        self.count = 0
        self.total = 0
        self.max = 0

    def record(self, value: int) -> None:
        self.counts[bucket(value)] += 1
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value

    def record_many(self, values: list[int]) -> None:
        """Record a batch (one receive buffer's worth): one attribute update per batch."""
        counts = self.counts
        for v in values:
            if v < _LINEAR:
                counts[v if v > 0 else 0] += 1
            else:
                shift = v.bit_length() - SUB_BITS - 1
                counts[_LINEAR + (shift - 1) * SUB + (v >> shift) - SUB
                       if shift <= _MAX_SHIFT else SIZE - 1] += 1  # fmt: skip
        self.count += len(values)
        self.total += sum(values)
        top = max(values)
        if top > self.max:
            self.max = top

    def merge(self, other: Histogram) -> None:
        if not other.count:
            return
        counts = self.counts
        for i, n in enumerate(other.counts):
            if n:
                counts[i] += n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def clear(self) -> None:
        if self.count:
            self.counts = [0] * SIZE
        self.count = self.total = self.max = 0

    def percentile(self, p: float) -> float:
        """The value at or below which ``p`` percent of the samples lie (0 if none)."""
        if not self.count:
            return 0.0
        rank = max(1, -(-self.count * p // 100))  # ceil: p99 of 100 samples is the 99th
        seen = 0
        for i, n in enumerate(self.counts):
            if n:
                seen += n
                if seen >= rank:
                    return min(bucket_value(i), float(self.max))
        return float(self.max)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    # between processes: only the buckets in use travel

    def to_sparse(self) -> dict[str, object]:
        return {
            "b": {i: n for i, n in enumerate(self.counts) if n},
            "n": self.count,
            "t": self.total,
            "m": self.max,
        }

    def merge_sparse(self, data: dict[str, Any]) -> None:
        counts = self.counts
        for i, n in data["b"].items():
            counts[int(i)] += n
        self.count += data["n"]
        self.total += data["t"]
        self.max = max(self.max, data["m"])

    def summary(self, scale: float = 1000.0) -> dict[str, float]:
        """avg, p50, p90, p99, p999 and max divided by ``scale`` (µs to ms by default)."""
        return {
            "count": self.count,
            "avg": round(self.mean / scale, 3),
            "p50": round(self.percentile(50) / scale, 3),
            "p90": round(self.percentile(90) / scale, 3),
            "p99": round(self.percentile(99) / scale, 3),
            "p999": round(self.percentile(99.9) / scale, 3),
            "max": round(self.max / scale, 3),
        }
