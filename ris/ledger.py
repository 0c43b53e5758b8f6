"""Which targets already have a job's results, in the job store's own database (its SQLite file, or PostgreSQL).

A job is delivered to several targets in turn (the PACS, then the RIS, then a FHIR server); when a
later one fails and the job is dead-lettered and resent, the ones recorded here are not sent to
again, so the PACS gets no second copy and the RIS no second message. One row per (job, target),
written right after the target acknowledged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from dicom_node.database import Database, Tx, as_database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    job_id TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT,
    delivered_at {real} NOT NULL,
    PRIMARY KEY (job_id, target)
);
"""


class Ledger:
    """Delivered (job, target) pairs; safe across threads and processes like the job store."""

    def __init__(self, db: Database | Path, clock: Callable[[], float] = time.time) -> None:
        """``db``: the job store's database (JobStore.db), or the path of its SQLite file."""
        self.db = as_database(db)
        self.path: Path | None = getattr(self.db, "path", None)
        self._clock = clock
        self.db.create(_SCHEMA)

    def _tx(self) -> AbstractContextManager[Tx]:
        return self.db.transaction()

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
