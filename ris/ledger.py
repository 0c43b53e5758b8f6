"""Which targets already have a job's results or a study's report, in the job store's own database
(its SQLite file, or PostgreSQL with [store] url).

The PACS gets each job's DICOM results: one ``deliveries`` row per (job, target), written right
after the PACS acknowledged, so a job dead-lettered by a later target and resent sends the PACS
no second copy.

The RIS and the FHIR server get one report per study: one ``study_reports`` row per (study,
target) that moves owed -> sending (a claim with a lease, compare-and-set as the job store
claims jobs) -> sent, or -> failed (the target refused it: the claiming job is dead-lettered and
its resend claims again). The claim and the question "is another image of this study still on
its way?" are one transaction on the database that also holds the ``jobs`` table, so two io workers
finishing the two images of a study at the same moment cannot both send, nor both leave it to
the other.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dicom_node.database import Database, Tx, as_database
from dicom_node.jobstore import JobState

DICOM_PREFIX = "dicom:"  # the target key of a PACS (ris.delivery.dicom_key): a job's own part of a study

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT,
    delivered_at {real} NOT NULL,
    PRIMARY KEY (job_id, target)
);
CREATE TABLE IF NOT EXISTS study_reports (
    study TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    job_id TEXT NOT NULL,
    lease_until {real} NOT NULL DEFAULT 0,
    jobs TEXT NOT NULL DEFAULT '[]',
    detail TEXT,
    updated_at {real} NOT NULL,
    PRIMARY KEY (study, target)
);
"""
# A job of the study in one of these states, its PACS delivery not yet recorded, will still come
# to the report step: the study's report waits for it.
ON_ITS_WAY = (JobState.QUEUED, JobState.INFERRING, JobState.INFERRED, JobState.SENDING)


class Report(StrEnum):
    OWED = "owed"  # a job of the study waited for another one (ris.delivery: report_deferred)
    SENDING = "sending"  # claimed by job_id until lease_until
    SENT = "sent"  # the target acknowledged; jobs: the jobs whose images the report described
    FAILED = "failed"  # the target refused it; job_id is dead-lettered, its resend claims again


@dataclass(frozen=True)
class Claim:
    """What :meth:`Ledger.claim_study` found: ``state`` SENDING with ``job_id`` the caller's own id
    means the caller sends; SENT: the report went (``jobs``: whose images it described); SENDING
    with another job id: that job is sending it; OWED with ``waiting_for``: the study has images on
    their way, the last of them sends."""

    state: Report
    job_id: str = ""
    jobs: tuple[str, ...] = ()
    waiting_for: tuple[str, ...] = ()
    detail: str = ""

    def ours(self, job_id: str) -> bool:
        return self.state == Report.SENDING and self.job_id == job_id


class Ledger:
    """Delivered (job, target) and reported (study, target) pairs; safe across threads, processes and
    hosts like the job store, whose database it shares (the study claim reads its ``jobs`` table)."""

    def __init__(self, db: Database | Path, clock: Callable[[], float] = time.time) -> None:
        """``db``: the job store's database (JobStore.db), or the path of its SQLite file."""
        self.db = as_database(db)
        self.path: Path | None = getattr(self.db, "path", None)
        self._clock = clock
        self.db.create(_SCHEMA)

    def _tx(self) -> AbstractContextManager[Tx]:
        return self.db.transaction()

    # ---------------------------------------------------------------- per job (the PACS)

    def delivered(self, job_id: str, target: str) -> bool:
        with self._tx() as db:
            return db.execute("SELECT 1 FROM deliveries WHERE job_id=? AND target=?", (job_id, target)).fetchone() is not None

    def record(self, job_id: str, target: str, detail: str = "") -> None:
        with self._tx() as db:
            db.execute("INSERT INTO deliveries (job_id, target, detail, delivered_at) VALUES (?,?,?,?) "
                       "ON CONFLICT DO NOTHING",
                       (job_id, target, detail, self._clock()))

    def of(self, job_id: str) -> dict[str, str]:
        """target -> detail of every target that has the job's results."""
        with self._tx() as db:
            return dict(db.execute("SELECT target, detail FROM deliveries WHERE job_id=? ORDER BY delivered_at",
                                   (job_id,)).fetchall())

    # ---------------------------------------------------------------- per study (the RIS, the FHIR server)

    @staticmethod
    def _on_its_way(db: Tx, study_uid: str, job_id: str) -> tuple[str, ...]:
        if not study_uid:  # a study without a UID is its job alone
            return ()
        marks = ",".join("?" * len(ON_ITS_WAY))
        rows = db.execute(
            f"SELECT id FROM jobs WHERE study_instance_uid=? AND id!=? AND state IN ({marks}) "
            "AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id=jobs.id AND substr(d.target, 1, ?)=?) "
            "ORDER BY created_at", (study_uid, job_id, *ON_ITS_WAY, len(DICOM_PREFIX), DICOM_PREFIX)).fetchall()
        return tuple(r[0] for r in rows)

    def claim_study(self, key: str, study_uid: str, target: str, job_id: str, lease_s: float) -> Claim:
        """Claim the (study, target) report for ``job_id``, unless it went already, another job holds
        a live claim, or another job of the study (``study_uid``) is still on its way (then the row
        says owed, by ``job_id``). ``key`` names the report (the Study Instance UID, or the job for a
        study without one). A claim whose lease ran out (its worker died) can be taken again; so
        can a failed one (a resend)."""
        now = self._clock()
        with self._tx() as db:
            # One claimer of a study at a time (SQLite: the file's write lock; PostgreSQL: an advisory
            # lock): a second finisher waits here and then sees the first one's PACS delivery.
            db.lock(f"study-report:{key}")
            row = db.execute("SELECT state, job_id, lease_until, jobs, detail FROM study_reports "
                             "WHERE study=? AND target=?", (key, target)).fetchone()
            if row is not None and row[0] == Report.SENT:
                return Claim(Report.SENT, row[1], tuple(json.loads(row[3])), detail=row[4] or "")
            if study_uid:  # delivered by a release that kept one report per job: that was the study's
                legacy = db.execute("SELECT d.job_id, d.detail FROM deliveries d JOIN jobs j ON j.id=d.job_id "
                                    "WHERE j.study_instance_uid=? AND d.target=? LIMIT 1",
                                    (study_uid, target)).fetchone()
                if legacy is not None:
                    return Claim(Report.SENT, legacy[0], (legacy[0],), detail=legacy[1] or "")
            if row is not None and row[0] == Report.SENDING and row[1] != job_id and row[2] >= now:
                return Claim(Report.SENDING, row[1])
            waiting = self._on_its_way(db, study_uid, job_id)
            if waiting:
                if row is None or row[0] == Report.OWED:
                    db.execute("INSERT INTO study_reports (study, target, state, job_id, updated_at) VALUES (?,?,?,?,?) "
                               "ON CONFLICT (study, target) DO UPDATE SET job_id=excluded.job_id, "
                               "updated_at=excluded.updated_at", (key, target, Report.OWED, job_id, now))
                return Claim(Report.OWED, job_id, waiting_for=waiting)
            db.execute("INSERT INTO study_reports (study, target, state, job_id, lease_until, updated_at) "
                       "VALUES (?,?,?,?,?,?) ON CONFLICT (study, target) DO UPDATE SET state=excluded.state, "
                       "job_id=excluded.job_id, lease_until=excluded.lease_until, updated_at=excluded.updated_at",
                       (key, target, Report.SENDING, job_id, now + lease_s, now))
            return Claim(Report.SENDING, job_id)

    def study_sent(self, key: str, target: str, job_id: str, jobs: list[str], detail: str = "") -> None:
        """The target acknowledged the report ``job_id`` sent, which described the images of ``jobs``."""
        with self._tx() as db:
            db.execute("UPDATE study_reports SET state=?, job_id=?, jobs=?, detail=?, lease_until=0, updated_at=? "
                       "WHERE study=? AND target=?",
                       (Report.SENT, job_id, json.dumps(jobs), detail, self._clock(), key, target))

    def study_failed(self, key: str, target: str, job_id: str, reason: str) -> None:
        """The target refused the report of ``job_id`` (or did not answer): no one sends it until that
        job's resend (or another image of the study) claims it again."""
        with self._tx() as db:
            db.execute("UPDATE study_reports SET state=?, detail=?, lease_until=0, updated_at=? "
                       "WHERE study=? AND target=? AND job_id=? AND state=?",
                       (Report.FAILED, reason, self._clock(), key, target, job_id, Report.SENDING))

    def study_reports(self, key: str) -> dict[str, tuple[str, str, list[str]]]:
        """target -> (state, job, jobs described) of a study's reports."""
        with self._tx() as db:
            rows = db.execute("SELECT target, state, job_id, jobs FROM study_reports WHERE study=? ORDER BY target",
                              (key,)).fetchall()
        return {r[0]: (r[1], r[2], json.loads(r[3])) for r in rows}

    def owed(self, older_than_s: float) -> list[str]:
        """Jobs done whose study's report they left owed to another image that will never come to
        the report step (it failed, was dead-lettered at the PACS, or is gone), for longer than
        ``older_than_s``: the reconciler hands each back to the sender (worker.pipeline.reconcile)."""
        cutoff = self._clock() - older_than_s
        with self._tx() as db:
            rows = db.execute(
                "SELECT r.job_id, j.study_instance_uid FROM study_reports r JOIN jobs j ON j.id=r.job_id "
                "WHERE r.state=? AND r.updated_at<? AND j.state=? "
                "GROUP BY r.job_id, j.study_instance_uid ORDER BY MIN(r.updated_at)",
                (Report.OWED, cutoff, JobState.DONE)).fetchall()
            return [job for job, study in rows if not self._on_its_way(db, study, job)]
