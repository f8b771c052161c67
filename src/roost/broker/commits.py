"""What a reply waits for before it may go out: every place that must have committed a change.

A PUBACK promises the message is stored (local SQLite) and forwarded (the node links' acks); a
SUBACK promises the route is in the cluster's table (etcd). Each of these is a source with a
counter of operations submitted and ``after(callback)``, which runs the callback once everything
submitted so far is committed, callbacks in the order they were registered. A channel takes a
mark before handling a packet and, if any source moved, gates its output until those commit.
"""

from __future__ import annotations

import logging
from collections import deque
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
            after_all([s.after for s in moved], callback)


def after_all(
    afters: list[Callable[[Callable[[], None]], None]], callback: Callable[[], None]
) -> None:
    """Run ``callback`` once every source (its ``after``) has committed what it holds now.

    Registered with all of them at once, so the wait is the slowest commit's, not their sum
    (one after the other, each later source would also be waited for what it took meanwhile).
    Callbacks may then run in another order than they were registered: a channel's gate
    releases its barriers in order itself, and the node links take acks in any order.
    """
    if len(afters) == 1:
        afters[0](callback)
        return
    left = len(afters)

    def one() -> None:
        nonlocal left
        left -= 1
        if not left:
            callback()

    for after in afters:
        after(one)


class Progress:
    """A commit source for work done elsewhere: ``submit()`` counts an operation, ``done(n)``
    says the first ``n`` are committed; ``after`` waiters run in order as they are covered."""

    def __init__(self) -> None:
        self.submitted = 0
        self._done = 0
        self._waiters: deque[tuple[int, Callable[[], None]]] = deque()

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
            _, cb = self._waiters.popleft()
            try:
                cb()
            except Exception:
                log.exception("commit callback failed")
