"""Replicated session state: each persistent session has two store cores.

The store cores of a client id are the two live cores with the highest rendezvous hash. The
node holding the session (its home) sends every durable operation of the session (new
delivery, inflight change, ack, QoS 2 state, subscriptions and expiry) to both, in batches,
over the node links; each applies them to a SQLite file of its own per origin node
(``<data_dir>/replicas/<origin>.db``, the same schema as the local store). When the home is
itself one of the two, its own store counts for that one.

The home's :class:`Replicator` is a commit source: PUBACK/PUBREC, CONNACK of a persistent
session and SUBACK wait until both store cores have committed. Operations carry the session's
epoch; a store core refuses those older than the epoch at which it last handed the session
out (adoption or fetch), so a node that lost its session cannot write it back.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from roost.broker.commits import Progress
from roost.store.ops import Op, SessionGone, coalesce, from_wire
from roost.store.persister import Persister
from roost.store.sqlite import SqliteStore, StoredSession

if TYPE_CHECKING:
    from roost.cluster.link import Links

log = logging.getLogger("roost.cluster.replication")

REPLICAS = 2
_RETRY = 0.2


def store_cores(client_id: str, cores: list[str], n: int = REPLICAS) -> list[str]:
    """The ``n`` cores with the highest hash of (client id, core): stable as others come and
    go (removing one core moves only the sessions it held)."""

    def h(core: str) -> bytes:
        return hashlib.sha1(f"{client_id}\x00{core}".encode(), usedforsecurity=False).digest()

    return sorted(cores, key=h, reverse=True)[:n]


# ------------------------------------------------------------------------------ wire format


def _enc(v: Any) -> Any:
    if isinstance(v, bytes | bytearray):
        return {"$b": base64.b64encode(v).decode()}
    raise TypeError(f"cannot replicate a {type(v).__name__}")


def _dec(obj: dict[str, Any]) -> Any:
    return base64.b64decode(obj["$b"]) if "$b" in obj else obj


# The C encoder and decoder walk the batch; Python runs only for payloads (no op holds another
# dict: properties travel as JSON text). A Python call per field cost most of the home's CPU.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_enc)


def encode_batch(items: list[tuple[str, int, Op]]) -> bytes:
    """[(client id, epoch, store op)] as JSON (payloads base64)."""
    return _ENCODER.encode(items).encode()


def decode_batch(data: bytes) -> list[tuple[str, int, Op]]:
    return [(cid, ep, from_wire(op)) for cid, ep, op in json.loads(data, object_hook=_dec)]


# ----------------------------------------------------------------------------- home side


def _op_of(item: tuple[str, int, Op]) -> Op:
    return item[2]


def _shared(
    batches: dict[str, list[tuple[str, int, Op]]],
) -> list[tuple[list[str], list[tuple[str, int, Op]]]]:
    """The batches with the targets that get the same one grouped, so that it is encoded
    once: the two store cores of a session get the same operations (the same objects, so the
    comparison is by identity, at C speed)."""
    groups: list[tuple[list[str], list[tuple[str, int, Op]]]] = []
    for target, items in batches.items():
        for targets, same in groups:
            if len(same) == len(items) and same == items:
                targets.append(target)
                break
        else:
            groups.append(([target], items))
    return groups


class Replicator(Progress):
    """Sends the sessions' operations to their store cores; a commit source for the gate."""

    def __init__(
        self, me: str, links: Links, cores: Callable[[], list[str]],
        epoch_of: Callable[[str], int],
    ) -> None:  # fmt: skip
        super().__init__()
        self.me = me
        self.links = links
        self._cores = cores
        self._epoch_of = epoch_of
        self._targets: dict[str, list[str]] = {}  # client id -> store cores other than me
        self._pending: dict[str, list[tuple[str, int, Op]]] = {}
        self._sent_msgs: dict[str, set[int]] = {}  # per target, message ids in this batch
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.ops_sent = 0
        self.failures = 0

    def targets(self, client_id: str) -> list[str]:
        t = self._targets.get(client_id)
        if t is None:
            t = self._targets[client_id] = [
                c for c in store_cores(client_id, self._cores()) if c != self.me
            ]
        return t

    def cores_changed(self) -> dict[str, tuple[list[str], list[str]]]:
        """Forget cached targets; (old, new) targets per client id that changed."""
        old, self._targets = self._targets, {}
        changed = {}
        for cid, before in old.items():
            after = self.targets(cid)
            if after != before:
                changed[cid] = (before, after)
        return changed

    def op(self, client_id: str, op: Op, gate: bool = True) -> None:
        targets = self.targets(client_id)
        if not targets:
            return
        if op.tag == "sess_del":
            self._targets.pop(client_id, None)
        item = (client_id, self._epoch_of(client_id), op)
        for t in targets:
            if op.tag == "msg":
                seen = self._sent_msgs.setdefault(t, set())
                if op[1] in seen:
                    continue
                seen.add(op[1])
            self._pending.setdefault(t, []).append(item)
        if gate:  # else written in order with the rest, but no reply waits for it
            self.submit()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def idle(self) -> bool:
        """Nothing waits to be sent or answered."""
        return not self._pending and (self._task is None or self._task.done())

    def send_to(self, target: str, items: list[tuple[str, int, Op]]) -> None:
        """Queue a snapshot of a session for a new store core (not gated)."""
        self._pending.setdefault(target, []).extend(items)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # gather what this turn adds
            upto = self.submitted
            batches, self._pending, self._sent_msgs = self._pending, {}, {}
            await asyncio.gather(*(self._send(ts, items) for ts, items in _shared(batches)))
            self.done(upto)
        self.done(self.submitted)

    async def _send(self, targets: list[str], items: list[tuple[str, int, Op]]) -> None:
        # What the subscribers acknowledged while the last batch was on its way need not reach
        # the store cores at all.
        items = coalesce(items, _op_of, messages=True)
        if items:
            data = encode_batch(items)
            await asyncio.gather(*(self._send_one(t, data, len(items)) for t in targets))

    async def _send_one(self, target: str, data: bytes, n: int) -> None:
        while True:
            if target not in self._cores():
                return  # it died: the sessions get a new store core (cores_changed)
            try:
                log.debug("replicating %d ops to %s", n, target)
                await self.links.request(target, "repl", data, 10.0)
                log.debug("replicated %d ops to %s", n, target)
            except Exception as e:
                self.failures += 1
                log.warning("replication to %s failed (retrying): %s", target, e)
                await asyncio.sleep(_RETRY)
                continue
            self.batches += 1
            self.ops_sent += n
            return


# ----------------------------------------------------------------------- store core side


_SAFE = re.compile(r"[^A-Za-z0-9_.@-]")


class ReplicaStore:
    """The replicas this core keeps for other nodes' sessions, one SQLite file per origin."""

    def __init__(self, data_dir: str, fsync: bool) -> None:
        self.dir = Path(data_dir) / "replicas"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.fsync = fsync
        self._files: dict[str, tuple[SqliteStore, Persister]] = {}
        self._min_epoch: dict[str, int] = {}  # client id -> ops below are refused
        self.ops_applied = 0
        self.ops_refused = 0

    def _file(self, origin: str) -> tuple[SqliteStore, Persister]:
        f = self._files.get(origin)
        if f is None:
            store = SqliteStore(self.dir / f"{_SAFE.sub('_', origin)}.db", fsync=self.fsync)
            f = self._files[origin] = (store, Persister(store, "sync"))
        return f

    def origins(self) -> list[str]:
        return sorted(self._files)

    async def apply(self, origin: str, data: bytes) -> bytes:
        """A batch from a home node: applied and committed before the answer."""
        _store, persister = self._file(origin)
        for cid, epoch, op in decode_batch(data):
            # A message row is content, not session state: another session's delivery in
            # the batch may need it (the row goes once per batch, under the first session).
            if epoch < self._min_epoch.get(cid, 0) and op[0] != "msg":
                self.ops_refused += 1
                continue
            persister.op(op)
            self.ops_applied += 1
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def committed() -> None:
            if not done.done():
                done.set_result(None)

        persister.after(committed)
        await done
        if persister.failed:
            raise RuntimeError("replica store write failed")
        return b"ok"

    async def take(
        self, origin: str, want: Callable[[StoredSession], bool], epoch: int = 0
    ) -> list[StoredSession]:
        """Remove and return the sessions of ``origin`` that ``want`` selects; later writes
        of theirs from an epoch before ``epoch`` are refused."""
        store, persister = self._file(origin)
        await persister.drain()
        loop = asyncio.get_running_loop()
        state = await loop.run_in_executor(None, store.load)
        taken = [s for s in state.sessions if want(s)]
        for s in taken:
            if epoch:
                self._min_epoch[s.client_id] = epoch
            persister.op(SessionGone("sess_del", s.client_id))
        await persister.drain()
        return taken

    def load_known(self) -> None:
        """Open the files left from before a restart (their sessions may be adopted)."""
        for path in sorted(self.dir.glob("*.db")):
            self._file(path.stem)

    async def close(self) -> None:
        for _store, persister in self._files.values():
            await persister.drain()
            persister.close()

