"""Group commit between the event loop and a store.

The broker calls ``op`` for each change and ``after`` for each acknowledgement that must wait
until that change is durable. Operations gathered during one event-loop turn (``sync``) or for
at most ``max_delay`` seconds (``batch``) are written in one transaction on a writer thread;
then the waiting callbacks run on the loop, in the order they were registered. With nothing
pending, ``after`` runs its callback at once, so connections with no durable state pay nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from roost.store.ops import Op, coalesce

T = TypeVar("T")

log = logging.getLogger("roost.store")


class BatchStore(Protocol):
    def write(self, ops: list[Op]) -> None: ...
    def close(self) -> None: ...


class Persister:
    def __init__(self, store: BatchStore, mode: str = "sync", max_delay: float = 0.005) -> None:
        self.store = store
        self.mode = mode
        self.max_delay = max_delay
        self._ops: list[Op] = []
        self._mids: set[int] = set()  # the messages whose row is in ``_ops``
        self._callbacks: list[Callable[[], None]] = []
        self._scheduled = False
        self._writing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="roost-store")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.submitted = 0  # operations ever submitted: a channel compares it across a packet
        self.commits = 0
        self.ops_written = 0
        self.failed = False

    def op(self, op: Op, gate: bool = True) -> None:
        """Submit one change. ``gate=False``: no reply waits for it (it is not counted in
        ``submitted``), though it is written in order with the rest, before anything later.
        A message row already in the pending batch is not added twice."""
        if op[0] == "msg":
            if op[1] in self._mids:
                return
            self._mids.add(op[1])
        self._ops.append(op)
        if gate:
            self.submitted += 1
        self._schedule()

    def after(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once everything submitted so far is durable."""
        if not self._ops and not self._callbacks and not self._writing:
            callback()
            return
        self._callbacks.append(callback)
        self._schedule()

    def read(self, fn: Callable[[], T], done: Callable[[T], None]) -> None:
        """Run ``fn`` (a read of the store) on the writer thread once everything submitted so
        far is written, then ``done`` with its result on the loop; a failed read is logged
        and ``done`` is not called."""
        loop = self._loop or asyncio.get_running_loop()

        def result(fut: asyncio.Future[T]) -> None:
            if fut.exception() is not None:
                log.error("store read failed: %s", fut.exception())
            else:
                done(fut.result())

        self.after(lambda: loop.run_in_executor(self._executor, fn).add_done_callback(result))

    def holds_message(self, mid: int) -> bool:
        """Whether the pending batch writes message ``mid``'s row: a delivery of it added now
        needs no other (the row is deleted with the message's last delivery, see the store)."""
        return mid in self._mids

    @property
    def pending(self) -> int:
        return len(self._ops)

    def _schedule(self) -> None:
        if self._scheduled or self._writing:
            return
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._scheduled = True
        if self.mode == "batch":
            loop.call_later(self.max_delay, self._flush)
        else:
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._writing or (not self._ops and not self._callbacks):
            return
        ops, self._ops = coalesce(self._ops, messages=True), []
        self._mids = set()
        callbacks, self._callbacks = self._callbacks, []
        self._writing = True
        loop = self._loop
        assert loop is not None
        fut = loop.run_in_executor(self._executor, self._write, ops)
        fut.add_done_callback(lambda f: self._done(f, callbacks, len(ops)))

    def _write(self, ops: list[Op]) -> None:
        if ops:
            self.store.write(ops)

    def _done(self, fut: asyncio.Future[None], callbacks: list[Callable[[], None]], n: int) -> None:
        self._writing = False
        exc = fut.exception()
        if exc is not None:
            # Acknowledging now would promise durability we do not have: hold the acks back
            # (clients will resend) and say so loudly.
            self.failed = True
            log.error("store write failed; %d acknowledgements withheld: %s", len(callbacks), exc)
        else:
            self.commits += 1
            self.ops_written += n
            for cb in callbacks:
                try:
                    cb()
                except Exception:
                    log.exception("callback after commit failed")
        if self._ops or self._callbacks:
            self._schedule()

    async def drain(self) -> None:
        """Wait until everything submitted is written (for shutdown)."""
        while self._ops or self._callbacks or self._writing or self._scheduled:
            if not self._writing and not self._scheduled:
                self._schedule()
            await asyncio.sleep(0.001)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()
