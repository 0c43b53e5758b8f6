"""The shared state in PostgreSQL ([store] url): the job store's own unit tests on it, claims raced by
two processes, the ledger and report store, a schema migration, and a server that goes away and
comes back (StoreUnavailable, then recovery with the same store object)."""

from __future__ import annotations

import importlib.util
import inspect
import multiprocessing as mp
import time
from pathlib import Path

import psycopg
import pytest

from dicom_node.database import StoreUnavailable
from dicom_node.jobstore import JobState, JobStore
from dicom_node.stores import open_database, open_jobs
from ris.ledger import Ledger
from ris.reportstore import ReportStore
from ris.second_read import Discrepancy, ReportLabels
from tests.conftest import free_port, pg_database

pytestmark = pytest.mark.integration

# The job store's unit tests (tests/unit/test_jobstore.py) that take the `store` fixture, run here on
# PostgreSQL: the same assertions, the other backend.
_spec = importlib.util.spec_from_file_location("jobstore_cases", Path(__file__).parents[1] / "unit" / "test_jobstore.py")
assert _spec is not None and _spec.loader is not None
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
for _name, _test in vars(_cases).items():
    if _name.startswith("test_") and "store" in inspect.signature(_test).parameters:
        globals()[_name + "_on_postgresql"] = _test
_add = _cases._add

# The same for the RIS ledger's one report per study (tests/unit/test_study_ledger.py, `make_store`):
# the claim and its "is another image on its way?" read, raced by two threads, on PostgreSQL.
_spec = importlib.util.spec_from_file_location("study_ledger_cases",
                                               Path(__file__).parents[1] / "unit" / "test_study_ledger.py")
assert _spec is not None and _spec.loader is not None
_ledger_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ledger_cases)
for _name, _test in vars(_ledger_cases).items():
    if _name.startswith("test_") and "make_store" in inspect.signature(_test).parameters:
        globals()[_name + "_on_postgresql"] = _test


@pytest.fixture
def clock():
    return _cases.FakeClock()


@pytest.fixture
def store(pg_url, clock):
    return open_jobs(pg_url, Path("/nonexistent/unused.sqlite"), clock=clock)


@pytest.fixture
def make_store(pg_url):
    """An empty job store in the test's database for each call (the previous call's rows truncated)."""
    def make(folder: Path, clock) -> JobStore:
        store = open_jobs(pg_url, folder / "unused.sqlite", clock=clock)
        with psycopg.connect(pg_url, autocommit=True) as c:
            tables = [r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE schemaname='public' "
                                              "AND tablename IN ('jobs', 'deliveries', 'study_reports')")]
            c.execute(f"TRUNCATE {', '.join(tables)}")
        return store

    return make


def test_the_unit_cases_were_found():
    names = [n for n in globals() if n.endswith("_on_postgresql")]
    assert len(names) >= 8 and "test_claim_compare_and_set_on_postgresql" in names
    assert "test_two_workers_finishing_a_study_at_once_claim_it_once_on_postgresql" in names


def test_schema_made_once_and_migrated(pg_url):
    """A table made before the keyed hashes gains them on open, in PostgreSQL as in SQLite."""
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("""CREATE TABLE jobs (id TEXT PRIMARY KEY, sop_instance_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL, study_instance_uid TEXT NOT NULL, calling_aet TEXT NOT NULL,
            path TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, attempts INTEGER NOT NULL DEFAULT 0,
            created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
            lease_until DOUBLE PRECISION NOT NULL DEFAULT 0)""")
        c.execute("INSERT INTO jobs VALUES ('old', '1.2', '1.2.840', '1.3', 'MOD', 'incoming/old.dcm', 'done', "
                  "NULL, 1, 5, 6, 0)")
    store = open_jobs(pg_url, Path("unused"))
    assert store.get("old").state == JobState.DONE and store.get("old").accession_hash is None
    _add(store, "new")
    open_jobs(pg_url, Path("unused"))  # again: nothing changes
    assert store.counts() == {"done": 1, "queued": 1}
    with psycopg.connect(pg_url) as c:
        kinds = dict(c.execute("SELECT column_name, data_type FROM information_schema.columns "
                               "WHERE table_name='jobs'").fetchall())
    assert kinds["accession_hash"] == "text" and kinds["updated_at"] == "double precision"


def test_timestamps_keep_their_precision(store):
    """Seconds since 1970 with microseconds survive the round trip (DOUBLE PRECISION, not REAL)."""
    store._clock = lambda: 1_764_000_000.123456
    job, _ = _add(store, "a")
    assert store.get("a").created_at == job.created_at == 1_764_000_000.123456


def _claimer(url: str, ids: list[str], start: float, out) -> None:  # in a spawned process
    store = JobStore(open_database(url, Path("unused")))
    while time.time() < start:
        time.sleep(0.001)
    won = [i for i in ids if store.claim(i, JobState.QUEUED, JobState.INFERRING, lease_s=600) is not None]
    out.put(won)


def test_two_processes_claiming_the_same_jobs_each_job_has_one_winner(store, pg_url):
    ids = [f"job{n:03d}" for n in range(60)]
    for n, i in enumerate(ids):
        _add(store, i, sop=f"1.2.{n}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    start = time.time() + 4  # both are connected by then; then they race for every row
    procs = [ctx.Process(target=_claimer, args=(pg_url, ids if k == 0 else ids[::-1], start, out)) for k in range(2)]
    for p in procs:
        p.start()
    won = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(won[0] + won[1]) == ids  # every job claimed, none twice
    assert won[0] and won[1], "the two claimers never overlapped: the race was not run"
    assert {(j.state, j.attempts) for i in ids if (j := store.get(i))} == {(JobState.INFERRING, 1)}


def test_lease_expiry_lets_a_second_claimer_on_another_store_take_it(pg_url):
    """Two nodes (two store objects, their own clocks) on one database: a claim whose lease ran
    out on the first is taken by the second; the first's late advance then fails."""
    now = [1000.0]
    a, b = (open_jobs(pg_url, Path("unused"), clock=lambda: now[0]) for _ in range(2))
    _add(a, "j")
    assert a.claim("j", JobState.QUEUED, JobState.INFERRING, lease_s=60) is not None
    assert b.claim("j", JobState.QUEUED, JobState.INFERRING, lease_s=60) is None
    now[0] += 61
    taken = b.claim("j", JobState.QUEUED, JobState.INFERRING, lease_s=60)
    assert taken is not None and taken.attempts == 2
    assert b.advance("j", JobState.INFERRING, JobState.INFERRED)
    assert not a.advance("j", JobState.INFERRING, JobState.INFERRED)


def test_waiting_skips_rows_a_claimer_holds(store, pg_url):
    for n in range(3):
        _add(store, f"w{n}", sop=f"7.{n}")
    with psycopg.connect(pg_url) as other:  # another worker, mid-claim of w0
        other.execute("SELECT 1 FROM jobs WHERE id='w0' FOR UPDATE")
        assert store.waiting(10) == ["w1", "w2"]
    assert store.waiting(10) == ["w0", "w1", "w2"]


def test_ledger_and_report_store_on_postgresql(pg_url):
    jobs = open_jobs(pg_url, Path("unused"))
    ledger = Ledger(jobs.db)
    assert not ledger.delivered("j", "pacs")
    ledger.record("j", "pacs", "ok")
    ledger.record("j", "pacs", "again")  # the first stays
    assert ledger.delivered("j", "pacs") and ledger.of("j") == {"pacs": "ok"}

    reports = ReportStore(open_database(pg_url, Path("unused")))
    labels = ReportLabels({"Effusion": 1}, {"Effusion": 1})
    r, new = reports.add(source="hl7", message_id="m1", study_instance_uid="1.2", accession_hash="h",
                         status="F", text="effusion", labels=labels)
    again, new2 = reports.add(source="hl7", message_id="m1", study_instance_uid="1.2", accession_hash="h",
                              status="F", text="effusion", labels=labels)
    assert new and not new2 and again.id == r.id
    found = [Discrepancy("Effusion", "missed_by_report", "high", 0.9, "absent")]
    rows = reports.record(r.id, "j", "1.2", found)
    assert rows is not None and [d.label for d in rows] == ["Effusion"]
    assert reports.record(r.id, "j", "1.2", found) is None  # compared once
    reports.mark_notified([rows[0].id], "sent")
    assert reports.discrepancies()[0].notified == "sent"
    assert reports.counts() == {"reports": 1, "waiting": 0, "comparisons": 1, "discrepancies": 1}


def test_server_down_raises_store_unavailable_then_the_same_store_recovers(pg_server):
    with pg_database(pg_server.admin) as url:
        store = open_jobs(url, Path("unused"), timeout_s=2)
        _add(store, "before")
        pg_server.stop()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as down:
            _add(store, "during", sop="2.2")
        assert time.monotonic() - t0 < 30 and "127.0.0.1" in str(down.value) and "password" not in str(down.value)
        with pytest.raises(StoreUnavailable):
            store.claim("before", JobState.QUEUED, JobState.INFERRING, lease_s=60)
        pg_server.start()
        deadline = time.monotonic() + 30
        while True:  # the pool reconnects by itself: no new store, no restart
            try:
                _add(store, "after", sop="3.3")
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the store did not recover after the server came back"
                time.sleep(0.5)
        assert store.get("during") is None
        assert store.counts() == {"queued": 2}
        assert store.claim("before", JobState.QUEUED, JobState.INFERRING, lease_s=60) is not None


def test_a_closed_port_is_unavailable_not_a_crash():
    with pytest.raises(StoreUnavailable):
        open_jobs(f"postgresql://postgres@127.0.0.1:{free_port()}/none", Path("unused"), timeout_s=1)


def test_audit_records_are_copied_to_the_shared_store(pg_url, tmp_path):
    from dicom_node.audit_copy import AuditCopy
    from worker.node import Node
    from worker.settings import Settings

    node = Node(Settings(paths={"spool": str(tmp_path / "spool")}, store={"url": pg_url},
                         node={"lookup_secret": "site-key"}))
    node.audit.record("received", job_id="a", calling_aet="MOD")
    node.audit.record("sent", job_id="a")
    copy = AuditCopy(node.jobs.db, host="other-host")
    copy({"time": 1.0, "event": "received", "job_id": "b"})
    assert [r["job_id"] for r in copy.read()] == ["a", "a", "b"]
    mine = copy.read(event="sent")
    assert len(mine) == 1 and mine[0]["host"] != "other-host" and mine[0] == {**next(
        r for r in node.audit.read() if r["event"] == "sent"), "host": mine[0]["host"]}
    assert not node.layout.jobs.exists()  # no SQLite job table beside it


def test_a_pause_made_on_one_host_holds_every_hosts_sender(pg_url, tmp_path):
    from dicom_node.pause import DestinationPaused
    from worker.node import Node
    from worker.settings import Settings

    a, b = (Node(Settings(paths={"spool": str(tmp_path / h)}, store={"url": pg_url}, node={"lookup_secret": "k"}))
            for h in ("a", "b"))
    assert a.pauses.get("PACS", "10.0.0.1", 104) is None
    a.pauses.pause("PACS", "10.0.0.1", 104, "alice", now=5.0)
    with pytest.raises(DestinationPaused, match="alice"):
        b.pauses.check("PACS", "10.0.0.1", 104)  # the other host's sender waits too
    b.pauses.pause("PACS", "10.0.0.1", 104, "bob", now=6.0)  # again: the newer record
    assert a.pauses.get("PACS", "10.0.0.1", 104) == {"destination": "PACS@10.0.0.1:104", "user": "bob", "since": 6.0}
    assert b.pauses.resume("PACS", "10.0.0.1", 104) and not a.pauses.resume("PACS", "10.0.0.1", 104)
    a.pauses.check("PACS", "10.0.0.1", 104)
    assert not (tmp_path / "a" / "paused").exists()  # nothing in either spool


def test_two_listeners_recording_the_same_instance_queue_it_once(pg_url):
    """The same SOP Instance UID received on two hosts at once: one job queued, the other skipped
    as its duplicate (the advisory lock on the UID stands in for SQLite's file lock)."""
    import threading

    stores = [open_jobs(pg_url, Path("unused")) for _ in range(2)]
    start = threading.Barrier(2)

    def receive(k: int) -> None:
        start.wait()
        for n in range(40):
            _add(stores[k], f"h{k}-{n:02d}", sop=f"5.5.{n}")

    threads = [threading.Thread(target=receive, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for n in range(40):
        states = sorted(j.state for k in range(2) if (j := stores[0].get(f"h{k}-{n:02d}")))
        assert states == [JobState.QUEUED, JobState.SKIPPED], n


def test_a_command_with_the_store_away_says_so_and_exits_3(tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "spool").mkdir()
    env = {**os.environ, "MEDSAM2_CXR_PATHS__SPOOL": str(tmp_path / "spool"),
           "MEDSAM2_CXR_STORE__URL": f"postgresql://medsam2:s3cret@127.0.0.1:{free_port()}/x",
           "MEDSAM2_CXR_STORE__TIMEOUT_S": "1", "MEDSAM2_CXR_NODE__LOOKUP_SECRET": "site-key", "PYTHONPATH": str(Path(__file__).parents[2])}
    out = subprocess.run([sys.executable, "-m", "worker.cli", "status"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "is unavailable" in out.stderr and "Traceback" not in out.stderr and "s3cret" not in out.stderr


def test_every_commit_is_durable_whatever_the_servers_default(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as c:  # a server (or database) tuned for speed
        c.execute(f"ALTER DATABASE {pg_url.rsplit('/', 1)[1]} SET synchronous_commit = off")
    store = open_jobs(pg_url, Path("unused"))
    with store.db.transaction() as tx:
        assert tx.execute("SHOW synchronous_commit").fetchone() == ("on",)


def test_audit_all_hosts_prints_the_shared_copy(pg_url, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from dicom_node.audit_copy import AuditCopy
    from worker.cli import app
    from worker.node import Node
    from worker.settings import Settings

    monkeypatch.setenv("MEDSAM2_CXR_PATHS__SPOOL", str(tmp_path / "spool"))
    monkeypatch.setenv("MEDSAM2_CXR_STORE__URL", pg_url)
    monkeypatch.setenv("MEDSAM2_CXR_NODE__LOOKUP_SECRET", "site-key")
    Node(Settings()).audit.record("received", job_id="here")
    AuditCopy(open_database(pg_url, Path("unused")), host="elsewhere")({"time": 9.0, "event": "sent", "job_id": "there"})
    here = CliRunner().invoke(app, ["audit"])
    everywhere = CliRunner().invoke(app, ["audit", "--all-hosts"])
    assert here.exit_code == everywhere.exit_code == 0, here.output + everywhere.output
    assert [json.loads(line)["job_id"] for line in here.output.splitlines()] == ["here"]
    rows = [json.loads(line) for line in everywhere.output.splitlines()]
    assert [(r["job_id"], r["host"] == "elsewhere") for r in rows] == [("here", False), ("there", True)]
    monkeypatch.delenv("MEDSAM2_CXR_STORE__URL")
    JobStore(tmp_path / "spool" / "jobs.sqlite")  # an embedded node's spool
    alone = CliRunner().invoke(app, ["audit", "--all-hosts"])
    assert alone.exit_code == 2 and "no [store] url" in alone.output


def test_opening_the_store_takes_no_lock_behind_an_open_transaction(pg_url):
    """A process that opens the store (every worker at start) runs no DDL when the schema is there:
    even CREATE ... IF NOT EXISTS would queue for the table's lock behind a transaction a killed,
    cut-off host left open, and every other host would then queue behind it."""
    open_jobs(pg_url, Path("unused"))
    with psycopg.connect(pg_url) as stuck:  # a transaction left open, holding a row lock on jobs
        stuck.execute("INSERT INTO jobs (id, sop_instance_uid, sop_class_uid, study_instance_uid, calling_aet, path, "
                      "state, created_at, updated_at) VALUES ('x', '1', '1', '1', 'A', 'p', 'queued', 0, 0)")
        t0 = time.monotonic()
        store = open_jobs(pg_url, Path("unused"))
        assert time.monotonic() - t0 < 5
        assert store.get("x") is None  # and reads go on meanwhile


def test_the_server_ends_a_session_left_idle_in_a_transaction(pg_url):
    jobs = open_jobs(pg_url, Path("unused"))
    with jobs.db.transaction() as tx:
        assert tx.execute("SHOW idle_in_transaction_session_timeout").fetchone()[0] == "1min"
        assert tx.execute("SHOW tcp_keepalives_idle").fetchone()[0] == "10"
