"""The first readers' reports and the discrepancies found against them: one SQLite file in the spool
(``reports.sqlite``, next to the job table), or the tables of [store] url's PostgreSQL database
(dicom_node.stores), written through dicom_node.database like the job table.

A report row holds its text, both labelers' labels and their agreement, the Study Instance UID
and the keyed hash of its accession number (dicom_node.lookup), never the number itself. A
report waits here until a job of its study has a prediction (a report may come before the
image); each (report, job) pair is compared once (the ``comparisons`` primary key), so a report
and an inference arriving together cannot flag a discrepancy twice.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicom_node.database import Database, as_database
from ris.second_read import Discrepancy, ReportLabels, labels_json

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    id {serial},
    source TEXT NOT NULL,
    message_id TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    accession_hash TEXT,
    status TEXT NOT NULL,
    text TEXT NOT NULL,
    labels TEXT NOT NULL,
    agreement {real} NOT NULL,
    received_at {real} NOT NULL,
    UNIQUE (source, message_id)
);
CREATE INDEX IF NOT EXISTS reports_study ON reports (study_instance_uid);
CREATE INDEX IF NOT EXISTS reports_accession ON reports (accession_hash);
CREATE TABLE IF NOT EXISTS comparisons (
    report_id INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    compared_at {real} NOT NULL,
    found INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (report_id, job_id)
);
CREATE TABLE IF NOT EXISTS discrepancies (
    id {serial},
    report_id INTEGER NOT NULL,
    job_id TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    label TEXT NOT NULL,
    direction TEXT NOT NULL,
    tier TEXT NOT NULL,
    probability {real} NOT NULL,
    report_state TEXT NOT NULL,
    created_at {real} NOT NULL,
    notified TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS discrepancies_created ON discrepancies (created_at);
"""


@dataclass(frozen=True)
class StoredReport:
    id: int
    source: str
    message_id: str
    study_instance_uid: str
    accession_hash: str | None
    status: str
    text: str
    labels: dict  # ris.second_read.labels_json: lexicon, grammar, agree, agreement
    agreement: float
    received_at: float

    @property
    def report_labels(self) -> ReportLabels:
        return ReportLabels(self.labels["lexicon"], self.labels["grammar"])


@dataclass(frozen=True)
class StoredDiscrepancy:
    id: int
    report_id: int
    job_id: str
    study_instance_uid: str
    label: str
    direction: str
    tier: str
    probability: float
    report_state: str
    created_at: float
    notified: str  # "" not yet, "sent", or "failed: <why>"


_R = ("id, source, message_id, study_instance_uid, accession_hash, status, text, labels, agreement, received_at")
_D = ("id, report_id, job_id, study_instance_uid, label, direction, tier, probability, report_state, created_at, "
      "notified")


def _report(row: tuple) -> StoredReport:
    values = list(row)
    values[7] = json.loads(values[7])
    return StoredReport(*values)


class ReportStore:
    """SQLite tables of reports, comparisons and discrepancies; shared by the MLLP listener, the
    DICOM listener and the workers, like the job store."""

    def __init__(self, db: Database | Path, clock: Callable[[], float] = time.time) -> None:
        """``db``: the database (dicom_node.stores.open_database), or the path of a SQLite file."""
        self.db = as_database(db)
        self.path: Path | None = getattr(self.db, "path", None)
        self._clock = clock
        self.db.create(_SCHEMA)

    def add(self, *, source: str, message_id: str, study_instance_uid: str, accession_hash: str | None,
            status: str, text: str, labels: ReportLabels) -> tuple[StoredReport, bool]:
        """Keep a report; (the row, True when new). The same (source, message id) again is the same report."""
        with self.db.transaction() as db:
            cur = db.execute(
                f"INSERT INTO reports ({_R.removeprefix('id, ')}) VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (source, message_id, study_instance_uid, accession_hash, status, text,
                 json.dumps(labels_json(labels)), labels.agreement, self._clock()))
            new = cur.rowcount == 1
            row = db.execute(f"SELECT {_R} FROM reports WHERE source=? AND message_id=?",
                             (source, message_id)).fetchone()
        return _report(row), new

    def get(self, report_id: int) -> StoredReport | None:
        with self.db.transaction() as db:
            row = db.execute(f"SELECT {_R} FROM reports WHERE id=?", (report_id,)).fetchone()
        return _report(row) if row else None

    def for_study(self, study_instance_uid: str, accession_hash: str | None) -> list[StoredReport]:
        """Reports of a study, by its UID or its accession's keyed hash, the oldest first."""
        with self.db.transaction() as db:
            rows = db.execute(
                f"SELECT {_R} FROM reports WHERE (study_instance_uid=? AND study_instance_uid!='') "
                "OR (accession_hash=? AND accession_hash IS NOT NULL) ORDER BY id",
                (study_instance_uid, accession_hash)).fetchall()
        return [_report(r) for r in rows]

    def record(self, report_id: int, job_id: str, study_instance_uid: str,
               found: list[Discrepancy]) -> list[StoredDiscrepancy] | None:
        """Record one comparison and its discrepancies in one transaction; None when this pair was
        already compared (by another process: nothing is recorded twice)."""
        now = self._clock()
        with self.db.transaction() as db:
            cur = db.execute("INSERT INTO comparisons VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                             (report_id, job_id, now, len(found)))
            if cur.rowcount != 1:
                return None
            ids = []
            for d in found:
                c = db.execute(f"INSERT INTO discrepancies ({_D.removeprefix('id, ')}) VALUES (?,?,?,?,?,?,?,?,?,'') "
                               "RETURNING id", (report_id, job_id, study_instance_uid, d.label, d.direction, d.tier,
                                                float(d.probability), d.report, now))
                ids.append(c.fetchone()[0])
            rows = [db.execute(f"SELECT {_D} FROM discrepancies WHERE id=?", (i,)).fetchone() for i in ids]
        return [StoredDiscrepancy(*r) for r in rows]

    def compared(self, report_id: int, job_id: str) -> bool:
        with self.db.transaction() as db:
            return db.execute("SELECT 1 FROM comparisons WHERE report_id=? AND job_id=?",
                              (report_id, job_id)).fetchone() is not None

    def mark_notified(self, discrepancy_ids: list[int], outcome: str) -> None:
        with self.db.transaction() as db:
            db.executemany("UPDATE discrepancies SET notified=? WHERE id=?", [(outcome, i) for i in discrepancy_ids])

    def discrepancies(self, limit: int = 100, offset: int = 0, label: str | None = None) -> list[StoredDiscrepancy]:
        """The newest first."""
        where, args = ("WHERE label=? ", [label]) if label else ("", [])
        with self.db.transaction() as db:
            rows = db.execute(f"SELECT {_D} FROM discrepancies {where}ORDER BY id DESC LIMIT ? OFFSET ?",
                              (*args, max(0, int(limit)), max(0, int(offset)))).fetchall()
        return [StoredDiscrepancy(*r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Reports, reports still waiting for a job with a prediction, comparisons, discrepancies."""
        with self.db.transaction() as db:
            one = lambda sql: int(db.execute(sql).fetchone()[0])  # noqa: E731
            return {"reports": one("SELECT COUNT(*) FROM reports"),
                    "waiting": one("SELECT COUNT(*) FROM reports WHERE id NOT IN (SELECT report_id FROM comparisons)"),
                    "comparisons": one("SELECT COUNT(*) FROM comparisons"),
                    "discrepancies": one("SELECT COUNT(*) FROM discrepancies")}
