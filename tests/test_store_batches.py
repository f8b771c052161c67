"""A batch of store operations gives the same store whichever way it is written: one statement
per operation, in runs (``SqliteStore.write``), or coalesced first (``store.ops.coalesce``:
what the batch itself undoes is left out). The replication and the local store rely on it."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

from roost.store.ops import coalesce
from roost.store.sqlite import SqliteStore

Batch = list[tuple[Any, ...]]


def _random_batch(rng: random.Random, next_mid: list[int]) -> Batch:
    """Operations on few keys, so that adds, sends, removals and session ends meet; every
    delivery comes with its message's row, as a replication batch carries it."""
    ops: Batch = []
    for _ in range(rng.randint(1, 30)):
        cid = rng.choice(("c1", "c2"))
        seq = rng.randint(1, 4)
        kind = rng.choices(("dlv", "dlv_pid", "dlv_del", "sess", "sess_del", "rel"),
                           (6, 4, 4, 1, 1, 1))[0]  # fmt: skip
        if kind == "dlv":
            mid = next_mid[0] = next_mid[0] + 1
            ops.append(("msg", mid, "t", b"p%d" % mid, 1, False, None, "pub", None, None))
            ops.append(("dlv", cid, seq, mid, 1, False, "[]"))
        elif kind == "dlv_pid":
            ops.append(("dlv_pid", cid, seq, rng.randint(1, 9), rng.randint(0, 1)))
        elif kind == "dlv_del":
            ops.append(("dlv_del", cid, seq))
        elif kind == "sess":
            ops.append(("sess", cid, 600, "[]", None, None))
        elif kind == "sess_del":
            ops.append(("sess_del", cid))
        else:
            ops.append(("rel_add", cid, seq))
    return ops


def _one_by_one(store: SqliteStore, ops: Batch) -> None:
    for op in ops:
        store.db.execute("BEGIN")
        store.apply(op)
        store.db.execute("COMMIT")


def _state(store: SqliteStore) -> dict[str, list[Any]]:
    """Everything a reader of the store sees: sessions, each delivery with its message, QoS 2
    state (a message row no delivery refers to is garbage nobody reads)."""
    db: sqlite3.Connection = store.db
    return {
        "sessions": db.execute("SELECT * FROM sessions ORDER BY client_id").fetchall(),
        "deliveries": db.execute(
            "SELECT d.client_id, d.seq, d.packet_id, d.state, m.payload FROM deliveries d"
            " LEFT JOIN messages m ON m.id = d.message_id ORDER BY d.client_id, d.seq"
        ).fetchall(),
        "rel": db.execute("SELECT * FROM awaiting_rel ORDER BY 1, 2").fetchall(),
    }


def test_runs_and_coalesced_batches_leave_the_store_as_one_statement_per_operation_does(
    tmp_path: Path,
) -> None:
    rng = random.Random(15)
    stores = {name: SqliteStore(tmp_path / f"{name}.db", fsync=False)
              for name in ("plain", "runs", "local", "replica")}  # fmt: skip
    mid = [0]
    for i in range(300):
        ops = _random_batch(rng, mid)
        _one_by_one(stores["plain"], ops)
        stores["runs"].write(ops)
        stores["local"].write(coalesce(ops))
        stores["replica"].write(coalesce(ops, messages=True))
        want = _state(stores["plain"])
        for name in ("runs", "local", "replica"):
            assert _state(stores[name]) == want, (i, name, ops)
    assert want["deliveries"], "the batches left deliveries to compare"
    for store in stores.values():
        store.close()


def test_a_delivery_acknowledged_in_its_own_batch_leaves_only_its_removal() -> None:
    msg = ("msg", 7, "t", b"p", 1, False, None, "pub", None, None)
    add, sent, done = ("dlv", "c1", 3, 7, 1, False, "[]"), ("dlv_pid", "c1", 3, 1, 0), (
        "dlv_del", "c1", 3)  # fmt: skip
    other = ("dlv", "c2", 1, 7, 1, False, "[]")
    assert coalesce([msg, add, sent, done]) == [msg, done]
    assert coalesce([msg, add, sent, done], messages=True) == [done]
    # Another session still needs the message; a delivery added earlier keeps its removal.
    assert coalesce([msg, add, other, done], messages=True) == [msg, other, done]
    assert coalesce([sent, done]) == [sent, done]
    # A message row no delivery of the batch refers to is none of the batch's business.
    alone = ("msg", 8, "t", b"q", 1, False, None, "pub", None, None)
    assert coalesce([alone, msg, add, done], messages=True) == [alone, done]
    # Replication batches hold (client id, epoch, op).
    items = [("c1", 5, op) for op in (msg, add, done)]
    assert coalesce(items, lambda item: item[2], messages=True) == [items[2]]
