"""Where the broker's timed behaviour gets its time and its timers.

The node reads the time and schedules its timers (will delay, session expiry, the periodic
tick that runs keepalive, flapping and $SYS) only through a :class:`Clock`, so that a test can
hand it a :class:`ManualClock` and move time by hand instead of sleeping.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable
from typing import Protocol


class Handle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds: what every deadline inside the node is measured in."""
        ...

    def wall(self) -> float:
        """Wall-clock seconds, for what people and other nodes read (a ban's end)."""
        ...

    def call_later(self, delay: float, fn: Callable[[], None]) -> Handle:
        """Call ``fn`` once ``delay`` seconds have passed, unless cancelled first."""
        ...


class LoopClock:
    """The real clock: time.monotonic (the asyncio loop's own time base) and the running
    loop's timers, so ``call_later`` needs a running loop."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def call_later(self, delay: float, fn: Callable[[], None]) -> Handle:
        return asyncio.get_running_loop().call_later(delay, fn)


class ManualTimer:
    __slots__ = ("cancelled", "due", "fn")

    def __init__(self, due: float, fn: Callable[[], None]) -> None:
        self.due = due
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock for tests: time stands still until ``advance``, which fires every timer that
    falls due on the way, in order, each at its own due time (synchronously)."""

    def __init__(self, start: float = 1000.0, wall_offset: float = 1_800_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_offset
        self._timers: list[tuple[float, int, ManualTimer]] = []
        self._seq = itertools.count()  # equal due times fire in the order they were set

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def call_later(self, delay: float, fn: Callable[[], None]) -> ManualTimer:
        timer = ManualTimer(self._now + max(0.0, delay), fn)
        heapq.heappush(self._timers, (timer.due, next(self._seq), timer))
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward; timers set by the timers that fire also fire if they fall due."""
        end = self._now + seconds
        timers = self._timers
        while timers and timers[0][0] <= end:
            due, _, timer = heapq.heappop(timers)
            if timer.cancelled:
                continue
            self._now = max(self._now, due)
            timer.fn()
        self._now = end

    def pending(self) -> int:
        """How many timers wait (not cancelled)."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)
