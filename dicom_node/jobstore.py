"""The durable job table: the source of truth for what was received and what is owed.

The broker may forget messages (Redis here keeps nothing across a restart); this table does not.
Every state change is a single durable transaction (SQLite in the spool with synchronous=FULL, or
PostgreSQL with synchronous_commit on: dicom_node.database, dicom_node.stores), so a row that
says "queued" survives a power cut, and claims are compare-and-set with a lease so that two
workers never process the same job at once and a killed worker's job is picked up again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dicom_node.database import Database, StoreUnavailable, Tx, as_database, transaction

__all__ = ["FINAL_FAILURES", "Job", "JobState", "JobStore", "StoreUnavailable", "transaction"]


class JobState(StrEnum):
    QUEUED = "queued"  # frontal CXR stored, waiting for inference
    SKIPPED = "skipped"  # stored but not processed (reason says why)
    INFERRING = "inferring"  # claimed by a GPU worker (lease)
    INFERRED = "inferred"  # prediction written, results owed to the destination
    SENDING = "sending"  # claimed by a sender (lease)
    DONE = "done"  # results stored at the destination
    DEAD = "dead"  # results in the dead-letter folder after the last attempt
    FAILED = "failed"  # a step raised an error that will not go away (reason: type and message); resend after a fix


# States nothing more happens to until `medsam2-cxr resend`: their SOP instance may come again.
FINAL_FAILURES = (JobState.DEAD, JobState.FAILED)

# How long a state change waits for a shared store that went away (JobStore._move); seconds.
MOVE_RETRY_S = 60.0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL,
    lease_until {real} NOT NULL DEFAULT 0,
    accession_hash TEXT,
    patient_hash TEXT
);
CREATE INDEX IF NOT EXISTS jobs_sop ON jobs (sop_instance_uid);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, updated_at);
"""
# Columns added after the first release, with their type: a table made before gains them on open.
_ADDED: dict[str, tuple[tuple[str, str], ...]] = {"jobs": (("accession_hash", "TEXT"), ("patient_hash", "TEXT"))}
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_accession ON jobs (accession_hash);
CREATE INDEX IF NOT EXISTS jobs_patient ON jobs (patient_hash);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_instance_uid);
"""
# attempts less one, never below 0 (two-argument MAX is SQLite's only)
_ONE_LESS = "CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END"
_COLUMNS = ("id, sop_instance_uid, sop_class_uid, study_instance_uid, calling_aet, path, state, reason, attempts, "
            "created_at, updated_at, lease_until, accession_hash, patient_hash")


@dataclass(frozen=True)
class Job:
    id: str
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    calling_aet: str
    path: str  # relative to the spool root
    state: JobState
    reason: str | None
    attempts: int
    created_at: float
    updated_at: float
    lease_until: float
    # HMAC-SHA256 (site secret) of Accession Number and Patient ID, never the values (dicom_node.lookup)
    accession_hash: str | None = None
    patient_hash: str | None = None


class JobStore:
    """The job table; safe to share between the listener thread and worker processes (and hosts, in PostgreSQL)."""

    def __init__(self, db: Database | Path, clock: Callable[[], float] = time.time) -> None:
        """``db``: the database (dicom_node.stores.open_database), or the path of a SQLite file."""
        self.db = as_database(db)
        self.path: Path | None = getattr(self.db, "path", None)  # the SQLite file; None in PostgreSQL
        self._clock = clock
        self.db.create(_SCHEMA, _ADDED, _INDEXES)

    def _tx(self) -> AbstractContextManager[Tx]:
        return self.db.transaction()

    @staticmethod
    def _row(row: tuple | None) -> Job | None:
        if row is None:
            return None
        job = Job(*row)
        return Job(**{**job.__dict__, "state": JobState(job.state)})

    def add(
        self,
        *,
        job_id: str,
        sop_instance_uid: str,
        sop_class_uid: str,
        study_instance_uid: str,
        calling_aet: str,
        path: str,
        state: JobState,
        reason: str | None = None,
        accession_hash: str | None = None,
        patient_hash: str | None = None,
    ) -> tuple[Job, Job | None]:
        """Record a received instance. Returns (the new job, the earlier live job for the same
        SOP Instance UID or None). A resent instance whose earlier job is live or finished is
        recorded as skipped, so the same image never yields a second result. The hashes are
        keyed hashes of the source's Accession Number and Patient ID (dicom_node.lookup)."""
        now = self._clock()
        with self._tx() as db:
            db.lock(f"sop:{sop_instance_uid}")  # two listeners with the same instance: one sees the other's row
            earlier = self._row(
                db.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE sop_instance_uid=? AND state NOT IN (?, ?, ?) "
                    "ORDER BY created_at LIMIT 1",
                    (sop_instance_uid, JobState.SKIPPED, *FINAL_FAILURES),
                ).fetchone()
            )
            if earlier is not None and state == JobState.QUEUED:
                state, reason = JobState.SKIPPED, f"duplicate of job {earlier.id}"
            db.execute(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,0,?,?,0,?,?)",
                (job_id, sop_instance_uid, sop_class_uid, study_instance_uid, calling_aet, path,
                 state, reason, now, now, accession_hash, patient_hash),
            )
            job = self._row(db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone())
        assert job is not None
        return job, earlier

    def get(self, job_id: str) -> Job | None:
        with self._tx() as db:
            return self._row(db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone())

    def claim(self, job_id: str, from_state: JobState, to_state: JobState, lease_s: float) -> Job | None:
        """Compare-and-set from_state -> to_state with a lease. A job already in to_state whose
        lease ran out (its worker died) can be claimed again. None: someone else has it, or it
        has moved on (a duplicate message: drop it)."""
        now = self._clock()
        with self._tx() as db:
            return self._row(db.execute(
                "UPDATE jobs SET state=?, lease_until=?, attempts=attempts+1, updated_at=? "
                f"WHERE id=? AND (state=? OR (state=? AND lease_until<?)) RETURNING {_COLUMNS}",
                (to_state, now + lease_s, now, job_id, from_state, to_state, now),
            ).fetchone())

    def advance(self, job_id: str, from_state: JobState, to_state: JobState, reason: str | None = None) -> bool:
        """Move a claimed job on; False if it was not in from_state (another worker won)."""
        return self._move(job_id, from_state, to_state, reason, "attempts")

    def reopen(self, job_id: str, from_state: JobState, to_state: JobState, reason: str | None = None) -> bool:
        """Like :meth:`advance`, and the job's attempts start again from 0 (a resend after a fix:
        the reconciler's give-up counts the attempts since)."""
        return self._move(job_id, from_state, to_state, reason, "0")

    def release(self, job_id: str, claimed_state: JobState, back_to: JobState, reason: str | None = None) -> bool:
        """Give a claimed job back (for a retry later) without counting it as done, nor as an
        attempt: attempts count the claims whose worker never came back (the reconciler gives up
        after max_attempts), and a worker that releases came back (a full spool, a paused
        destination, a broker away)."""
        return self._move(job_id, claimed_state, back_to, reason, _ONE_LESS)

    def _move(self, job_id: str, from_state: JobState, to_state: JobState, reason: str | None,
              attempts: str) -> bool:
        """One compare-and-set state change; `attempts` is the SQL expression of the new count.

        A worker that finished (or gave up) a job while a shared store was away keeps trying to say
        so for up to ``MOVE_RETRY_S``: else the job would wait out its whole lease (minutes for a
        send) before anyone took it again. A retry after a commit in doubt finds the row moved
        already and returns False, as for a job no longer ours; the reconciler covers both."""
        deadline = time.monotonic() + MOVE_RETRY_S
        while True:
            try:
                now = self._clock()
                with self._tx() as db:
                    cur = db.execute(
                        f"UPDATE jobs SET state=?, reason=COALESCE(?, reason), attempts={attempts}, lease_until=0, "
                        "updated_at=? WHERE id=? AND state=?",
                        (to_state, reason, now, job_id, from_state),
                    )
                    return cur.rowcount == 1
            except StoreUnavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(1.0)

    def release_claims(self) -> list[str]:
        """Give every claimed job back, uncounted (INFERRING -> QUEUED, SENDING -> INFERRED): for
        `up` once the workers it started are gone, since a claim of theirs would otherwise wait
        for its lease. Returns the ids given back."""
        now = self._clock()
        with self._tx() as db:
            ids: list[str] = []
            for claimed, back in ((JobState.INFERRING, JobState.QUEUED), (JobState.SENDING, JobState.INFERRED)):
                ids += [r[0] for r in db.execute(f"UPDATE jobs SET state=?, lease_until=0, updated_at=?, "
                                                 f"attempts={_ONE_LESS} WHERE state=? RETURNING id",
                                                 (back, now, claimed)).fetchall()]
        return ids

    def stale(self, older_than_s: float) -> list[Job]:
        """Jobs whose broker message may be lost: waiting longer than older_than_s, or claimed by
        a worker whose lease ran out."""
        now = self._clock()
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE (state IN (?, ?) AND updated_at < ?) "
                "OR (state IN (?, ?) AND lease_until < ?) ORDER BY created_at",
                (JobState.QUEUED, JobState.INFERRED, now - older_than_s,
                 JobState.INFERRING, JobState.SENDING, now),
            ).fetchall()
        return [j for j in map(self._row, rows) if j is not None]

    def touch(self, job_id: str) -> None:
        """Mark a job as just (re-)enqueued, so the reconciler waits before trying again."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET updated_at=? WHERE id=?", (self._clock(), job_id))

    def counts(self) -> dict[str, int]:
        with self._tx() as db:
            return dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

    def by_state(self, state: JobState) -> list[Job]:
        with self._tx() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state=? ORDER BY created_at", (state,)).fetchall()
        return [j for j in map(self._row, rows) if j is not None]

    def recent(self, states: tuple[JobState, ...], limit: int) -> list[Job]:
        """Up to ``limit`` jobs in ``states``, the most recently changed first."""
        marks = ",".join("?" * len(states))
        with self._tx() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY updated_at DESC LIMIT ?",
                              (*states, max(0, int(limit)))).fetchall()
        return [j for j in map(self._row, rows) if j is not None]

    def waiting(self, limit: int) -> list[str]:
        """Ids of up to `limit` jobs waiting for inference, oldest first: what a GPU worker may
        gather into one batch (it still claims each one, so a race costs nothing)."""
        with self._tx() as db:
            rows = db.execute("SELECT id FROM jobs WHERE state=? ORDER BY created_at LIMIT ?" + db.skip_locked,
                              (JobState.QUEUED, max(0, int(limit)))).fetchall()
        return [r[0] for r in rows]

    def search(self, *, states: tuple[JobState, ...] = (), calling_aet: str | None = None,
               since: float | None = None, until: float | None = None, accession_hash: str | None = None,
               patient_hash: str | None = None, limit: int = 100, offset: int = 0) -> list[Job]:
        """Jobs received in [since, until) matching every filter given, the newest first."""
        where: list[str] = []
        args: list[object] = []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += list(states)
        for column, value in (("calling_aet", calling_aet), ("accession_hash", accession_hash),
                              ("patient_hash", patient_hash)):
            if value is not None:
                where.append(f"{column}=?")
                args.append(value)
        if since is not None:
            where.append("created_at>=?")
            args.append(float(since))
        if until is not None:
            where.append("created_at<?")
            args.append(float(until))
        sql = f"SELECT {_COLUMNS} FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY created_at DESC LIMIT ? OFFSET ?"
        with self._tx() as db:
            rows = db.execute(sql, (*args, max(0, int(limit)), max(0, int(offset)))).fetchall()
        return [j for j in map(self._row, rows) if j is not None]

    def for_study(self, study_instance_uid: str, accession_hash: str | None) -> list[Job]:
        """Jobs of a study, by its UID or the keyed hash of its accession number, skipped ones left
        out (a first reader's report matches the images that were inferred), the oldest first."""
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state!=? AND ((study_instance_uid=? AND study_instance_uid!='') "
                "OR (accession_hash=? AND accession_hash IS NOT NULL)) ORDER BY created_at",
                (JobState.SKIPPED, study_instance_uid, accession_hash)).fetchall()
        return [j for j in map(self._row, rows) if j is not None]

    def callers(self) -> list[tuple[str, int, float]]:
        """(calling AE title, jobs, last received) for every AE that ever sent, the latest first."""
        with self._tx() as db:
            return [tuple(r) for r in db.execute(
                "SELECT calling_aet, COUNT(*), MAX(created_at) FROM jobs GROUP BY calling_aet "
                "ORDER BY MAX(created_at) DESC").fetchall()]

    def finished_since(self, since: float) -> list[tuple[str, float, float]]:
        """(state, received, last change) of the jobs received since ``since``: throughput and latency."""
        with self._tx() as db:
            return [tuple(r) for r in db.execute(
                "SELECT state, created_at, updated_at FROM jobs WHERE created_at>=? ORDER BY created_at",
                (float(since),)).fetchall()]

    def oldest_created_at(self, state: JobState | str) -> float | None:
        """When the oldest job now in ``state`` was received (None: no job is in it)."""
        with self._tx() as db:
            row = db.execute("SELECT MIN(created_at) FROM jobs WHERE state=?", (str(state),)).fetchone()
        return row[0] if row else None
