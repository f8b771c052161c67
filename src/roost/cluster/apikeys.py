"""The cluster's API keys: ``apikeys/<name>`` in etcd, one JSON record each (a salted hash of
the secret, never the secret), mirrored by every node from a snapshot plus a watch.

The records are opaque here (mgmt/apikeys.py reads them); this module keeps the sink (the
node's key table) equal to etcd. A write made on this node is in its table when the call
returns, so the REST answer and the next request agree; the watch then brings the same
revision, which is skipped, and every other node applies it within the watch's latency. Events
older than what a key's entry last saw (the writer's own, arriving late) are skipped too, so a
key deleted here is never brought back by its create's event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from roost.cluster.etcd import KV, EtcdError, Event, Op

if TYPE_CHECKING:
    from roost.cluster.etcd import Etcd, Watch

PREFIX = "apikeys/"


class KeySink(Protocol):
    def load(self, records: dict[str, bytes]) -> None: ...

    def put(self, name: str, value: bytes) -> None: ...

    def remove(self, name: str) -> None: ...


class Conflict(Exception):
    """The key exists (create) or changed since this node saw it (replace)."""


class ApiKeyMirror:
    """This node's mirror of ``apikeys/`` and the REST handlers' way to change it."""

    def __init__(self, etcd: Etcd, sink: KeySink, conflict: type[Exception] = Conflict) -> None:
        self.etcd = etcd
        self.sink = sink
        self.conflict = conflict  # raised on a lost race (the caller's own exception type)
        self.watches: list[Watch] = []
        self._revs: dict[str, int] = {}  # name -> mod revision applied (deletes included)

    async def start(self) -> None:
        kvs, rev = await self.etcd.get_prefix(PREFIX)
        self._load(kvs, rev)
        self.watches.append(self.etcd.watch_prefix(PREFIX, rev + 1, self._on_events, self._load))

    def _load(self, kvs: list[KV], _rev: int) -> None:
        self._revs = {kv.key[len(PREFIX) :]: kv.mod_revision for kv in kvs}
        self.sink.load({kv.key[len(PREFIX) :]: kv.value for kv in kvs})

    def _apply(self, name: str, rev: int, value: bytes | None) -> None:
        if rev <= self._revs.get(name, 0):
            return  # this node applied it, or a later change, already
        self._revs[name] = rev
        if value is None:
            self.sink.remove(name)
        else:
            self.sink.put(name, value)

    def _on_events(self, events: list[Event]) -> None:
        for ev in events:
            name = ev.key[len(PREFIX) :]
            self._apply(name, ev.mod_revision, ev.value if ev.kind == "put" else None)

    # ----------------------------------------------------------------------------- writes

    async def create(self, name: str, value: bytes) -> None:
        try:
            ok, kv = await self.etcd.create(PREFIX + name, value)
        except EtcdError as e:
            raise ConnectionError(f"API key not written to the cluster: {e}") from None
        if not ok:
            raise self.conflict(name)
        assert kv is not None
        self._apply(name, kv.mod_revision, value)

    async def replace(self, name: str, value: bytes) -> None:
        seen = self._revs.get(name, 0)
        try:
            ok, kv = await self.etcd.cas(PREFIX + name, value, seen) if seen else (False, None)
        except EtcdError as e:
            raise ConnectionError(f"API key not written to the cluster: {e}") from None
        if not ok or kv is None:
            raise self.conflict(name)
        self._apply(name, kv.mod_revision, value)

    async def delete(self, name: str) -> bool:
        if not await self._exists(name):
            return False
        try:
            rev = await self.etcd.commit([Op("delete", PREFIX + name)])
        except EtcdError as e:
            raise ConnectionError(f"API key not deleted in the cluster: {e}") from None
        self._apply(name, rev, None)
        return True

    async def _exists(self, name: str) -> bool:
        try:
            return await self.etcd.get(PREFIX + name) is not None
        except EtcdError as e:
            raise ConnectionError(f"API key not deleted in the cluster: {e}") from None
