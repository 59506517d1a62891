"""Render records of the online service in an embedded SQLite database: they survive a
restart of the Serve application, so finished videos stay listed and unfinished renders
can resume from their section checkpoints."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

UNFINISHED = ("queued", "running")
STATES = (*UNFINISHED, "finished", "failed", "cancelled")

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
    error TEXT
);
CREATE TABLE IF NOT EXISTS events (
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event TEXT NOT NULL,
    PRIMARY KEY (id, seq)
);
"""


class RenderRecords:
    """One row per render, plus its progress events (steps excluded: they are live only)."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def _run(self, sql: str, *params):
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def create(self, rid: str, request: dict) -> None:
        now = time.time()
        self._run("INSERT INTO renders (id, status, request, created, updated) VALUES (?, 'queued', ?, ?, ?)",
                  rid, json.dumps(request), now, now)

    def update(self, rid: str, **fields) -> None:
        if "status" in fields and fields["status"] not in STATES:
            raise ValueError(f"unknown render status {fields['status']!r}")
        columns = ", ".join(f"{k} = ?" for k in fields)
        self._run(f"UPDATE renders SET {columns}, updated = ? WHERE id = ?", *fields.values(), time.time(), rid)

    def get(self, rid: str) -> dict | None:
        rows = self._run("SELECT * FROM renders WHERE id = ?", rid)
        return _row(rows[0]) if rows else None

    def list(self, limit: int = 100) -> list[dict]:
        return [_row(r) for r in self._run("SELECT * FROM renders ORDER BY created DESC LIMIT ?", limit)]

    def unfinished(self) -> list[dict]:
        marks = ",".join("?" * len(UNFINISHED))
        return [_row(r) for r in self._run(f"SELECT * FROM renders WHERE status IN ({marks}) ORDER BY created", *UNFINISHED)]

    def add_event(self, rid: str, seq: int, event: dict) -> None:
        self._run("INSERT OR REPLACE INTO events (id, seq, event) VALUES (?, ?, ?)", rid, seq, json.dumps(event))

    def events(self, rid: str) -> list[tuple[int, dict]]:
        return [(r["seq"], json.loads(r["event"])) for r in self._run("SELECT seq, event FROM events WHERE id = ? ORDER BY seq", rid)]


def _row(row: sqlite3.Row) -> dict:
    record = dict(row)
    record["request"] = json.loads(record["request"])
    return record
