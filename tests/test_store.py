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
    _deliver(store, 1, '42 core1', 1)
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
    _deliver(store, 8, '1 core0', 2)
    assert store.load().sessions[0].deliveries[1].fwd_id == ("core0", 1)
    store.close()
