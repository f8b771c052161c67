"""The cluster's bans and configuration: kept in etcd, mirrored by every node from a watch.

- ``bans/<kind>/<who>``: one ban, JSON as the REST API shows it; no lease. A timed ban holds
  its end (``until``, wall clock): each node stops applying it then by itself (``Bans.match``),
  and every node that notices deletes the key, compared on its mod_revision so that a ban
  renewed meanwhile stays. (A lease per ban would cost a lease per flapper and expire late
  after an etcd leader change, which extends leases; the end in the value is exact on nodes
  whose clocks agree, and a node that joins reads how long is left.)
- ``config/current``: the cluster-wide sections (``CLUSTER_SECTIONS``) of the config as JSON,
  written by the node that validated and applied a ``PUT /api/v1/config``. Every node applies
  it through hot config with its own per-node sections kept; a node that joins applies it
  before it opens listeners. Absent (nobody PUT one yet) or deleted: each node runs its file.

A node that cannot apply the cluster's config keeps running the previous one, logs why, shows
it in ``status()`` (``/api/v1/node``, ``/metrics``) and tries again every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from roost.broker.bans import KINDS, Ban, peer_host
from roost.cluster.etcd import KV, EtcdError, Event
from roost.config import Config, ConfigError, explain
from roost.mqtt import reason_codes as RC

if TYPE_CHECKING:
    from roost.broker.node import Broker
    from roost.cluster.etcd import Etcd, Watch

log = logging.getLogger("roost.cluster.state")

#: Sections every node runs alike. The rest are the node's own: ``node`` (identity, data
#: dir), ``listeners`` (binds are per machine), ``api`` (its bind, users and key file),
#: ``cluster`` (etcd endpoints, link address), ``persistence`` (its own store) and ``log``.
CLUSTER_SECTIONS = ("mqtt", "authentication", "authorization", "sys_topics", "flapping_detect")
CONFIG_KEY = "config/current"
_TICK = 1.0  # seconds between sweeps of expired bans and retries of unwritten ones
_RETRY = 5.0  # seconds between attempts at a cluster config that failed to apply here

#: Hot config's apply_config bound to this node's listeners (the runner provides it).
Applier = Callable[[Config], Awaitable[list[str]]]


def cluster_sections(config: Config) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    return {k: data[k] for k in CLUSTER_SECTIONS}


def with_sections(config: Config, sections: dict[str, Any]) -> Config:
    """``config`` with its cluster-wide sections replaced; ConfigError when they are invalid."""
    data = config.model_dump(mode="json")
    for k in CLUSTER_SECTIONS:
        if k in sections:
            data[k] = sections[k]
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise explain(e, "cluster config") from None


def ban_key(kind: str, who: str) -> str:
    return f"bans/{kind}/{who}"


def _split_ban_key(key: str) -> tuple[str, str]:
    kind, _, who = key[len("bans/") :].partition("/")
    return kind, who


def load_ban(key: str, value: bytes) -> Ban | None:
    kind, who = _split_ban_key(key)  # the key, not the value, says whom
    if kind not in KINDS or not who:
        return None
    try:
        d = json.loads(value)
        until = d.get("until")
        return Ban(kind, who, str(d.get("reason", "")), str(d.get("by", "")),
                   float(d.get("at") or 0), None if until is None else float(until))  # fmt: skip
    except (ValueError, TypeError, AttributeError):
        return None


class SharedState:
    """This node's mirror of the cluster's bans and config, and the REST API's way to change
    them (``Management.cluster_state``). Started by ``Cluster.start``; ends with it (its
    watches and ``run()`` belong to the Cluster)."""

    def __init__(self, etcd: Etcd, broker: Broker) -> None:
        self.etcd = etcd
        self.broker = broker
        self.watches: list[Watch] = []
        self._apply: Applier | None = None
        self._lock = asyncio.Lock()  # one config change at a time on this node
        self._wake = asyncio.Event()
        # Config: what the file says for the cluster-wide sections (run when etcd has none),
        # the cluster's value last seen (revision 0: none) and what this node runs.
        self._file_sections = cluster_sections(broker.config)
        self._wanted: tuple[int, bytes | None] = (0, None)
        self._tried = -1  # revision of the last failed attempt
        self._retry_at = 0.0
        self.applied_revision = 0
        self.error = ""
        # Bans: (mod_revision, until) of each key in etcd, and bans made here not yet written.
        self._revs: dict[tuple[str, str], tuple[int, float | None]] = {}
        self._unsent: dict[tuple[str, str], Ban] = {}
        self.config_counts = {"applied": 0, "failures": 0}
        self.ban_counts = {"written": 0, "write_failures": 0, "expired": 0}

    # ------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Load the bans (in force at once) and the config (applied by ``attach``), and
        watch both from the revision after each snapshot."""
        etcd = self.etcd
        kvs, rev = await etcd.get_prefix("bans/")
        self._load_bans(kvs, rev)
        self.watches.append(etcd.watch_prefix("bans/", rev + 1, self._on_ban_events,
                                              self._load_bans))  # fmt: skip
        kvs, rev = await etcd.get_prefix("config/")
        self._load_config(kvs, rev)
        self.watches.append(etcd.watch_prefix("config/", rev + 1, self._on_config_events,
                                              self._load_config))  # fmt: skip
        self.broker.bans.on_add = self._made_here

    async def attach(self, apply: Applier) -> None:
        """Apply the cluster's config now (the runner calls this before listeners open) and
        every later change of it, with ``apply`` (hot config for this node's listeners)."""
        self._apply = apply
        await self._apply_wanted()

    async def run(self) -> None:
        """Apply config changes, write bans made here, delete expired ones; until cancelled."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_TICK):
                    await self._wake.wait()
            self._wake.clear()
            for step in (self._apply_wanted, self._write_unsent, self._sweep):
                try:
                    await step()
                except Exception:
                    log.exception("cluster state: %s failed", step.__name__)

    # --------------------------------------------------------------------------- config

    def _want(self, revision: int, value: bytes | None) -> None:
        self._wanted = (revision, value)
        self._wake.set()

    def _load_config(self, kvs: list[KV], _rev: int) -> None:
        kv = next((kv for kv in kvs if kv.key == CONFIG_KEY), None)
        if kv is None:
            self._want(0, None)
        else:
            self._want(kv.mod_revision, kv.value)

    def _on_config_events(self, events: list[Event]) -> None:
        for ev in events:
            if ev.key != CONFIG_KEY:
                continue
            if ev.kind == "put":
                self._want(ev.mod_revision, ev.value)
            else:
                self._want(0, None)  # back to each node's file

    def _target(self, value: bytes | None) -> Config:
        if value is None:
            return with_sections(self.broker.config, self._file_sections)
        try:
            sections = json.loads(value)
        except ValueError:
            raise ConfigError("invalid cluster config: not JSON") from None
        if not isinstance(sections, dict):
            raise ConfigError("invalid cluster config: not a JSON object")
        return with_sections(self.broker.config, sections)

    async def _apply_wanted(self) -> None:
        if self._apply is None:
            return  # not attached yet: attach() applies what is wanted by then
        async with self._lock:
            rev, value = self._wanted
            if rev == self.applied_revision and not self.error:
                return
            if rev == self._tried and time.monotonic() < self._retry_at:
                return
            try:
                new = self._target(value)
                if new != self.broker.config:
                    changed = await self._apply(new)
                    self.config_counts["applied"] += 1
                    log.info("cluster config (revision %d) applied: %s", rev,
                             ", ".join(changed) or "no change")  # fmt: skip
            except Exception as e:  # ConfigError mostly: a file this node cannot read
                if rev != self._tried:
                    self.config_counts["failures"] += 1
                if str(e) != self.error or rev != self._tried:
                    log.error("cluster config (revision %d) cannot be applied on this node, "
                              "which keeps its previous config: %s", rev, e)  # fmt: skip
                self.error = str(e)
                self._tried, self._retry_at = rev, time.monotonic() + _RETRY
                return
            if self.error:
                log.warning("cluster config (revision %d) applied after all", rev)
            self.applied_revision, self.error, self._tried = rev, "", -1

    async def config_put(self, new: Config) -> list[str]:
        """Apply ``new`` here (a ConfigError refuses it), then write its cluster-wide sections
        to etcd when it changed them, for every node to apply. ConnectionError (and this node
        put back as it was) when etcd cannot take them."""
        if self._apply is None:
            raise ConnectionError("this node has not loaded the cluster's config yet")
        async with self._lock:
            old = self.broker.config
            changed = await self._apply(new)
            sections = cluster_sections(new)
            if sections == cluster_sections(old):
                return changed  # e.g. a listener of this node: nothing for the others
            try:
                await self.etcd.put(CONFIG_KEY, json.dumps(sections, sort_keys=True).encode())
            except EtcdError as e:
                await self._apply(old)
                raise ConnectionError(f"config not written to the cluster, nothing changed: "
                                      f"{e}") from None  # fmt: skip
            log.info("cluster config written: %s", ", ".join(changed))
            return changed

    # ----------------------------------------------------------------------------- bans

    async def ban_add(self, ban: Ban) -> None:
        """Write a ban made through the REST API; in force here at once, elsewhere from the
        watch. ConnectionError when etcd cannot take it."""
        if ban.kind not in KINDS:
            raise ValueError(f"unknown ban kind {ban.kind!r}")
        ban.at = ban.at or self.broker.bans.clock()
        try:
            await self.etcd.put(ban_key(ban.kind, ban.who), json.dumps(ban.as_dict()).encode())
        except EtcdError as e:
            raise ConnectionError(f"ban not written to the cluster: {e}") from None
        self._put_ban(ban)

    async def ban_lift(self, kind: str, who: str) -> bool:
        """Lift a ban everywhere; True when there was one."""
        try:
            existed = await self.etcd.delete(ban_key(kind, who))
        except EtcdError as e:
            raise ConnectionError(f"ban not lifted in the cluster: {e}") from None
        self._unsent.pop((kind, who), None)
        local = self.broker.bans.remove(kind, who)
        return existed or local

    def _made_here(self, ban: Ban) -> None:
        """``Bans.on_add``: a flapping ban made by this node's admit(), written by run()."""
        self._unsent[(ban.kind, ban.who)] = ban
        self._wake.set()

    def _put_ban(self, ban: Ban) -> None:
        bans = self.broker.bans
        bans.put(ban)
        for ch in self.broker.registry.channels():
            if ch.connected and bans.match(ch.client_id, ch.username, peer_host(ch.peer)):
                # 0x8A "banned" is a CONNACK code only; DISCONNECT says administrative action.
                ch.disconnect(RC.ADMINISTRATIVE_ACTION, "banned")

    def _load_bans(self, kvs: list[KV], _rev: int) -> None:
        seen: set[tuple[str, str]] = set()
        self._revs.clear()
        for kv in kvs:
            ban = load_ban(kv.key, kv.value)
            if ban is None:
                log.warning("ignoring malformed ban %r in etcd", kv.key)
                continue
            seen.add((ban.kind, ban.who))
            self._revs[(ban.kind, ban.who)] = (kv.mod_revision, ban.until)
            self._put_ban(ban)
        for b in self.broker.bans.list():
            if (b.kind, b.who) not in seen and (b.kind, b.who) not in self._unsent:
                self.broker.bans.remove(b.kind, b.who)

    def _on_ban_events(self, events: list[Event]) -> None:
        for ev in events:
            if ev.kind == "put":
                ban = load_ban(ev.key, ev.value)
                if ban is None:
                    log.warning("ignoring malformed ban %r in etcd", ev.key)
                    continue
                self._revs[(ban.kind, ban.who)] = (ev.mod_revision, ban.until)
                self._put_ban(ban)
            else:
                kind, who = _split_ban_key(ev.key)
                self._revs.pop((kind, who), None)
                if (kind, who) not in self._unsent:  # made here since: its put is on the way
                    self.broker.bans.remove(kind, who)

    async def _write_unsent(self) -> None:
        for key, ban in list(self._unsent.items()):
            if ban.until is not None and ban.until <= self.broker.bans.clock():
                self._unsent.pop(key, None)
                continue
            try:
                await self.etcd.put(ban_key(*key), json.dumps(ban.as_dict()).encode())
            except EtcdError as e:
                self.ban_counts["write_failures"] += 1
                log.warning("ban on %s %r not written to the cluster yet: %s", *key, e)
                return  # tried again next tick
            if self._unsent.get(key) is ban:
                del self._unsent[key]
            self.ban_counts["written"] += 1

    async def _sweep(self) -> None:
        """Delete the keys of timed bans that have ended (every node may; one succeeds)."""
        now = self.broker.bans.clock()
        for key, entry in list(self._revs.items()):
            rev, until = entry
            if until is None or until > now:
                continue
            try:
                gone = await self.etcd.cas_delete(ban_key(*key), rev)
            except EtcdError as e:
                log.debug("expired ban on %s %r not deleted yet: %s", *key, e)
                return
            if self._revs.get(key) == entry:
                del self._revs[key]
            self.ban_counts["expired"] += gone

    # --------------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """``config``: the cluster's config as this node runs it (revision 0: none, each node
        its file); ``bans``: counters of the bans this node wrote and swept."""
        rev = self._wanted[0]
        config = {"revision": rev, "applied_revision": self.applied_revision,
                  "in_sync": rev == self.applied_revision and not self.error,
                  "error": self.error, "source": "file" if self._wanted[1] is None else "cluster",
                  **self.config_counts}  # fmt: skip
        return {"config": config, "bans": {"unsent": len(self._unsent), **self.ban_counts}}
