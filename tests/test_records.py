"""fp_ray/records.py on both stores: SQLite (a file, rollback journal) and a real PostgreSQL
server started here from Debian's package. Ownership: one owner at a time, takeover after the
lease, writes guarded by ownership; two service replicas on one PostgreSQL database."""

from __future__ import annotations

import time

import pytest

from fp_ray.records import RenderRecords


@pytest.fixture(params=["sqlite", "postgres"])
def location(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "renders.db")
    url = request.getfixturevalue("postgres_url")
    records = RenderRecords(url)  # a clean slate per test
    records._change("DELETE FROM events")
    records._change("DELETE FROM renders")
    return url


def test_records_events_and_ownership(location):
    a, b = RenderRecords(location), RenderRecords(location)  # two replicas, one store
    a.create("r1", {"prompt": "x"}, client="alice")
    assert b.get("r1")["status"] == "queued" and b.count_unfinished() == 1 and b.count_unfinished("alice") == 1
    assert a.claim("r1", "replica-a", lease_s=0.3)
    assert not b.claim("r1", "replica-b", lease_s=0.3)  # held
    assert a.update("r1", "replica-a", status="running") and a.renew(["replica-a", "gone"], lease_s=0.3) == {"replica-a"}
    deadline = time.monotonic() + 5
    while not b.orphans() and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting for the lease to run out, as a replica does
    assert [r["id"] for r in b.orphans()] == ["r1"] and b.claim("r1", "replica-b", lease_s=30)
    assert not a.update("r1", "replica-a", status="failed") and a.renew(["replica-a"], lease_s=30) == set()
    assert b.get("r1")["status"] == "running" and b.get("r1")["owner"] == "replica-b"
    for seq in (0, 1, 5):
        a.add_event("r1", seq, {"type": "plan" if seq == 0 else "section_finished", "n": seq})
    a.add_event("r1", 5, {"type": "finished"})  # written twice: the last one stays
    assert b.last_seq("r1") == 5 and [s for s, _ in b.events("r1", after=0)] == [1, 5]
    assert b.events("r1")[-1][1] == {"type": "finished"}
    assert b.update("r1", "replica-b", status="finished") and b.ended_before(time.time() + 1) == ["r1"]
    b.delete("r1")
    assert a.get("r1") is None and a.events("r1") == [] and a.last_seq("r1") == -1


def test_sqlite_uses_a_rollback_journal_not_wal(tmp_path):
    records = RenderRecords(tmp_path / "renders.db")
    assert records._run("PRAGMA journal_mode")[0][0] == "delete"


def test_postgres_records_reconnect_after_the_connection_dropped(postgres_url):
    records = RenderRecords(postgres_url)
    records.create("rc", {"prompt": "x"})
    before = records._db.info.backend_pid
    RenderRecords(postgres_url)._run("SELECT pg_terminate_backend(?)", before)
    assert records.get("rc")["status"] == "queued" and records._db.info.backend_pid != before  # on a new connection
    records.delete("rc")
