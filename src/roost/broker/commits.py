"""What a reply waits for before it may go out: every place that must have committed a change.

A PUBACK promises the message is stored (local SQLite) and forwarded (the node links' acks); a
SUBACK promises the route is in the cluster's table (etcd). Each of these is a source with a
counter of operations submitted and ``after(callback)``, which runs the callback once everything
submitted so far is committed, callbacks in the order they were registered. A channel takes a
mark before handling a packet and, if any source moved, gates its output until those commit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from operator import attrgetter
from typing import Protocol

_submitted = attrgetter("submitted")
log = logging.getLogger("roost.broker")


class CommitSource(Protocol):
    @property
    def submitted(self) -> int: ...

    def after(self, callback: Callable[[], None]) -> None: ...


class Commits:
    def __init__(self) -> None:
        self.sources: list[CommitSource] = []

    def add(self, source: CommitSource) -> None:
        self.sources.append(source)

    def mark(self) -> tuple[int, ...]:
        # Once per packet on the hot path: C-level map, no generator.
        return tuple(map(_submitted, self.sources))

    def moved(self, mark: tuple[int, ...]) -> list[CommitSource]:
        """The sources that took operations since ``mark``."""
        now = tuple(map(_submitted, self.sources))
        if now == mark:
            return []
        return [s for s, a, b in zip(self.sources, now, mark, strict=False) if a != b]

    def wait(self, moved: list[CommitSource], callback: Callable[[], None]) -> None:
        """Run ``callback`` once each of ``moved`` has committed what it holds now (at once
        when ``moved`` is empty)."""
        if not moved:
            callback()
        else:
            _chain(moved, callback)


def _chain(sources: list[CommitSource], callback: Callable[[], None]) -> None:
    # One source after the other keeps each source's FIFO order, so replies gated in order on
    # one channel are released in order.
    first, rest = sources[0], sources[1:]
    if not rest:
        first.after(callback)
    else:
        first.after(lambda: _chain(rest, callback))


class Progress:
    """A commit source for work done elsewhere: ``submit()`` counts an operation, ``done(n)``
    says the first ``n`` are committed; ``after`` waiters run in order as they are covered."""

    def __init__(self) -> None:
        self.submitted = 0
        self._done = 0
        self._waiters: list[tuple[int, Callable[[], None]]] = []

    def submit(self) -> int:
        self.submitted += 1
        return self.submitted

    def after(self, callback: Callable[[], None]) -> None:
        if self._done >= self.submitted and not self._waiters:
            callback()
            return
        self._waiters.append((self.submitted, callback))

    def done(self, upto: int) -> None:
        self._done = max(self._done, upto)
        while self._waiters and self._waiters[0][0] <= self._done:
            _, cb = self._waiters.pop(0)
            try:
                cb()
            except Exception:
                log.exception("commit callback failed")
