"""Render records of the online service: they survive a restart of the Serve application, so
finished videos stay listed and unfinished renders resume from their section checkpoints.

Two stores, one SQL: SQLite (a file; the embedded default for one machine) and PostgreSQL (a
`postgresql://` URL; for more than one ingress replica). SQLite runs with a rollback journal,
not WAL: WAL needs memory shared between the processes that open the file, which NFS/EFS
(where the cluster keeps its storage) do not give. Each render is owned by one ingress replica
at a time: the owner holds a lease it renews; a replica takes over a render whose lease ran
out (its owner died), and every write a render's run makes is conditioned on still owning it.
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

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS renders (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    sections_total INTEGER,
    sections_done INTEGER NOT NULL DEFAULT 0,
    frames INTEGER,
    eta_s DOUBLE PRECISION,
    error TEXT,
    owner TEXT,
    lease_until DOUBLE PRECISION,
    client TEXT
)""",
    """CREATE TABLE IF NOT EXISTS events (
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (id, seq)
)""",
)
ADDED_COLUMNS = {"owner": "TEXT", "lease_until": "DOUBLE PRECISION", "client": "TEXT"}  # absent in older databases
SCHEMA_LOCK = 7_341_002  # PostgreSQL advisory lock: replicas starting together create the tables once


def is_database_url(location: str | Path) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def _open_sqlite(path: str) -> sqlite3.Connection:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=DELETE")
    for statement in SCHEMA:
        db.execute(statement)
    have = {r["name"] for r in db.execute("PRAGMA table_info(renders)")}
    for column, kind in ADDED_COLUMNS.items():
        if column not in have:
            db.execute(f"ALTER TABLE renders ADD COLUMN {column} {kind}")
    return db


def _open_postgres(url: str):
    import psycopg  # only deployments with a database_url need it
    from psycopg.rows import dict_row

    db = psycopg.connect(url, autocommit=True, row_factory=dict_row)
    db.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
    try:
        for statement in SCHEMA:
            db.execute(statement)
        for column, kind in ADDED_COLUMNS.items():
            db.execute(f"ALTER TABLE renders ADD COLUMN IF NOT EXISTS {column} {kind}")
    finally:
        db.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
    return db


class RenderRecords:
    """One row per render, plus its progress events (steps excluded: they are live only).
    `location`: a SQLite file, or a PostgreSQL URL (postgresql://user@host/db)."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self._postgres = is_database_url(location)
        self._db = _open_postgres(self.location) if self._postgres else _open_sqlite(self.location)
        self._lock = threading.Lock()

    def _execute(self, sql: str, params: tuple):
        if not self._postgres:
            return self._db.execute(sql, params)
        import psycopg

        sql = sql.replace("?", "%s")
        try:
            return self._db.execute(sql, params)
        except psycopg.OperationalError:
            if not self._db.closed:
                raise
            # the server restarted or failed over: every statement is autocommitted, so running
            # it again on a new connection is safe
            self._db = _open_postgres(self.location)
            return self._db.execute(sql, params)

    def _run(self, sql: str, *params) -> list:
        with self._lock:
            return self._execute(sql, params).fetchall()

    def _change(self, sql: str, *params) -> int:
        """Rows changed by one statement."""
        with self._lock:
            return self._execute(sql, params).rowcount

    def create(self, rid: str, request: dict, client: str | None = None) -> None:
        now = time.time()
        self._change("INSERT INTO renders (id, status, request, created, updated, client) VALUES (?, 'queued', ?, ?, ?, ?)",
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

    def renew(self, owners: list[str], lease_s: float) -> set[str]:
        """Extend the leases of `owners` (one write for a replica's renders); returns those still
        held: a render cancelled or taken over is no longer its owner's."""
        if not owners:
            return set()
        marks = ", ".join("?" * len(owners))
        self._change(f"UPDATE renders SET lease_until = ? WHERE owner IN ({marks}) AND status IN (?, ?)",
                     time.time() + lease_s, *owners, *UNFINISHED)
        return {r["owner"] for r in self._run(f"SELECT owner FROM renders WHERE owner IN ({marks}) AND status IN (?, ?)",
                                              *owners, *UNFINISHED)}

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
        return self._run(f"SELECT COUNT(*) AS n FROM renders WHERE status IN (?, ?){where}", *UNFINISHED, *extra)[0]["n"]

    def ended_before(self, when: float) -> list[str]:
        """Ids of renders that ended before `when`, oldest first."""
        return [r["id"] for r in self._run("SELECT id FROM renders WHERE status IN (?, ?, ?) AND updated < ? ORDER BY updated",
                                        *TERMINAL, when)]

    def delete(self, rid: str) -> None:
        self._change("DELETE FROM events WHERE id = ?", rid)
        self._change("DELETE FROM renders WHERE id = ?", rid)

    def add_event(self, rid: str, seq: int, event: dict) -> None:
        self._change("INSERT INTO events (id, seq, event) VALUES (?, ?, ?) ON CONFLICT (id, seq) DO UPDATE SET event = excluded.event",
                     rid, seq, json.dumps(event))

    def events(self, rid: str, after: int = -1) -> list[tuple[int, dict]]:
        return [(r["seq"], json.loads(r["event"]))
                for r in self._run("SELECT seq, event FROM events WHERE id = ? AND seq > ? ORDER BY seq", rid, after)]

    def last_seq(self, rid: str) -> int:
        """The highest event id stored for `rid` (-1: none): a resumed run numbers on from it."""
        value = self._run("SELECT MAX(seq) AS last FROM events WHERE id = ?", rid)[0]["last"]
        return -1 if value is None else value


def _row(row) -> dict:
    record = dict(row)
    record["request"] = json.loads(record["request"])
    return record
