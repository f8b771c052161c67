"""Embedded SQLite store: persistent sessions, their undelivered messages, retained messages.

The broker describes every change as a small typed record (``store.ops``); the persister
hands a batch of them to ``write``, which applies the whole batch in one transaction. Times are
wall-clock seconds so that expiry survives a restart.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from roost.datadir import ensure_data_dir, private_file
from roost.store.ops import (
    Collect,
    DeliveryAdd,
    DeliveryDone,
    DeliverySent,
    MessageRow,
    Op,
    RelAdd,
    RelDone,
    RetainedGone,
    RetainedSet,
    SessionGone,
    SessionRow,
    from_wire,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    client_id TEXT PRIMARY KEY,
    expiry_interval INTEGER NOT NULL,
    subscriptions TEXT NOT NULL,          -- JSON list of [filter, qos, no_local, rap, rh, sub_id]
    will TEXT,                            -- JSON [topic, payload hex, qos, retain, props, delay]
    disconnected_at REAL                  -- NULL while connected
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    props TEXT,
    sender TEXT NOT NULL,
    expires_at REAL,
    fwd TEXT                              -- "<id> <origin node>": its cluster-wide identity
);
CREATE TABLE IF NOT EXISTS deliveries (
    client_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message_id INTEGER NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    sub_ids TEXT NOT NULL,
    packet_id INTEGER,                    -- set once sent
    state INTEGER NOT NULL DEFAULT 0,     -- 1: PUBREL sent, waiting for PUBCOMP
    PRIMARY KEY (client_id, seq)
);
-- A message goes with its last delivery (acknowledged, expired, or its session gone): without
-- this the table would grow with every message a persistent session ever held.
CREATE INDEX IF NOT EXISTS deliveries_by_message ON deliveries (message_id);
CREATE TRIGGER IF NOT EXISTS message_freed AFTER DELETE ON deliveries
WHEN NOT EXISTS (SELECT 1 FROM deliveries WHERE message_id = OLD.message_id)
BEGIN
    DELETE FROM messages WHERE id = OLD.message_id;
END;
CREATE TABLE IF NOT EXISTS awaiting_rel (
    client_id TEXT NOT NULL,
    packet_id INTEGER NOT NULL,
    PRIMARY KEY (client_id, packet_id)
);
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    props TEXT,
    sender TEXT NOT NULL,
    expires_at REAL
);
"""


@dataclass
class StoredDelivery:
    seq: int
    topic: str
    payload: bytes
    msg_qos: int
    props: dict[str, Any] | None
    sender: str
    expires_at: float | None
    qos: int
    retain: bool
    sub_ids: tuple[int, ...]
    packet_id: int | None
    state: int
    message_id: int
    fwd_id: tuple[str, int] | None = None


@dataclass
class StoredSession:
    client_id: str
    expiry_interval: int
    subscriptions: list[list[Any]]
    will: list[Any] | None
    disconnected_at: float | None
    deliveries: list[StoredDelivery] = field(default_factory=list)
    awaiting_rel: list[int] = field(default_factory=list)
    # A windowed load: unsent deliveries loaded, the seq of the last of them, and what was
    # left in the store past the window.
    queued: int = 0
    spill_after: int = 0
    spilled: int = 0
    spilled_bytes: int = 0
    max_seq: int = 0


@dataclass
class StoredRetained:
    topic: str
    payload: bytes
    qos: int
    props: dict[str, Any] | None
    sender: str
    expires_at: float | None


@dataclass
class StoredState:
    sessions: list[StoredSession]
    retained: list[StoredRetained]
    max_message_id: int


def dump_fwd(fwd_id: tuple[str, int] | None) -> str | None:
    """"<id> <origin node>": written for every stored message, so no JSON call."""
    return None if fwd_id is None else f"{fwd_id[1]} {fwd_id[0]}"


def _load_fwd(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    mid, _, origin = text.partition(" ")
    return origin, int(mid)


_DELIVERY_SELECT = (
    "SELECT d.client_id, d.seq, m.topic, m.payload, m.qos, m.props, m.sender,"
    " m.expires_at, d.qos, d.retain, d.sub_ids, d.packet_id, d.state, m.id, m.fwd"
    " FROM deliveries d JOIN messages m ON m.id = d.message_id"
)


def _delivery(r: tuple[Any, ...]) -> StoredDelivery:
    return StoredDelivery(r[1], r[2], bytes(r[3]), r[4], load_props(r[5]), r[6], r[7], r[8],
                          bool(r[9]), tuple(json.loads(r[10])), r[11], r[12], r[13],
                          _load_fwd(r[14]))  # fmt: skip


def load_props(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    props = json.loads(text)
    if "user_property" in props:
        props["user_property"] = [tuple(p) for p in props["user_property"]]
    if "correlation_data" in props:
        props["correlation_data"] = bytes.fromhex(props["correlation_data"])
    return props


def dump_props(props: dict[str, Any] | None) -> str | None:
    if not props:
        return None
    out = dict(props)
    if "correlation_data" in out:
        out["correlation_data"] = out["correlation_data"].hex()
    return json.dumps(out)


#: The kinds of operation written in runs (``SqliteStore.write``), in the order a run applies
#: them: a message's row first, then its deliveries added, sent, done.
_RUN_SQL = {
    "msg": "INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "dlv": "INSERT OR REPLACE INTO deliveries (client_id, seq, message_id, qos, retain, sub_ids)"
           " VALUES (?, ?, ?, ?, ?, ?)",
    "dlv_pid": "UPDATE deliveries SET packet_id = ?, state = ? WHERE client_id = ? AND seq = ?",
    "dlv_del": "DELETE FROM deliveries WHERE client_id = ? AND seq = ?",
}  # fmt: skip
_RUN_RANK = {tag: rank for rank, tag in enumerate(_RUN_SQL)}


def _run_params(op: Op) -> tuple[Any, ...]:
    if op[0] == "dlv_pid":
        return (op[3], op[4], op[1], op[2])
    return op[1:]


class SqliteStore:
    def __init__(self, path: str | Path, fsync: bool = True) -> None:
        path = Path(path)
        ensure_data_dir(path.parent)
        private_file(path)  # SQLite gives its -wal and -shm files the database's mode
        # One connection, used by one writer thread at a time (the persister serializes).
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self.db.executescript(SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(messages)")}
        if "fwd" not in columns:  # a store written before messages kept their identity
            self.db.execute("ALTER TABLE messages ADD COLUMN fwd TEXT")

    def load(self, window: int = 0) -> StoredState:
        """Everything stored, each session with at most ``window`` unsent deliveries (0: all)."""
        db = self.db
        # Messages no delivery refers to: left by a store from before the trigger.
        db.execute("DELETE FROM messages WHERE id NOT IN (SELECT message_id FROM deliveries)")
        sessions = self._sessions("", (), window)
        retained = [
            StoredRetained(t, bytes(p), q, load_props(pr), snd, exp)
            for t, p, q, pr, snd, exp in db.execute(
                "SELECT topic, payload, qos, props, sender, expires_at FROM retained"
            )
        ]
        max_id = db.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()[0]
        return StoredState(sessions, retained, max_id)

    def load_session(self, client_id: str) -> StoredSession | None:
        """One session with its deliveries and QoS 2 receive state, or None."""
        found = self._sessions("client_id = ?", (client_id,))
        return found[0] if found else None

    def load_spilled(self, client_id: str, after_seq: int, limit: int) -> list[StoredDelivery]:
        """A session's unsent deliveries past ``after_seq``, oldest first, at most ``limit``
        (0: all): the part of a disk-backed queue not held in memory."""
        rows = self.db.execute(
            f"{_DELIVERY_SELECT} WHERE d.client_id = ? AND d.seq > ? AND d.packet_id IS NULL"
            " ORDER BY d.seq LIMIT ?",
            (client_id, after_seq, limit or -1),
        )
        return [_delivery(r) for r in rows]

    def _sessions(
        self, where: str, args: tuple[Any, ...], window: int = 0
    ) -> list[StoredSession]:
        """The sessions whose rows match ``where`` (every one when empty), whole, or with at
        most ``window`` unsent deliveries each (the rest counted as spilled)."""
        db = self.db
        cond = f" WHERE {where}" if where else ""
        dcond = f" WHERE d.{where}" if where else ""
        sessions: dict[str, StoredSession] = {}
        for cid, expiry, subs, will, disc in db.execute(
            "SELECT client_id, expiry_interval, subscriptions, will, disconnected_at"
            f" FROM sessions{cond}", args
        ):  # fmt: skip
            sessions[cid] = StoredSession(
                cid, expiry, json.loads(subs), json.loads(will) if will else None, disc
            )
        rows = db.execute(f"{_DELIVERY_SELECT}{dcond} ORDER BY d.client_id, d.seq", args)
        for r in rows:
            s = sessions.get(r[0])
            if s is None:
                continue
            s.max_seq = r[1]
            if r[11] is None and window and s.queued >= window:
                # Past the window: left in the store, read back as the queue drains.
                s.spilled += 1
                s.spilled_bytes += len(r[2]) + len(r[3])
                continue
            if r[11] is None:
                s.queued += 1
                s.spill_after = r[1]
            s.deliveries.append(_delivery(r))
        for cid, pid in db.execute(f"SELECT client_id, packet_id FROM awaiting_rel{cond}", args):
            if cid in sessions:
                sessions[cid].awaiting_rel.append(pid)
        return list(sessions.values())

    def write(self, ops: list[Op] | list[tuple[Any, ...]]) -> None:
        """Apply a batch of operations in one transaction.

        The operations of a message's life (its row, deliveries added, sent, done) go in
        runs, one ``executemany`` per kind, in the order _RUN_SQL lists them: a statement per
        operation from Python cost most of the writer thread. A run ends where that order
        would change the result (a delivery's add or send after its send or removal in the
        same run) and at any other operation, which is applied on its own, in place.
        """
        db = self.db
        db.execute("BEGIN")
        try:
            run: dict[str, list[tuple[Any, ...]]] = {tag: [] for tag in _RUN_SQL}
            later: dict[tuple[Any, ...], int] = {}  # delivery key -> its latest kind in the run
            for op in ops:
                op = from_wire(op)
                rank = _RUN_RANK.get(op[0])
                if rank is None:
                    self._flush_run(run)
                    later.clear()
                    self.apply(op)
                    continue
                if rank:  # a delivery's
                    key = op[1:3]
                    if later.get(key, 0) > rank:
                        self._flush_run(run)
                        later.clear()
                    later[key] = rank
                run[op[0]].append(_run_params(op))
            self._flush_run(run)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _flush_run(self, run: dict[str, list[tuple[Any, ...]]]) -> None:
        for tag, params in run.items():
            if params:
                self.db.executemany(_RUN_SQL[tag], params)
                params.clear()

    def apply(self, op: Op | tuple[Any, ...] | list[Any]) -> None:
        """Apply one operation: a record of ``store.ops``, or the same as a plain tuple or
        list (off the node links, or from a node of an older version)."""
        x = self.db.execute
        match from_wire(op):
            case DeliveryAdd(_, cid, seq, mid, qos, retain, sub_ids):
                x("INSERT OR REPLACE INTO deliveries"
                  " (client_id, seq, message_id, qos, retain, sub_ids) VALUES (?, ?, ?, ?, ?, ?)",
                  (cid, seq, mid, qos, retain, sub_ids))  # fmt: skip
            case MessageRow() as m:
                x("INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", m[1:])
            case DeliverySent(_, cid, seq, pid, state):
                x("UPDATE deliveries SET packet_id = ?, state = ? WHERE client_id = ? AND seq = ?",
                  (pid, state, cid, seq))  # fmt: skip
            case DeliveryDone(_, cid, seq):
                x("DELETE FROM deliveries WHERE client_id = ? AND seq = ?", (cid, seq))
            case SessionRow() as row:
                x("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?, ?)", row[1:])
            case SessionGone(_, cid):
                x("DELETE FROM sessions WHERE client_id = ?", (cid,))
                x("DELETE FROM deliveries WHERE client_id = ?", (cid,))
                x("DELETE FROM awaiting_rel WHERE client_id = ?", (cid,))
            case RelAdd(_, cid, pid):
                x("INSERT OR IGNORE INTO awaiting_rel VALUES (?, ?)", (cid, pid))
            case RelDone(_, cid, pid):
                x("DELETE FROM awaiting_rel WHERE client_id = ? AND packet_id = ?", (cid, pid))
            case RetainedSet() as r:
                x("INSERT OR REPLACE INTO retained VALUES (?, ?, ?, ?, ?, ?)", r[1:])
            case RetainedGone(_, topic):
                x("DELETE FROM retained WHERE topic = ?", (topic,))
            case Collect():
                x("DELETE FROM messages WHERE id NOT IN (SELECT message_id FROM deliveries)")

    def close(self) -> None:
        self.db.close()
