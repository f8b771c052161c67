"""One node's part in a cluster: membership, routes, forwarding, session registry, retained.

Cluster state lives in etcd under ``/<cluster.name>/``; messages travel over the node links.

- ``nodes/<node>``: this node's info (role, link address, listeners, connections), on its lease.
  A node that cannot renew its lease in time fences itself: it closes its clients and refuses
  new ones until it holds a lease again.
- ``routes/<node>/...``: see roost.cluster.routes. SUBACK waits until the route is in etcd.
- ``sessions/<client id>``: the session's home node and what adopting it needs; the key's
  mod_revision is the session's epoch. A CONNECT makes this node the home by compare-and-swap,
  then asks the old home (if alive) for the session's state.
- ``retained/<topic>``: retained messages; every node mirrors them from a watch.
- ``link_secret``: made by the first node; a link peer must present it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from roost.broker.commits import Progress, after_all
from roost.broker.handoff import Handoff
from roost.broker.message import Message
from roost.cluster.etcd import KV, Etcd, EtcdError, Event, LeaseKeeper
from roost.cluster.handover import (
    dump_message,
    dump_session,
    load_message,
    load_session,
    parse_entry,
    registry_entry,
    restore_subscriptions,
    stored_to_state,
)
from roost.cluster.link import Forward, LinkError, Links
from roost.cluster.orphans import WAIT as _ORPHAN_WAIT
from roost.cluster.orphans import Orphans
from roost.cluster.replication import ReplicaStore, Replicator, store_cores
from roost.cluster.routes import BatchWriter, RemoteTable, RouteSync
from roost.config import parse_bind
from roost.mqtt import reason_codes as RC
from roost.store.ops import Op, SessionGone

if TYPE_CHECKING:
    from roost.broker.channel import Channel
    from roost.broker.node import Broker
    from roost.broker.session import Session
    from roost.cluster.apikeys import ApiKeyMirror, KeySink
    from roost.cluster.etcd import Watch
    from roost.config import Config

log = logging.getLogger("roost.cluster")

_TAKEOVER_TIMEOUT = 5.0
_ROUTE_WAIT = 30.0  # at most this long more, for the new home's routes to show in our watch
_RELAY_GRACE = 5.0  # seconds a moved session's old home keeps sending late arrivals after it
_INFO_INTERVAL = 5.0  # seconds between refreshes of this node's key (connection counts)


def plan_moves(counts: dict[str, int], tolerance: float) -> list[tuple[str, str, int]]:
    """(from, to, how many) that bring every node to within ``tolerance`` of the mean."""
    if not counts:
        return []
    mean = sum(counts.values()) / len(counts)
    high = mean * (1 + tolerance)
    excess = {n: c - round(mean) for n, c in counts.items() if c > high}
    room = {n: round(mean) - c for n, c in counts.items() if c < mean}
    moves = []
    for src in sorted(excess, key=lambda n: -excess[n]):
        for dst in sorted(room, key=lambda n: -room[n]):
            n = min(excess[src], room[dst])
            if n <= 0:
                continue
            moves.append((src, dst, n))
            excess[src] -= n
            room[dst] -= n
    return moves


class ClusterJoinError(RuntimeError):
    """etcd could not be reached in time; the message says which endpoints and why."""


def _link_address(config: Config) -> str:
    link = config.cluster.link
    if link.advertise:
        return link.advertise
    host, _port = parse_bind(link.bind)
    if host in ("0.0.0.0", "::"):
        raise ValueError("cluster.link.advertise must be set when cluster.link.bind is a "
                         "wildcard address")  # fmt: skip
    return link.bind


def rendezvous(client_id: str, nodes: list[str]) -> str | None:
    """The node with the highest hash of (client id, node): stable as other nodes come and go."""
    best, best_h = None, b""
    for n in nodes:
        h = hashlib.sha1(f"{client_id}\x00{n}".encode(), usedforsecurity=False).digest()
        if best is None or h > best_h:
            best, best_h = n, h
    return best


class Cluster:
    """Implements the broker's ClusterHooks; started by the node runner when etcd is set."""

    def __init__(self, broker: Broker, node_info: Callable[[], dict[str, Any]]) -> None:
        cfg = broker.config
        self.broker = broker
        self.config = cfg.cluster
        self.me = cfg.node.name
        if "/" in self.me:
            raise ValueError("node.name may not contain '/' in a cluster")
        self.role = cfg.node.role
        self.link_address = _link_address(cfg)
        self._node_info = node_info
        self.etcd = Etcd(cfg.cluster.etcd.endpoints, f"/{cfg.cluster.name}/",
                         cfg.cluster.etcd.timeout)  # fmt: skip
        self.lease = LeaseKeeper(self.etcd, cfg.cluster.lease_ttl, self._lease_lost,
                                 self._lease_regained)  # fmt: skip
        self.writer = BatchWriter(self.etcd, lambda: self.lease.lease_id, self._write_failed)
        self.routes = RouteSync(self.me, self.writer)
        self.remote = RemoteTable(self.me)
        self.links: Links | None = None
        self.members: dict[str, dict[str, Any]] = {}  # live nodes (this one included)
        self.joined = False
        self.fenced = False
        self.fence_reason = ""
        self._watches: list[Watch] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._registry_dirty: set[str] = set()
        #: Client ids being taken in from another node -> messages relayed meanwhile.
        self._early: dict[str, list[Message]] = {}
        #: Sessions that moved away and still relay to their new home (evacuation waits).
        self._relaying: set[Session] = set()
        #: What was on its way to a node when it died, for the sessions it held.
        self.orphans = Orphans()
        #: Registry entries written: SUBACK of a persistent session waits for its entry, so a
        #: core adopting the session after this node dies knows the subscription.
        self.registry = Progress()
        self._registry_task: asyncio.Task[None] | None = None
        self._retained_rev: dict[str, int] = {}
        #: The wills of the clients closed when this node fenced itself (client id -> will,
        #: delay): published at rejoin for the sessions still ours; another node's otherwise.
        self._fenced_wills: dict[str, tuple[Message, int]] = {}
        self.replicator: Replicator | None = None
        #: Set by the node runner: answers a management question about this node's clients.
        self.mgmt_op: Callable[[str, dict[str, Any]], Awaitable[Any]] | None = None
        self.replicas: ReplicaStore | None = None  # cores: the replicas of others' sessions
        self._core_set: tuple[str, ...] = ()
        self.stats = {"forwards_out": 0, "forwards_in": 0, "takeovers_in": 0,
                      "takeovers_out": 0, "adopted": 0, "etcd_failures": 0,
                      "rereplicated": 0, "relayed": 0}  # fmt: skip

    # ------------------------------------------------------------------------- lifecycle

    async def start(self, wait: float = 30.0) -> None:
        """Join: wait up to ``wait`` seconds for etcd (a core's etcd member may start after
        the broker), then take a lease, publish this node and load the cluster's state."""
        etcd = self.etcd
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            try:
                await etcd.connect()
                await self.lease.start()
                break
            except EtcdError as e:
                if asyncio.get_running_loop().time() > deadline:
                    raise ClusterJoinError(f"cannot join cluster {self.config.name}: {e}") from None
                log.warning("waiting for etcd: %s", e)
                await asyncio.sleep(1.0)
        ok, current = await etcd.create("link_secret", secrets.token_bytes(32))
        secret = current.value if (not ok and current is not None) else None
        if secret is None:
            kv = await etcd.get("link_secret")
            assert kv is not None
            secret = kv.value
        links = self.links = Links(
            self.me, self.config.name, secret, self._on_forward, self._on_request,
            window=self.config.link.window, max_queue=self.config.link.max_queue,
            ack_gate=self._forward_ack_gate if self.broker.durable is not None else None,
        )  # fmt: skip
        await links.start(self.config.link.bind)
        self._start_replication(links)
        # A restarted node's routes from its previous life are stale: gone in one range.
        await etcd.delete_prefix(f"routes/{self.me}/")
        await self._put_node_key()
        # Snapshots, then watches from the revision after each.
        kvs, rev = await etcd.get_prefix("nodes/")
        self._load_members(kvs, rev)
        self._watches.append(etcd.watch_prefix("nodes/", rev + 1, self._on_node_events,
                                               self._load_members))  # fmt: skip
        kvs, rev = await etcd.get_prefix("routes/")
        self.remote.load(kvs)
        self._watches.append(etcd.watch_prefix("routes/", rev + 1, self.remote.apply,
                                               lambda kvs, _r: self.remote.load(kvs)))  # fmt: skip
        kvs, rev = await etcd.get_prefix("retained/")
        self._load_retained(kvs, rev)
        self._watches.append(etcd.watch_prefix("retained/", rev + 1, self._on_retained_events,
                                               self._load_retained))  # fmt: skip
        # Cluster-wide bans and config (cluster/state.py); close() ends its watches and loop.
        from roost.cluster.state import SharedState

        self.state = SharedState(etcd, self.broker)
        await self.state.start()
        self._watches.extend(self.state.watches)
        self._spawn(self.state.run())
        broker = self.broker
        broker.commits.add(links.commit_source)
        broker.commits.add(self.writer)
        broker.commits.add(self.registry)
        broker.router.listener = self.routes
        for entry in broker.router.filters():  # sessions restored from the local store
            if entry.subs:
                self.routes.route_added(entry.topic_filter)
            for g in entry.groups.values():
                self.routes.shared_changed(g.name, entry.topic_filter, len(g.members))
        await self._claim_restored_sessions()
        broker.cluster = self
        await self._recover_lost_sessions()
        self.joined = True
        self._spawn(self._refresh_loop())
        log.info("joined cluster %s as %s (%s), link %s, %d nodes", self.config.name, self.me,
                 self.role, self.link_address, len(self.members))  # fmt: skip

    async def mirror_api_keys(self, sink: KeySink, conflict: type[Exception]) -> ApiKeyMirror:
        """Mirror ``apikeys/`` into ``sink`` (the REST API's key table); close() ends it."""
        from roost.cluster.apikeys import ApiKeyMirror

        mirror = ApiKeyMirror(self.etcd, sink, conflict)
        await mirror.start()
        self._watches.extend(mirror.watches)
        return mirror

    async def close(self) -> None:
        self.joined = False
        for w in self._watches:
            with contextlib.suppress(Exception):
                await w.cancel()
        for t in list(self._tasks):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush_registry_now(), 2.0)
        with contextlib.suppress(Exception):
            # Our keys (node, routes) go at once; with etcd gone they go with the lease.
            await asyncio.wait_for(self.lease.stop(revoke=True), 2.0)
        if self.links is not None:
            await self.links.close()
        if self.replicas is not None:
            await self.replicas.close()
        await self.etcd.close()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----------------------------------------------------------------------- replication

    def _forward_ack_gate(self, callback: Callable[[], None]) -> None:
        """A forward is acknowledged on the link once what it stored is committed here and
        on the sessions' store cores: its publisher's PUBACK waits for that."""
        if self.orphans.waiting:  # copies for a dead node's sessions came: once placed
            self.orphans.waiting = False
            pending = self.orphans.unsettled()
            if pending:

                async def later() -> None:
                    await asyncio.wait(pending, timeout=_ORPHAN_WAIT)
                    self._forward_ack_gate(callback)

                self._spawn(later())
                return
        durable, rep = self.broker.durable, self.replicator
        assert durable is not None
        if rep is None:
            durable.after(callback)
        else:
            after_all([durable.after, rep.after], callback)

    def _start_replication(self, links: Links) -> None:
        durable = self.broker.durable
        if durable is None:
            return  # persistence off: nothing is promised across a restart, nor a node loss
        cfg = self.broker.config
        if self.role == "core":
            self.replicas = ReplicaStore(cfg.node.data_dir, cfg.persistence.fsync)
            self.replicas.load_known()  # kept even with replication off: others may send
        durable.new_mid_space(secrets.randbits(30) << 32)
        if not cfg.cluster.replication:
            return

        def epoch_of(cid: str) -> int:
            s = self.broker.registry.get(cid)
            return s.epoch if s is not None else 0

        self.replicator = Replicator(self.me, links, lambda: list(self._core_set), epoch_of)
        durable.replicate = self.replicator.op
        self.broker.commits.add(self.replicator)

    def _cores_changed(self) -> None:
        """New store cores for the sessions whose pair changed: the new ones get a snapshot
        (catch-up), the old ones are told to drop it."""
        cores = tuple(self._cores())
        if cores == self._core_set:
            return
        self._core_set = cores
        rep, durable = self.replicator, self.broker.durable
        if rep is None or durable is None:
            return
        for cid, (before, after) in rep.cores_changed().items():
            session = self.broker.registry.get(cid)
            if session is None or session.durable is None:
                continue
            for t in set(after) - set(before):
                rep.send_to(t, [(cid, session.epoch, op) for op in durable.session_ops(session)])
                if session.spilled:
                    self._send_spilled(session, t)
                self.stats["rereplicated"] += 1
            for t in set(before) - set(after):
                if t in cores:
                    rep.send_to(t, [(cid, session.epoch, SessionGone("sess_del", cid))])

    async def _fetch_replica(self, cid: str, origin: str, epoch: int) -> bytes | None:
        """The session's state from one of its store cores (its home is dead)."""
        request = json.dumps({"client_id": cid, "origin": origin, "epoch": epoch}).encode()
        for core in store_cores(cid, self._cores()):
            if core == self.me:
                state = await self._take_replica(cid, origin, epoch)
            elif self.links is not None:
                try:
                    state = await self.links.request(core, "fetch", request, _TAKEOVER_TIMEOUT)
                except LinkError as e:
                    log.warning("store core %s could not give session %s: %s", core, cid, e)
                    continue
            else:
                state = b""
            if state:
                return state
        return None

    async def _take_replica(self, cid: str, origin: str, epoch: int) -> bytes:
        if self.replicas is None:
            return b""
        taken = await self.replicas.take(origin, lambda s: s.client_id == cid, epoch)
        return stored_to_state(taken[0], time.time()) if taken else b""

    async def _recover_lost_sessions(self) -> None:
        """Sessions the registry puts on this node that its store does not have (the node
        came back with an empty disk): their store cores give them back."""
        if self.replicator is None:
            return
        kvs, _ = await self.etcd.get_prefix("sessions/")
        for kv in kvs:
            entry = parse_entry(kv.value)
            cid = kv.key[len("sessions/") :]
            if entry.get("node") != self.me or cid in self.broker.registry:
                continue
            if not entry.get("expiry"):
                with contextlib.suppress(EtcdError):
                    await self.etcd.cas_delete(kv.key, kv.mod_revision)
                continue
            async with self._lock(cid):
                value = registry_entry(self.me, None, int(entry["expiry"]), None, 0, False,
                                       self.broker.clock())  # fmt: skip
                ok, new = await self.etcd.cas(kv.key, value, kv.mod_revision)
                if not ok or new is None:
                    continue
                state = await self._fetch_replica(cid, self.me, new.mod_revision)
                if state is None:
                    state = self._state_from_entry(cid, entry)
                if state is None:
                    continue
                session = load_session(self.broker, state)
                session.epoch = new.mod_revision
                self.broker.registry.install(session)
                self._offline(session, int(entry["expiry"]))
                log.info("session %s recovered from its store cores", cid)

    def _send_spilled(self, session: Session, target: str) -> None:
        """The part of ``session``'s queue only in the store, to a new replica on ``target``:
        read back and sent after its snapshot. Its refills wait meanwhile, so that nothing
        sent or acknowledged from that part reaches the replica before the part itself."""
        durable, rep = session.durable, self.replicator
        assert durable is not None and rep is not None
        cid = session.client_id
        session.hold_refills()

        def send(ops: list[Op]) -> None:
            try:
                if self.broker.registry.get(cid) is session and session.durable is durable:
                    rep.send_to(target, [(cid, session.epoch, op) for op in ops])
            finally:
                session.release_refills()

        durable.spilled_ops(session, send)

    def _offline(self, session: Session, expiry: int) -> None:
        """A session that arrived here with no client: stored, and its expiry running."""
        session.trim()  # what it brought past its memory window waits in the store
        broker = self.broker
        if broker.durable is not None and session.durable is not None:
            broker.durable.save_session(session, None, 0, False)
        if expiry < 0xFFFFFFFF:
            broker.schedule_expiry(session.client_id, broker.clock() + expiry)

    # ------------------------------------------------------------------------ membership

    def _info(self) -> dict[str, Any]:
        info = dict(self._node_info())
        info.update(role=self.role, link=self.link_address, listeners=self._listeners(),
                    status="fenced" if self.fenced else info.get("status", "running"))  # fmt: skip
        return info

    def _listeners(self) -> dict[str, str]:
        """MQTT listeners as ``kind:name -> host:port`` (what a Server Reference can name)."""
        return {f"{kind}:{name}": lst.bind
                for kind, name, lst in self.broker.config.listeners.enabled()}  # fmt: skip

    def server_reference(self) -> str:
        """A live node's MQTT address for DISCONNECT 0x9C: another node's TCP listener that
        names a host (a wildcard bind says nothing to a client); empty when none does."""
        for name, info in sorted(self.members.items()):
            if name == self.me or info.get("status") != "running":
                continue
            for label, addr in sorted(info.get("listeners", {}).items()):
                if label.startswith("tcp:") and not addr.startswith(("0.0.0.0:", "[::]:")):
                    return str(addr)
        return ""

    async def _put_node_key(self) -> None:
        await self.etcd.put(f"nodes/{self.me}", json.dumps(self._info()).encode(),
                            lease=self.lease.lease_id)  # fmt: skip

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(_INFO_INTERVAL)
            if self.fenced:
                continue
            try:
                await self._put_node_key()
            except EtcdError as e:
                log.warning("cannot refresh this node's key: %s", e)

    def _load_members(self, kvs: list[KV], _rev: int) -> None:
        before = set(self.members)
        self.members = {}
        for kv in kvs:
            with contextlib.suppress(ValueError):
                self.members[kv.key[len("nodes/") :]] = json.loads(kv.value)
        for gone in before - set(self.members):
            self._node_gone(gone)
        self._update_peers()

    def _on_node_events(self, events: list[Event]) -> None:
        for ev in events:
            name = ev.key[len("nodes/") :]
            if ev.kind == "put":
                with contextlib.suppress(ValueError):
                    self.members[name] = json.loads(ev.value)
            elif self.members.pop(name, None) is not None:
                self._node_gone(name)
        self._update_peers()

    def _update_peers(self) -> None:
        if self.links is None:
            return
        self._cores_changed()
        peers = {n: str(i.get("link", "")) for n, i in self.members.items() if n != self.me}
        self.links.set_peers({n: a for n, a in peers.items() if a})

    def nodes(self) -> list[dict[str, Any]]:
        """Every live node's info (this one fresh), for the REST API and ``roost ctl``."""
        out = [dict(i, name=n) for n, i in self.members.items() if n != self.me]
        out.append(dict(self._info(), name=self.me))
        return sorted(out, key=lambda i: i["name"])

    async def remove_node(self, name: str) -> None:
        """A core is leaving for good (the operator asks before its pod goes): remove its etcd
        member, the one named as its host's first label (the operator names both after the
        pod: ``roost@<pod>.<service>...`` and member ``<pod>``). A replicant has none, and one
        already removed is no error. etcd itself refuses a removal that would cost it its
        quorum."""
        host = name.partition("@")[2] or name
        label = host.split(".", 1)[0]
        try:
            for m in await self.etcd.members():
                if m.name == label:
                    log.info("removing etcd member %s (%x) of departing node %s",
                             m.name, m.id, name)  # fmt: skip
                    await self.etcd.remove_member(m.id)
                    return
        except EtcdError as e:
            if "unhealthy cluster" in str(e):  # etcd's strict reconfiguration check
                raise ConnectionRefusedError(f"etcd refused: {e}") from None
            raise ConnectionError(f"etcd: {e}") from None
        log.info("node %s has no etcd member to remove", name)

    def _node_gone(self, name: str) -> None:
        if name == self.me or self.links is None:
            return
        log.warning("node %s left the cluster (its lease is gone)", name)
        self.remote.drop_node(name)
        replays = self.links.peer_down(name)
        for fwd in replays:
            self._replay(fwd, name)
        self._orphan_copies(name, replays)
        for session in [*self.broker.registry, *self._relaying]:
            if session.handoff is not None and session.handoff.home == name:
                session.handoff.end(session)  # no more relays will come from it
        if self.role == "core":
            self._spawn(self._adopt_sessions_of(name))  # settles the orphans when done
        else:
            self.orphans.settle(name)  # a replicant adopts nothing

    def _orphan_copies(self, dead: str, replays: list[Forward]) -> None:
        """Copies of what ``dead`` never acknowledged, for the sessions it held, to every live
        node and to this one (see cluster/orphans.py); the publishers' PUBACKs wait for all."""
        links = self.links
        assert links is not None
        others = [n for n in self.members if n != self.me]
        tokens = []
        for fwd in replays:
            g = fwd.group
            if g is not None and not g.startswith("\x00"):
                continue  # a shared group's: the replay gave it to another member
            group = "\x02" + dead + (g or "")
            for node in others:
                copy = Forward(fwd.topic, fwd.payload, fwd.qos, fwd.retain, fwd.props,
                               fwd.origin, fwd.mid, group, fwd.order, fwd.token)  # fmt: skip
                links.forward(node, copy)
            msg = Message(fwd.topic, fwd.payload, fwd.qos, fwd.retain, fwd.props, "",
                          self.broker.clock())  # fmt: skip
            msg.fwd_id, msg.order = (fwd.origin, fwd.mid), fwd.order
            self.orphans.arrived(dead, msg, g[1:] if g else None)
            if fwd.token and links.hold(fwd.token):
                tokens.append(fwd.token)
        self.orphans.waiting = False
        if tokens:
            self._spawn(self._release_when_settled(tokens))

    async def _release_when_settled(self, tokens: list[int]) -> None:
        pending = self.orphans.unsettled()
        if pending:
            await asyncio.wait(pending, timeout=_ORPHAN_WAIT)
        links = self.links
        assert links is not None

        def release() -> None:
            for t in tokens:
                links.release(t)

        if self.broker.durable is None:
            release()
        else:
            self._forward_ack_gate(release)

    def _replay(self, fwd: Forward, dead: str) -> None:
        """Send an unacknowledged forward along the current routes (receivers de-duplicate)."""
        assert self.links is not None
        for node in self._route_nodes(fwd.topic, fwd.group):
            if node != dead:
                self.links.forward(node, fwd)

    def _route_nodes(self, topic: str, group: str | None) -> set[str]:
        nodes: set[str] = set()
        for entry in self.remote.match(topic):
            if group is None:
                nodes |= entry.nodes
            else:
                name, _, real = group.partition("/")
                members = entry.groups.get(name)
                if members and real:
                    nodes.add(self.remote.pick_node(name, real, members))
        return nodes

    # ------------------------------------------------------------------------- fencing

    def _lease_lost(self, reason: str) -> None:
        if self.fenced:
            return
        self.fenced = True
        self.fence_reason = reason
        self.broker.fenced = True
        log.error("cut off from the cluster (%s): fencing, closing every client", reason)
        for ch in self.broker.registry.channels():
            # Not its will now: the node that adopts the session publishes it (the registry
            # entry has it), and ours would reach the others only after the partition heals.
            if ch.will is not None and ch.client_id:
                self._fenced_wills[ch.client_id] = (ch.will, ch.will_delay)
                ch.will = None
            ch.disconnect(RC.USE_ANOTHER_SERVER, "node cut off from the cluster")

    def _lease_regained(self, lease_id: int) -> None:
        log.warning("back in the cluster with lease %x: rewriting this node's keys", lease_id)

        async def rejoin() -> None:
            try:
                await self._put_node_key()
                # The sessions other nodes adopted meanwhile are theirs: drop our copies (their
                # routes must not come back, nor their wills) before routing again.
                kvs, rev = await self.etcd.get_prefix("sessions/")
                self._drop_moved_sessions({kv.key[len("sessions/") :]: kv for kv in kvs})
                self.routes.rewrite_all()
            except EtcdError as e:
                log.error("rejoin failed: %s", e)
                return
            # Route along the others' current routes (and members), not those from before the
            # partition: a route added meanwhile is not known here until the watch caught up.
            for w in self._watches[:2]:  # nodes/ and routes/: the first two (see start)
                if not await w.caught_up(rev, _ROUTE_WAIT):
                    log.warning("etcd watch of %s not caught up after %gs", w.prefix, _ROUTE_WAIT)
            self.fenced = False
            self.fence_reason = ""
            self.broker.fenced = False

        self._spawn(rejoin())

    def _drop_moved_sessions(self, registry: dict[str, KV]) -> None:
        """After a partition: drop the sessions whose registry entry is another node's now (or
        gone), and publish the wills kept at fencing of those still ours."""
        broker = self.broker
        wills, self._fenced_wills = self._fenced_wills, {}
        for session in broker.registry:
            cid = session.client_id
            lock = self._locks.get(cid)
            if not session.epoch or session.channel is not None or (lock and lock.locked()):
                continue
            kv = registry.get(cid)
            if kv is None or parse_entry(kv.value).get("node") != self.me:
                log.warning("session %s was adopted while this node was cut off: dropping "
                            "the stale copy", cid)  # fmt: skip
                broker.take_session(cid)
                wills.pop(cid, None)
        for cid, (will, delay) in wills.items():
            kv = registry.get(cid)
            if kv is not None and parse_entry(kv.value).get("node") == self.me:
                held = broker.registry.get(cid)
                expiry = held.expiry_interval if held is not None else 0
                broker.schedule_will(cid, will, min(delay, expiry))

    def _write_failed(self, e: Exception) -> None:
        self.stats["etcd_failures"] += 1
        log.warning("etcd write failed (retrying): %s", e)

    # -------------------------------------------------------------------------- routing

    def name_message(self, msg: Message) -> None:
        if msg.fwd_id is None and self.links is not None:
            msg.fwd_id = (self.me, self.links.new_mid())
            if msg.sender:
                msg.order = b"%x %b" % (self.links.tick(), msg.sender.encode())

    def forward(self, msg: Message, local_groups: list[tuple[str, str]]) -> int:
        entries = self.remote.match(msg.topic)
        if not entries or self.links is None:
            return 0
        links = self.links
        props = msg.props
        if msg.expires_at is not None:
            props = dict(props or {})
            props["message_expiry_interval"] = max(0, int(msg.expires_at - self.broker.clock()))
        origin, mid = msg.fwd_id if msg.fwd_id is not None else (self.me, links.new_mid())
        sent = 0
        if len(entries) == 1 and not entries[0].groups:
            targets = entries[0].nodes
        else:
            targets = set()
            for entry in entries:
                targets |= entry.nodes
        for node in targets:
            links.forward(node, Forward(msg.topic, msg.payload, msg.qos, msg.retain, props,
                                        origin, mid, None, msg.order))  # fmt: skip
            sent += 1
        for entry in entries:
            if not entry.groups:
                continue
            real = entry.real
            for name, members in entry.groups.items():
                if (name, real) in local_groups or not members:
                    continue
                node = self.remote.pick_node(name, real, members)
                fwd = Forward(msg.topic, msg.payload, msg.qos, msg.retain, props, self.me,
                              links.new_mid(), f"{name}/{real}", msg.order)  # fmt: skip
                links.forward(node, fwd)
                sent += 1
        self.stats["forwards_out"] += sent
        return sent

    def _on_forward(self, fwd: Forward) -> None:
        self.stats["forwards_in"] += 1
        broker = self.broker
        msg = Message(fwd.topic, fwd.payload, fwd.qos, fwd.retain, fwd.props, "", broker.clock())
        msg.fwd_id, msg.order = (fwd.origin, fwd.mid), fwd.order
        group = fwd.group
        if group is not None and group.startswith("\x02"):  # for a dead node's sessions
            dead, _, cid = group[1:].partition("\x00")
            self.orphans.arrived(dead, msg, cid or None)
            return
        if group is not None and group.startswith("\x01"):  # the old home relays no more
            cid = group[1:]
            # Its session here, or one that moved on from here meanwhile: the one whose handoff
            # waits for that node (the marker's origin).
            here = broker.registry.get(cid)
            for session in [*([here] if here is not None else []), *self._relaying]:
                handoff = session.handoff
                if session.client_id == cid and handoff is not None and handoff.home == fwd.origin:
                    handoff.end(session)
            return
        if group is not None and group.startswith("\x00"):
            cid = group[1:]
            if cid not in broker.registry:
                early = self._early.get(cid)
                if early is not None:  # sent after the session, ahead of our taking it in
                    early.append(msg)
                    return
                onward = self._relay_of(cid)
                if onward is not None and onward.relay is not None:
                    broker.deliver_relayed(onward, msg)  # it moved on from here too: after it
                    return
        broker.stats.messages_received += 1
        broker.stats.received_qos[msg.qos] += 1
        broker.deliver_forwarded(msg, fwd.group)

    # ------------------------------------------------------------------------- sessions

    def _lock(self, client_id: str) -> asyncio.Lock:
        lock = self._locks.get(client_id)
        if lock is None:
            lock = self._locks[client_id] = asyncio.Lock()
        return lock

    def open_session(
        self, channel: Channel, client_id: str, clean_start: bool, expiry: int,
        done: Callable[[Session, bool], None],
    ) -> None:  # fmt: skip
        self._spawn(self._open(channel, client_id, clean_start, expiry, done))

    async def _open(
        self, channel: Channel, client_id: str, clean_start: bool, expiry: int,
        done: Callable[[Session, bool], None],
    ) -> None:  # fmt: skip
        lock = self._lock(client_id)
        try:
            async with lock:
                self._early[client_id] = []
                try:
                    epoch, state, home = await self._claim(channel, client_id, clean_start,
                                                           expiry)  # fmt: skip
                except (EtcdError, LinkError, OSError) as e:
                    self._early.pop(client_id, None)
                    log.warning("cannot open session %s in the cluster: %s", client_id, e)
                    channel.refuse(RC.SERVER_UNAVAILABLE, "session registry unavailable")
                    return
                broker = self.broker
                if state is not None and not clean_start:
                    old = broker.registry.remove(client_id)
                    if old is not None and old.channel is None:
                        for f in list(old.subscriptions):
                            broker.router.remove(client_id, f)
                    loaded = load_session(broker, state)
                    if home in self.members:  # alive: it relays for a while
                        self._moved_here(loaded, home)
                    broker.registry.install(loaded)
                    if home and home != self.me and home not in self.members:
                        self.orphans.session_from(home, loaded)  # from its store cores
                    loaded.trim()
                session, present = broker.attach_session(channel, client_id, clean_start, expiry)
                session.epoch = epoch
                early = self._early.pop(client_id, [])
                done(session, present)
                for msg in early:  # after the CONNACK, like anything else sent to it
                    broker.deliver_relayed(session, msg)  # acknowledged by their origin
        finally:
            self._early.pop(client_id, None)
            if not lock.locked() and not lock._waiters:
                self._locks.pop(client_id, None)

    async def _claim(
        self, channel: Channel, client_id: str, clean_start: bool, expiry: int
    ) -> tuple[int, bytes | None, str]:
        """Make this node the session's home; (epoch, handed-over state or None, old home)."""
        key = f"sessions/{client_id}"
        now = self.broker.clock()
        local = self.broker.registry.get(client_id)
        value = registry_entry(self.me, local if not clean_start else None, expiry,
                               channel.will, channel.will_delay, True, now)  # fmt: skip
        etcd = self.etcd
        for _ in range(10):
            kv = await etcd.get(key)
            expected = 0 if kv is None else kv.mod_revision
            ok, new = await etcd.cas(key, value, expected)
            if not ok or new is None:
                continue  # someone else moved it meanwhile: look again
            home = parse_entry(kv.value).get("node") if kv is not None else None
            if home is None or home == self.me:
                return new.mod_revision, None, str(home or "")
            if home in self.members:
                self.stats["takeovers_in"] += 1
                request = json.dumps({"client_id": client_id, "epoch": new.mod_revision,
                                      "clean": clean_start}).encode()  # fmt: skip
                assert self.links is not None  # members come from the cluster links serve
                try:
                    state = await self.links.request(home, "takeover", request,
                                                     _TAKEOVER_TIMEOUT)  # fmt: skip
                    return new.mod_revision, state or None, str(home)
                except LinkError as e:
                    # Unreachable (dead before its lease says so): its store cores have the
                    # session, and our new epoch fences whatever the old home still writes.
                    log.warning("old home %s of %s unreachable (%s): from its store cores",
                                home, client_id, e)  # fmt: skip
            # The old home is dead and nobody adopted the session yet: its store cores have it
            # (else what the registry knows: the subscriptions).
            entry = parse_entry(kv.value) if kv is not None else {}
            if clean_start:
                return new.mod_revision, None, str(home or "")
            replica = await self._fetch_replica(client_id, str(home), new.mod_revision)
            return new.mod_revision, replica or self._state_from_entry(client_id, entry), str(home)
        raise EtcdError(f"session {client_id}: registry entry changed 10 times in a row")

    def _state_from_entry(self, client_id: str, entry: dict[str, Any]) -> bytes | None:
        if not entry.get("expiry"):
            return None
        return json.dumps({"client_id": client_id, "expiry": entry["expiry"],
                           "subs": entry.get("subs", []), "inflight": [], "queue": [],
                           "rel": []}).encode()  # fmt: skip

    async def _on_request(self, origin: str, kind: str, payload: bytes) -> bytes:
        if kind == "takeover":
            return await self._hand_over(origin, json.loads(payload))
        if kind == "adopt":
            return await self._adopt_pushed(origin, payload)
        if kind == "mgmt":
            if self.mgmt_op is None:
                raise ValueError("no management layer on this node")
            req = json.loads(payload)
            return json.dumps(await self.mgmt_op(req["op"], req["args"])).encode()
        if kind == "count":
            return str(self._connections()).encode()
        if kind == "shed":
            req = json.loads(payload)
            self._spawn(self._shed(int(req["count"]), int(req["rate"]), req["to"]))
            return b"ok"
        if kind == "repl":
            if self.replicas is None:
                raise ValueError("not a store core")
            return await self.replicas.apply(origin, payload)
        if kind == "replicas_off":  # the asker evacuates: does it keep no copy of ours?
            rep = self.replicator
            off = origin not in self._core_set and (rep is None or rep.idle())
            return b"1" if off else b"0"
        if kind == "fetch":
            req = json.loads(payload)
            return await self._take_replica(req["client_id"], req["origin"], req["epoch"])
        raise ValueError(f"unknown request {kind!r}")

    def _cores(self, exclude: str | None = None) -> list[str]:
        """The live cores that keep sessions (store cores, adopters, hand-over targets): not
        those evacuating, unless every core is."""
        cores = [n for n, i in self.members.items() if i.get("role") == "core" and n != exclude]
        staying = [n for n in cores if not self._evacuating(n)]
        return sorted(staying or cores)

    def _evacuating(self, node: str) -> bool:
        if node == self.me:
            return self.broker.evacuating
        return self.members.get(node, {}).get("status") == "evacuating"

    async def release_replicas(self, timeout: float = 60.0) -> bool:
        """Evacuation: until no node keeps its sessions' copies here any more (an evacuating
        core stops being a store core, so the homes copy those sessions to another core);
        False if some node did not say so in time."""
        await self._put_node_key()  # the others see "evacuating" now, not at the next refresh
        self._cores_changed()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiting = {n for n in self.members if n != self.me}
        while loop.time() < deadline:
            for peer in sorted(waiting):
                try:
                    answer = await self.links.request(peer, "replicas_off", b"", 2.0)  # type: ignore[union-attr]
                except (LinkError, ValueError):
                    continue
                if answer == b"1":
                    waiting.discard(peer)
            waiting &= set(self.members)
            rep = self.replicator
            if not waiting and (rep is None or rep.idle()):
                return True
            await asyncio.sleep(0.2)
        return False

    async def _push_to_core(self, session: Session) -> None:
        core = rendezvous(session.client_id, self._cores())
        if core is None:
            log.warning("no core to hand offline session %s to: keeping it here",
                        session.client_id)  # fmt: skip
            return
        await self._push_session(session, core)

    async def move_sessions(self, n: int, to: list[str] | None = None) -> int:
        """Evacuation: hand up to ``n`` offline sessions to other nodes (those in ``to``, else
        the cores; by rendezvous hash of the client id); how many moved."""
        targets = sorted(t for t in (to or self._cores(exclude=self.me))
                         if t in self.members and t != self.me)  # fmt: skip
        if not targets:
            return 0
        moved = 0
        for session in list(self.broker.registry)[:n]:
            cid = session.client_id
            if session.channel is None:
                target = rendezvous(cid, targets)
                if target is not None and await self._push_session(session, target):
                    moved += 1
        return moved

    async def _push_session(self, session: Session, target: str) -> bool:
        """Hand an offline session to ``target``; messages that reach this node meanwhile
        follow it as forwards addressed to the client."""
        cid = session.client_id
        async with self._lock(cid):
            broker = self.broker
            if broker.registry.get(cid) is not session or session.channel is not None:
                return False  # the client came back (or left) meanwhile
            if self.links is None:
                return False
            await self._drain_handoff(session)
            if session.durable is not None:
                await session.durable.unspill(session)  # the whole queue goes with it
            if broker.registry.get(cid) is not session or session.channel is not None:
                session.pinned = False
                return False
            now = broker.clock()
            pending = broker.pending_will(cid)
            header: dict[str, Any] = {"epoch": session.epoch}
            if pending is not None:
                header["will"] = dump_message(pending[1], now)
                header["will_delay"] = max(0.0, pending[0] - now)
            sent = len(session.queue)
            body = json.dumps(header).encode() + b"\n" + dump_session(session, now)
            try:
                answer = await self.links.request(target, "adopt", body, _TAKEOVER_TIMEOUT)
            except LinkError as e:
                if not await self._adopted_anyway(session, target):
                    log.warning("offline session %s not handed to %s, kept here: %s",
                                cid, target, e)  # fmt: skip
                    session.pinned = False
                    session.trim()
                    if pending is not None:
                        broker.schedule_will(cid, pending[1], max(0.0, pending[0] - now))
                    return False
                answer = b"adopted, its answer late"
            if broker.registry.get(cid) is not session:
                return False
            late = list(session.queue)[sent:]
            broker.take_session(cid, relay=lambda msg, qos: self._relay(target, cid, msg, qos))
            self._relaying.add(session)
            self._spawn(self._end_relay(session, target))
            for d in late:  # arrived while the target was taking it: send them after it
                self._relay(target, cid, d.msg, d.qos)
            self.stats["takeovers_out"] += 1
            log.info("offline session %s handed to %s (%s)", cid, target, answer.decode())
            return True

    async def _adopted_anyway(self, session: Session, target: str) -> bool:
        """No answer to our hand-over of ``session`` in time: the target may have taken it or
        may still take it. A compare-and-swap on the registry entry settles which: ours (a new
        epoch, so a late adopt fails) or the target's (it has the session: treat it as sent)."""
        cid = session.client_id
        value = registry_entry(self.me, session, session.expiry_interval, None, 0, False,
                               self.broker.clock())  # fmt: skip
        try:
            ok, kv = await self.etcd.cas(f"sessions/{cid}", value, session.epoch)
            if ok and kv is not None:
                session.epoch = kv.mod_revision
                return False
            kv = await self.etcd.get(f"sessions/{cid}")
        except EtcdError:
            return False  # the registry write that fails too fences us off the session later
        return kv is not None and parse_entry(kv.value).get("node") == target

    async def _adopt_pushed(self, origin: str, payload: bytes) -> bytes:
        head, _, state = payload.partition(b"\n")
        header = json.loads(head)
        cid = json.loads(state)["client_id"]
        broker = self.broker
        async with self._lock(cid):
            if cid in broker.registry:
                raise ValueError(f"session {cid} is already here (its client came)")
            # The registry first: a session that moved on meanwhile must not touch our router
            # (its client id may have a live session here by then).
            entry = json.loads(state)
            value = registry_entry(self.me, None, int(entry["expiry"]), None, 0, False,
                                   broker.clock())  # fmt: skip
            # The old home may learn from the registry that we have it before we install it
            # (our answer late) and relay at once: those wait here for the session.
            early: list[Message] = []
            self._early[cid] = early
            try:
                ok, new = await self.etcd.cas(f"sessions/{cid}", value, header["epoch"])
            finally:
                self._early.pop(cid, None)
            if not ok or new is None or cid in broker.registry:
                raise ValueError(f"session {cid} moved on meanwhile")
            mark = broker.commits.mark()
            session = self._moved_here(load_session(broker, state), origin)
            session.trim()
            session.epoch = new.mod_revision
            broker.registry.install(session)
            for msg in early:
                broker.deliver_relayed(session, msg)
            if broker.durable is not None and session.durable is not None:
                broker.durable.save_session(session, None, 0, False)
            if session.expiry_interval < 0xFFFFFFFF:
                broker.schedule_expiry(cid, broker.clock() + session.expiry_interval)
            if "will" in header:
                will = load_message(header["will"], broker.clock())
                broker.schedule_will(cid, will, header.get("will_delay", 0))
            self.stats["adopted"] += 1
            # "adopted" promises what a SUBACK and a PUBACK do: routes in etcd, deliveries
            # stored here and on the session's store cores. The old home relies on it.
            committed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def _committed() -> None:
                if not committed.done():
                    committed.set_result(None)

            broker.commits.wait(broker.commits.moved(mark), _committed)
            # Bounded below the asker's timeout: it is ours now whatever the wait says.
            await asyncio.wait([committed], timeout=_TAKEOVER_TIMEOUT / 2)
        return b"adopted"

    async def _hand_over(self, origin: str, req: dict[str, Any]) -> bytes:
        client_id = req["client_id"]
        lock = self._lock(client_id)
        try:
            await asyncio.wait_for(lock.acquire(), _TAKEOVER_TIMEOUT / 2)
            held = True
        except TimeoutError:
            held = False  # a claim of ours is stuck on the same client: do not deadlock
        try:
            session = self.broker.registry.get(client_id)
            if session is not None and session.epoch > req["epoch"]:
                return b""  # our claim is newer than the asker's
            if session is not None:
                await self._drain_handoff(session)
                if session.durable is not None and not req.get("clean"):
                    await session.durable.unspill(session)  # the whole queue goes with it
            clean = bool(req.get("clean"))  # a clean start wants nothing of the old session
            relay = None if clean else (lambda msg, qos: self._relay(origin, client_id, msg, qos))
            session = self.broker.take_session(client_id, relay=relay)
            if session is None:
                return b""
            if not clean:
                self._relaying.add(session)
                self._spawn(self._end_relay(session, origin))
            self.stats["takeovers_out"] += 1
            log.info("session %s handed over to %s", client_id, origin)
            return b"" if clean else dump_session(session, self.broker.clock())
        finally:
            if held:
                lock.release()

    def _relay(self, home: str, client_id: str, msg: Message, qos: int) -> None:
        """A message that reached a session after it moved: after it, to its new home. It keeps
        its identity, by which the new home drops it if the message also came there directly
        (its route there may or may not have been known to the publisher's node)."""
        if self.links is None:
            return
        origin, mid = msg.fwd_id if msg.fwd_id is not None else (self.me, self.links.new_mid())
        self.links.forward(home, Forward(msg.topic, msg.payload, qos, False, msg.props, origin,
                                         mid, "\x00" + client_id, msg.order))  # fmt: skip
        self.stats["relayed"] += 1

    async def _end_relay(self, session: Session, home: str) -> None:
        """Keep relaying until no node can still send the session's messages here alone.

        Our route delete comes after the new home's route puts in every node's watch once our
        own watch has shown them, so we wait for that (and at least the grace period, for
        forwards already on their way) before the delete."""
        await asyncio.sleep(_RELAY_GRACE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ROUTE_WAIT
        while home in self.members and loop.time() < deadline and not all(
            self.remote.has_route(home, f) for f in session.subscriptions
        ):
            await asyncio.sleep(0.1)
        session.relay = None
        self.broker.drop_relay(session)
        self._relaying.discard(session)
        links = self.links
        if links is not None:  # after the last relay, on the same link: it may stop waiting
            links.forward(home, Forward("relayed", b"", 1, False, None, self.me, links.new_mid(),
                                        "\x01" + session.client_id))  # fmt: skip

    async def _drain_handoff(self, session: Session, bound: float = 1.0) -> None:
        """The session moved here moments ago and moves on now: first let the copies it holds
        (come directly, waiting for the old home's relayed copies) meet those, usually within
        milliseconds. A relayed copy arriving after it left would be passed on behind later
        messages. Bounded: one that never comes (its publisher's node stopped routing to the
        old home) does not hold the takeover."""
        deadline = asyncio.get_running_loop().time() + bound
        while (session.handoff is not None and any(session.handoff.held.values())
               and asyncio.get_running_loop().time() < deadline):  # fmt: skip
            await asyncio.sleep(0.01)

    def _relay_of(self, cid: str) -> Session | None:
        """The newest session of ``cid`` this node still relays for, if any."""
        mine = [s for s in self._relaying if s.client_id == cid]
        return max(mine, key=lambda s: s.epoch) if mine else None

    async def settle(self) -> None:
        """Until the sessions that left this node no longer need it (their relays ended)."""
        while self._relaying:
            await asyncio.sleep(0.1)

    def _moved_here(self, session: Session, old_home: str) -> Session:
        """A session handed over by its old home, which relays for a while what still reaches
        it there: each message once, each publisher's in order (see broker/handoff.py)."""
        handoff = session.handoff = Handoff(old_home)
        for d in (*session.inflight.values(), *session.queue):
            handoff.remember(d.msg)

        def give_up() -> None:  # the old home's last word never came (it died, say)
            if session.handoff is handoff:
                handoff.end(session)

        asyncio.get_running_loop().call_later(_RELAY_GRACE + _ROUTE_WAIT + 5.0, give_up)
        return session

    def session_changed(self, session: Session) -> None:
        if (self.role == "replicant" and session.channel is None and session.expiry_interval
                and session.epoch):  # fmt: skip
            # A replicant holds live connections only: the offline session goes to a core.
            self._spawn(self._push_to_core(session))
            return
        if session.epoch:
            self.registry.submit()
            self._registry_dirty.add(session.client_id)
            if self._registry_task is None or self._registry_task.done():
                self._registry_task = self._spawn(self._flush_registry())

    def session_ended(self, session: Session) -> None:
        if not session.epoch:
            return
        self._registry_dirty.discard(session.client_id)
        epoch = session.epoch

        async def delete() -> None:
            with contextlib.suppress(EtcdError):
                # Only our own epoch: a node that took the session over keeps its entry.
                await self.etcd.cas_delete(f"sessions/{session.client_id}", epoch)

        self._spawn(delete())

    async def _flush_registry(self) -> None:
        await asyncio.sleep(0)  # gather the turn's changes
        await self._flush_registry_now()

    async def _flush_registry_now(self) -> None:
        while self._registry_dirty:
            # A pass writes the entries dirty now, so it covers the changes submitted so far;
            # those made during it (a client subscribing while a write is under way) are left
            # dirty for the next pass, whose target covers them. (Counting them in this pass
            # but marking only the earlier target left their SUBACKs waiting forever.)
            target = self.registry.submitted
            batch, self._registry_dirty = self._registry_dirty, set()
            if await self._flush_registry_pass(batch):
                self.registry.done(target)

    async def _flush_registry_pass(self, batch: set[str]) -> bool:
        """Write the entries of ``batch``; False if some must be written again (etcd)."""
        complete = True
        while batch:
            cid = batch.pop()
            session = self.broker.registry.get(cid)
            if session is None or not session.epoch:
                continue
            ch = session.channel
            value = registry_entry(self.me, session, session.expiry_interval,
                                   ch.will if ch is not None else None,
                                   ch.will_delay if ch is not None else 0, ch is not None,
                                   self.broker.clock())  # fmt: skip
            try:
                ok, kv = await self.etcd.cas(f"sessions/{cid}", value, session.epoch)
            except EtcdError as e:
                # Keep it dirty (the replies waiting for it keep waiting) and try again.
                log.warning("registry entry of %s not written, retrying: %s", cid, e)
                self._registry_dirty.add(cid)
                complete = False
                await asyncio.sleep(0.5)
                continue
            if ok and kv is not None:
                session.epoch = kv.mod_revision
            elif self.broker.registry.get(cid) is session:
                # Another node made itself the home after our epoch: it is asking us for the
                # session right now (takeover), so keep it for that; drop it only if nobody
                # came for it (the new home got it from the store cores).
                self._spawn(self._drop_if_unclaimed(cid, session))
        return complete

    async def _drop_if_unclaimed(self, cid: str, session: Session) -> None:
        await asyncio.sleep(_TAKEOVER_TIMEOUT * 2)
        async with self._lock(cid):
            if self.broker.registry.get(cid) is not session or session.channel is not None:
                return
            kv = await self.etcd.get(f"sessions/{cid}")
            if kv is None or parse_entry(kv.value).get("node") != self.me:
                log.info("session %s belongs to another node now: dropping this copy", cid)
                self.broker.take_session(cid)

    async def _claim_restored_sessions(self) -> None:
        """Sessions restored from this node's store: keep those the registry still puts here
        (or nowhere), drop those another node took over while this one was down."""
        for session in self.broker.registry:
            cid = session.client_id
            key = f"sessions/{cid}"
            kv = await self.etcd.get(key)
            if kv is not None and parse_entry(kv.value).get("node") not in (self.me, None, ""):
                log.info("session %s lives on another node now: dropping the local copy", cid)
                self.broker.take_session(cid)
                continue
            value = registry_entry(self.me, session, session.expiry_interval, None, 0, False,
                                   self.broker.clock())  # fmt: skip
            ok, new = await self.etcd.cas(key, value, 0 if kv is None else kv.mod_revision)
            if ok and new is not None:
                session.epoch = new.mod_revision

    async def _adopt_sessions_of(self, dead: str) -> None:
        """Claim the sessions whose home died (each by one core: rendezvous hash over the
        live cores), re-add their routes, and publish or schedule their wills."""
        try:
            await asyncio.sleep(0.2)  # let the dead node's route deletions arrive first
            try:
                kvs, _ = await self.etcd.get_prefix("sessions/")
            except EtcdError as e:
                log.warning("cannot list sessions of %s to adopt them: %s", dead, e)
                return
            cores = self._cores()
            broker = self.broker
            for kv in kvs:
                entry = parse_entry(kv.value)
                if entry.get("node") != dead:
                    continue
                cid = kv.key[len("sessions/") :]
                # The first live store core adopts: it holds a replica (the second one too).
                owners = store_cores(cid, cores)
                if not owners or owners[0] != self.me:
                    continue
                await self._adopt(cid, kv, entry, broker, dead)
        finally:
            self.orphans.settle(dead)

    async def _adopt(
        self, cid: str, kv: KV, entry: dict[str, Any], broker: Broker, dead: str
    ) -> None:
        now = broker.clock()
        will = load_message(entry["will"], now) if entry.get("will") else None
        expiry = int(entry.get("expiry", 0))
        async with self._lock(cid):
            if not expiry:
                if await self.etcd.cas_delete(kv.key, kv.mod_revision) and will is not None:
                    broker.schedule_will(cid, will, 0)
                return
            value = registry_entry(self.me, None, expiry, None, 0, False, now)
            ok, new = await self.etcd.cas(kv.key, value, kv.mod_revision)
            if not ok or new is None or cid in broker.registry:
                return
            state = await self._take_replica(cid, dead, new.mod_revision)
            if state:
                session = load_session(broker, state)
            else:  # no replica (persistence off, or it never reached us): the subscriptions
                session = broker.new_session(cid)
                session.expiry_interval = expiry
                session.durable = broker.durable
                restore_subscriptions(broker, session, entry.get("subs", []))
            session.epoch = new.mod_revision
            broker.registry.install(session)
            self.orphans.session_from(dead, session)
            self._offline(session, expiry)
            if will is not None:
                broker.schedule_will(cid, will, min(int(entry.get("will_delay", 0)), expiry))
            self.stats["adopted"] += 1
            self.session_changed(session)
            log.info("adopted session %s of dead node %s", cid, kv.key)

    # ------------------------------------------------------------------------- retained

    def retained_changed(self, msg: Message) -> None:
        key = f"retained/{msg.topic}"
        if not msg.payload:
            self.writer.delete(key, force=True)
            return
        wall_left = None if msg.expires_at is None else msg.expires_at - self.broker.clock()
        value = json.dumps({"m": dump_message(msg, self.broker.clock()), "origin": self.me,
                            "wall": time.time(), "left": wall_left}).encode()  # fmt: skip
        self.writer.put(key, value, leased=False)

    def _retained_message(self, kv_value: bytes) -> Message | None:
        try:
            data = json.loads(kv_value)
            return load_message(data["m"], self.broker.clock())
        except (ValueError, KeyError, TypeError):
            return None

    def _load_retained(self, kvs: list[KV], _rev: int) -> None:
        retainer = self.broker.retainer
        # etcd holds the cluster's retained messages: what the local store had is replaced.
        for topic in retainer.topics():
            if not topic.startswith("$SYS/"):
                retainer.delete(topic)
        for kv in kvs:
            msg = self._retained_message(kv.value)
            if msg is not None:
                retainer.store(msg)

    def _on_retained_events(self, events: list[Event]) -> None:
        retainer = self.broker.retainer
        for ev in events:
            topic = ev.key[len("retained/") :]
            if ev.kind == "delete":
                retainer.delete(topic)
                continue
            msg = self._retained_message(ev.value)
            if msg is not None:
                retainer.store(msg)

    async def fanout(self, op: str, args: dict[str, Any]) -> list[Any]:
        """Ask every other live node the management question ``op``; their answers (nodes
        that cannot answer in time are left out, and logged)."""
        if self.links is None:
            return []
        links = self.links
        request = json.dumps({"op": op, "args": args}).encode()
        peers = [n for n in sorted(self.members) if n != self.me]

        async def ask(peer: str) -> Any:
            try:
                return json.loads(await links.request(peer, "mgmt", request, 3.0))
            except (LinkError, ValueError) as e:
                log.warning("node %s did not answer %s: %s", peer, op, e)
                return None

        answers = await asyncio.gather(*(ask(p) for p in peers))
        return [a for a in answers if a is not None]

    # ------------------------------------------------------------------------ rebalance

    async def rebalance(self, rate: int, tolerance: float) -> dict[str, Any]:
        """Plan which nodes above the mean connection count send how many clients to which
        nodes below it, and tell the busy ones to start (each at ``rate`` per second)."""
        counts = {n: int(i.get("connections", 0)) for n, i in self.members.items()
                  if i.get("status") == "running"}  # fmt: skip
        counts[self.me] = self._connections()
        for peer in list(counts):  # fresh figures (the node keys are up to 5 s old)
            if peer != self.me and self.links is not None:
                with contextlib.suppress(LinkError, ValueError):
                    counts[peer] = int(await self.links.request(peer, "count", b"", 2.0))
        moves = plan_moves(counts, tolerance)
        for src, dst, n in moves:
            ref = self._reference_of(dst)
            request = json.dumps({"count": n, "rate": rate, "to": ref}).encode()
            if src == self.me:
                self._spawn(self._shed(n, rate, ref))
            elif self.links is not None:
                await self.links.request(src, "shed", request, _TAKEOVER_TIMEOUT)
        return {"connections": counts,
                "moves": [{"from": a, "to": b, "count": n} for a, b, n in moves]}  # fmt: skip

    def _connections(self) -> int:
        return sum(1 for ch in self.broker.registry.channels() if ch.connected)

    def _reference_of(self, node: str) -> str:
        info = self.members.get(node, {})
        for label, addr in sorted(info.get("listeners", {}).items()):
            if label.startswith("tcp:") and not addr.startswith(("0.0.0.0:", "[::]:")):
                return str(addr)
        return ""

    async def _shed(self, count: int, rate: int, reference: str) -> None:
        """Disconnect ``count`` clients at ``rate`` per second with 0x9C (and a Server
        Reference on MQTT 5); persistent ones take their sessions to where they reconnect."""
        done = 0
        while done < count:
            victims = self.broker.registry.connected_channels()
            for ch in victims[: min(rate, count - done)]:
                ch.disconnect(RC.USE_ANOTHER_SERVER, "rebalancing", reference)
                done += 1
            if not victims:
                break
            await asyncio.sleep(1.0)
        log.info("rebalance: %d connections sent to %s", done, reference or "another node")

    # --------------------------------------------------------------------------- status

    def check(self) -> tuple[bool, str]:
        if self.fenced:
            return False, f"fenced: {self.fence_reason}"
        if not self.joined:
            return False, "not joined"
        return True, f"{len(self.members)} nodes"

    def status(self) -> dict[str, Any]:
        links = self.links.stats() if self.links is not None else {}
        return {
            "name": self.config.name, "node": self.me, "role": self.role,
            "joined": self.joined, "fenced": self.fenced, "fence_reason": self.fence_reason,
            "nodes": len(self.members), "remote_routes": len(self.remote),
            "local_routes": len(self.routes.routes), "links": links,
            "etcd": self.etcd.stats.snapshot(), "route_transactions": self.writer.transactions,
            "replica_ops_refused": self.replicas.ops_refused if self.replicas is not None else 0,
            **self.stats,
        }
