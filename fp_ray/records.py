"""Render records of the online service: they survive a restart of the Serve application, so
finished videos stay listed and unfinished renders resume from their section checkpoints.

The embedded store is SQLite with a rollback journal, not WAL: WAL needs shared memory between
the processes that open the file, which NFS/EFS (where the cluster keeps its storage) do not
give. Each render is owned by one ingress replica at a time: the owner holds a lease it
renews; a replica takes over a render whose lease ran out (its owner died), and every write a
render's run makes is conditioned on still owning it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

UNFINISHED = ("queued", "running")
TERMINAL = ("finished", "failed", "cancelled")
STATES = (*UNFINISHED, *TERMINAL)

SCHEMA = """
CREATE TABLE IF NOT EXISTS renders (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    sections_total INTEGER,
    sections_done INTEGER NOT NULL DEFAULT 0,
    frames INTEGER,
    eta_s REAL,
    error TEXT,
    owner TEXT,
    lease_until REAL,
    client TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (id, seq)
);
"""
ADDED_COLUMNS = {"owner": "TEXT", "lease_until": "REAL", "client": "TEXT"}  # absent in older databases


class RenderRecords:
    """One row per render, plus its progress events (steps excluded: they are live only)."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=DELETE")
        self._db.executescript(SCHEMA)
        have = {r["name"] for r in self._db.execute("PRAGMA table_info(renders)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE renders ADD COLUMN {column} {kind}")
        self._lock = threading.Lock()

    def _run(self, sql: str, *params) -> list:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _change(self, sql: str, *params) -> int:
        """Rows changed by one statement."""
        with self._lock:
            return self._db.execute(sql, params).rowcount

    def create(self, rid: str, request: dict, client: str | None = None) -> None:
        now = time.time()
        self._run("INSERT INTO renders (id, status, request, created, updated, client) VALUES (?, 'queued', ?, ?, ?, ?)",
                  rid, json.dumps(request), now, now, client)

    def update(self, rid: str, held_by: str | None = None, **fields) -> bool:
        """Set `fields`; with `held_by`, only while that owner holds the render. True if written."""
        if "status" in fields and fields["status"] not in STATES:
            raise ValueError(f"unknown render status {fields['status']!r}")
        columns = ", ".join(f"{k} = ?" for k in fields)
        guard, extra = (" AND owner = ?", (held_by,)) if held_by is not None else ("", ())
        return self._change(f"UPDATE renders SET {columns}, updated = ? WHERE id = ?{guard}",
                            *fields.values(), time.time(), rid, *extra) == 1

    def claim(self, rid: str, owner: str, lease_s: float) -> bool:
        """Take `rid` if it is unfinished and nobody holds a live lease on it."""
        now = time.time()
        return self._change(
            "UPDATE renders SET owner = ?, lease_until = ? WHERE id = ? AND status IN (?, ?)"
            " AND (owner IS NULL OR lease_until IS NULL OR lease_until < ?)",
            owner, now + lease_s, rid, *UNFINISHED, now) == 1

    def renew(self, rid: str, owner: str, lease_s: float) -> bool:
        """Extend `owner`'s lease; False once the render is no longer its own (cancelled, taken over)."""
        return self._change("UPDATE renders SET lease_until = ? WHERE id = ? AND owner = ? AND status IN (?, ?)",
                            time.time() + lease_s, rid, owner, *UNFINISHED) == 1

    def get(self, rid: str) -> dict | None:
        rows = self._run("SELECT * FROM renders WHERE id = ?", rid)
        return _row(rows[0]) if rows else None

    def list(self, limit: int = 100) -> list[dict]:
        return [_row(r) for r in self._run("SELECT * FROM renders ORDER BY created DESC LIMIT ?", limit)]

    def orphans(self) -> list[dict]:
        """Unfinished renders nobody holds: never claimed, or their owner's lease ran out."""
        return [_row(r) for r in self._run(
            "SELECT * FROM renders WHERE status IN (?, ?) AND (owner IS NULL OR lease_until IS NULL OR lease_until < ?)"
            " ORDER BY created", *UNFINISHED, time.time())]

    def count_unfinished(self, client: str | None = None) -> int:
        where, extra = (" AND client = ?", (client,)) if client is not None else ("", ())
        return self._run(f"SELECT COUNT(*) FROM renders WHERE status IN (?, ?){where}", *UNFINISHED, *extra)[0][0]

    def ended_before(self, when: float) -> list[str]:
        """Ids of renders that ended before `when`, oldest first."""
        return [r[0] for r in self._run("SELECT id FROM renders WHERE status IN (?, ?, ?) AND updated < ? ORDER BY updated",
                                        *TERMINAL, when)]

    def delete(self, rid: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM events WHERE id = ?", (rid,))
            self._db.execute("DELETE FROM renders WHERE id = ?", (rid,))

    def add_event(self, rid: str, seq: int, event: dict) -> None:
        self._run("INSERT OR REPLACE INTO events (id, seq, event) VALUES (?, ?, ?)", rid, seq, json.dumps(event))

    def events(self, rid: str, after: int = -1) -> list[tuple[int, dict]]:
        return [(r["seq"], json.loads(r["event"]))
                for r in self._run("SELECT seq, event FROM events WHERE id = ? AND seq > ? ORDER BY seq", rid, after)]

    def last_seq(self, rid: str) -> int:
        """The highest event id stored for `rid` (-1: none): a resumed run numbers on from it."""
        value = self._run("SELECT MAX(seq) FROM events WHERE id = ?", rid)[0][0]
        return -1 if value is None else value


def _row(row: sqlite3.Row) -> dict:
    record = dict(row)
    record["request"] = json.loads(record["request"])
    return record
