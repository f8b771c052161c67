"""The SQLite store keeps a message's cluster-wide identity, and opens a store written before
it did (the column is added; older rows and an older node's operations have none)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from roost.store.sqlite import SqliteStore


def _deliver(store: SqliteStore, mid: int, fwd: str | None, seq: int) -> None:
    store.write([
        ("sess", "c1", 600, "[]", None, None),
        ("msg", mid, "t", b"p", 1, False, None, "pub", None, fwd)
        if fwd != "old" else ("msg", mid, "t", b"p", 1, False, None, "pub", None),
        ("dlv", "c1", seq, mid, 1, False, "[]"),
    ])  # fmt: skip


def test_a_delivery_keeps_the_identity_of_its_message(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", fsync=False)
    _deliver(store, 1, "42 core1", 1)
    _deliver(store, 2, None, 2)
    _deliver(store, 3, "old", 3)  # an operation from a node without the field
    got = [d.fwd_id for d in store.load().sessions[0].deliveries]
    assert got == [("core1", 42), None, None]
    store.close()


def test_a_store_from_before_the_identity_column_opens_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE sessions (client_id TEXT PRIMARY KEY, expiry_interval INTEGER NOT NULL,
            subscriptions TEXT NOT NULL, will TEXT, disconnected_at REAL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY, topic TEXT NOT NULL,
            payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, props TEXT,
            sender TEXT NOT NULL, expires_at REAL);
        INSERT INTO sessions VALUES ('c1', 600, '[]', NULL, NULL);
        INSERT INTO messages VALUES (7, 't', x'70', 1, 0, NULL, 'pub', NULL);
    """)  # fmt: skip
    db.commit()
    db.close()
    store = SqliteStore(path, fsync=False)
    store.write([("dlv", "c1", 1, 7, 1, False, "[]")])
    [d] = store.load().sessions[0].deliveries
    assert (d.message_id, d.payload, d.fwd_id) == (7, b"p", None)
    _deliver(store, 8, "1 core0", 2)
    assert store.load().sessions[0].deliveries[1].fwd_id == ("core0", 1)
    store.close()


def test_typed_operations_keep_the_wire_form_and_apply_like_the_tuples(tmp_path: Path) -> None:
    """A record of store.ops is the same array on the node links as the tuple an older node
    sends, comes back off them as its record, and both apply alike."""
    from roost.cluster.replication import decode_batch, encode_batch
    from roost.store import ops

    records: list[ops.Op] = [
        ops.SessionRow("sess", "c1", 600, '[["t", 1, false, false, 0, null]]', None, None),
        ops.MessageRow("msg", 5, "t", b"\x00p", 1, False, None, "pub", None, "9 core1"),
        ops.DeliveryAdd("dlv", "c1", 1, 5, 1, False, "[]"),
        ops.DeliverySent("dlv_pid", "c1", 1, 17, 1),
        ops.RelAdd("rel_add", "c1", 3),
        ops.RetainedSet("ret_set", "r", b"x", 0, None, "pub", None),
    ]
    tuples = [tuple(r) for r in records]
    assert encode_batch([("c1", 2, r) for r in records]) == encode_batch(
        [("c1", 2, t) for t in tuples]  # the untyped wire form
    )
    back = decode_batch(encode_batch([("c1", 2, r) for r in records]))
    assert [op for _, _, op in back] == records
    assert [type(op) for _, _, op in back] == [type(r) for r in records]
    typed = SqliteStore(tmp_path / "a.db", fsync=False)
    plain = SqliteStore(tmp_path / "b.db", fsync=False)
    typed.write(records)
    plain.write(tuples)
    assert typed.load() == plain.load()
    [s] = typed.load().sessions
    assert (s.deliveries[0].packet_id, s.deliveries[0].state, s.awaiting_rel) == (17, 1, [3])
    # A newer node's extra trailing field is ignored; an unknown operation is refused.
    typed.write([("dlv_del", "c1", 1, "something newer")])
    assert typed.load().sessions[0].deliveries == []
    try:
        typed.write([("frobnicate", 1)])
    except ValueError as e:
        assert "frobnicate" in str(e)
    else:
        raise AssertionError("an unknown operation was applied")
    typed.close()
    plain.close()


def test_load_session_reads_one_session_whole(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "s.db", fsync=False)
    _deliver(store, 1, "4 core1", 1)
    _deliver(store, 2, None, 2)
    store.write([("sess", "other", 60, "[]", None, 5.0), ("dlv", "other", 1, 1, 1, False, "[]"),
                 ("rel_add", "c1", 9), ("rel_add", "other", 8)])  # fmt: skip
    one = store.load_session("c1")
    assert one is not None and one == next(s for s in store.load().sessions if s.client_id == "c1")
    assert [d.seq for d in one.deliveries] == [1, 2] and one.awaiting_rel == [9]
    other = store.load_session("other")
    assert other is not None and other.disconnected_at == 5.0 and other.awaiting_rel == [8]
    assert [d.message_id for d in other.deliveries] == [1]
    assert store.load_session("nobody") is None
    store.close()
