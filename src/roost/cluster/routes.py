"""Routes between nodes: the batched writer of this node's keys and the table of other nodes'.

Keys (relative to the cluster prefix): ``routes/<node>/<filter>`` for a filter with at least
one plain subscriber on the node, ``routes/<node>/$share/<group>/<filter>`` with the group's
member count on the node. One prefix per node, so a restarted node cleans its stale routes with
one range delete and a dead node's routes go with its lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from roost.broker.commits import Progress
from roost.broker.trie import FilterTrie
from roost.cluster.etcd import KV, Event, Op
from roost.mqtt.topics import parse_shared

if TYPE_CHECKING:
    from roost.cluster.etcd import Etcd

log = logging.getLogger("roost.cluster")

MAX_OPS = 128  # etcd's limit of operations in one transaction
MAX_BYTES = 1 << 20  # stay well under etcd's 1.5 MiB request limit


def route_key(node: str, topic_filter: str) -> str:
    return f"routes/{node}/{topic_filter}"


def parse_route_key(key: str) -> tuple[str, str | None, str]:
    """``routes/<node>/<filter>`` -> (node, group or None, real filter)."""
    rest = key[len("routes/") :]
    node, _, f = rest.partition("/")
    if f.startswith("$share/"):
        group, _, real = f[len("$share/") :].partition("/")
        return node, group, real
    return node, None, f


class BatchWriter(Progress):
    """Writes keys to etcd in transactions of at most 128 operations (and ~1 MiB); a put and a
    delete of the same key before they are written cancel out. A commit source for the output
    gate: ``after(cb)`` runs once everything submitted so far is in etcd."""

    def __init__(
        self, etcd: Etcd, lease: Callable[[], int], on_failure: Callable[[Exception], None]
    ) -> None:
        super().__init__()
        self.etcd = etcd
        self._lease = lease
        self._on_failure = on_failure
        self._pending: dict[str, Op] = {}
        self._written: set[str] = set()  # keys this writer has put and not deleted
        self._leased: set[str] = set()  # of those, the ones tied to the node's lease
        self._writing: set[str] = set()  # keys in the transaction under way
        self._task: asyncio.Task[None] | None = None
        self.transactions = 0
        self.ops_written = 0

    # ---------------------------------------------------------------------------- changes

    def put(self, key: str, value: bytes, leased: bool = True) -> None:
        self._pending[key] = Op("put", key, value, -1 if leased else 0)
        self._submit()

    def delete(self, key: str, force: bool = False) -> None:
        """Delete ``key``; unless ``force``, only a key this writer put (routes)."""
        if not force and key not in self._written and key not in self._writing:
            # Never written: drop a pending put instead of writing and deleting it.
            self._pending.pop(key, None)
        else:
            self._pending[key] = Op("delete", key)
        self._submit()

    def _submit(self) -> None:
        self.submit()
        if not self._pending:
            self.done(self.submitted)
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        delay = 0.05
        while self._pending:
            target = self.submitted
            batch = self._take()
            self._writing = {op.key for op in batch}
            try:
                await self.etcd.commit(batch)
            except Exception as e:
                self._writing = set()
                # Put the batch back (unless newer changes replaced a key) and retry.
                for op in batch:
                    self._pending.setdefault(op.key, op)
                self._on_failure(e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._writing = set()
            delay = 0.05
            self.transactions += 1
            self.ops_written += len(batch)
            for op in batch:
                if op.kind == "put":
                    self._written.add(op.key)
                    if op.lease:
                        self._leased.add(op.key)
                else:
                    self._written.discard(op.key)
                    self._leased.discard(op.key)
            if not self._pending:
                self.done(target)
        self.done(self.submitted)

    def _take(self) -> list[Op]:
        lease = self._lease()
        batch: list[Op] = []
        size = 0
        for key in list(self._pending):
            op = self._pending[key]
            size += len(key) + len(op.value)
            if batch and (len(batch) >= MAX_OPS or size > MAX_BYTES):
                break
            del self._pending[key]
            if op.lease:
                op = Op("put", key, op.value, lease)
            batch.append(op)
        return batch


class RemoteEntry:
    """The other nodes that need messages on one filter."""

    __slots__ = ("groups", "nodes", "real")

    def __init__(self, real: str) -> None:
        self.real = real
        self.nodes: set[str] = set()  # nodes with a plain subscriber
        self.groups: dict[str, dict[str, int]] = {}  # shared group -> node -> member count

    def empty(self) -> bool:
        return not self.nodes and not self.groups


class RemoteTable:
    """filter -> nodes, from a snapshot of ``routes/`` plus its watch (own node excluded)."""

    def __init__(self, me: str) -> None:
        self.me = me
        self._trie: FilterTrie[RemoteEntry] = FilterTrie()
        self._rr: dict[tuple[str, str], int] = {}  # (group, filter) -> round-robin position
        self.count = 0  # route keys held

    def __len__(self) -> int:
        return self.count

    def match(self, topic: str) -> tuple[RemoteEntry, ...]:
        return self._trie.match(topic)

    def has_route(self, node: str, topic_filter: str) -> bool:
        """Whether ``node`` holds a route for this filter (``$share/<group>/...`` included)."""
        group, real = parse_shared(topic_filter)
        entry = self._trie.get(real)
        if entry is None:
            return False
        return node in (entry.nodes if group is None else entry.groups.get(group, ()))

    def load(self, kvs: list[KV]) -> None:
        self._trie = FilterTrie()
        self.count = 0
        for kv in kvs:
            self._put(kv.key, kv.value)

    def apply(self, events: list[Event]) -> None:
        for ev in events:
            if ev.kind == "put":
                self._put(ev.key, ev.value)
            else:
                self._delete(ev.key)

    def drop_node(self, node: str) -> None:
        """Forget a node's routes now (its lease is gone; the deletes will follow)."""
        for real, entry in list(self._trie.items()):
            if node in entry.nodes:
                entry.nodes.discard(node)
                self.count -= 1
            for g in list(entry.groups.values()):
                if g.pop(node, None) is not None:
                    self.count -= 1
            entry.groups = {k: v for k, v in entry.groups.items() if v}
            if entry.empty():
                self._trie.discard(real)

    def _put(self, key: str, value: bytes) -> None:
        node, group, real = parse_route_key(key)
        if node == self.me:
            return
        entry = self._trie.setdefault(real, lambda: RemoteEntry(real))
        if group is None:
            if node not in entry.nodes:
                entry.nodes.add(node)
                self.count += 1
            return
        members = entry.groups.setdefault(group, {})
        if node not in members:
            self.count += 1
        members[node] = int(value or b"1")

    def _delete(self, key: str) -> None:
        node, group, real = parse_route_key(key)
        if node == self.me:
            return
        entry = self._trie.get(real)
        if entry is None:
            return
        if group is None:
            if node in entry.nodes:
                entry.nodes.discard(node)
                self.count -= 1
        else:
            members = entry.groups.get(group)
            if members is not None and members.pop(node, None) is not None:
                self.count -= 1
                if not members:
                    del entry.groups[group]
        if entry.empty():
            self._trie.discard(real)

    def pick_node(self, group: str, real: str, members: dict[str, int]) -> str:
        """One node for a shared group's message, weighted by its member count."""
        total = sum(members.values())
        pos = self._rr.get((group, real), 0) % total
        self._rr[(group, real)] = pos + 1
        for node, n in sorted(members.items()):
            if pos < n:
                return node
            pos -= n
        return next(iter(members))


class RouteSync:
    """Turns the local router's route changes into this node's keys (a RouteListener)."""

    def __init__(self, me: str, writer: BatchWriter) -> None:
        self.me = me
        self.writer = writer
        self.routes: dict[str, bytes] = {}  # key -> value, what this node wants in etcd

    def route_added(self, real: str) -> None:
        self._set(route_key(self.me, real), b"1")

    def route_removed(self, real: str) -> None:
        self._clear(route_key(self.me, real))

    def shared_changed(self, group: str, real: str, members: int) -> None:
        key = route_key(self.me, f"$share/{group}/{real}")
        if members:
            self._set(key, str(members).encode())
        else:
            self._clear(key)

    def _set(self, key: str, value: bytes) -> None:
        self.routes[key] = value
        self.writer.put(key, value)

    def _clear(self, key: str) -> None:
        self.routes.pop(key, None)
        self.writer.delete(key)

    def rewrite_all(self) -> None:
        """Put every route again (with the node's current lease)."""
        for key, value in self.routes.items():
            self.writer.put(key, value)
