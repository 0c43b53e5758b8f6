"""A copy of every host's audit records in the shared store ([store] url), beside each host's file.

Nodes on several hosts each keep their own trail (dicom_node.audit, fsync'd lines in the spool);
this table gathers them in the PostgreSQL database they share, each record as written and the
host it came from, so one query sees what all hosts did. Written after the host's file: while the
database is away the file alone has the records of that time.
"""

from __future__ import annotations

import json
import socket

from dicom_node.database import Database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id {serial},
    time {real} NOT NULL,
    host TEXT NOT NULL,
    event TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_time ON audit (time);
"""


class AuditCopy:
    """Called with each audit record (dicom_node.audit.AuditLog's ``copy``)."""

    def __init__(self, db: Database, host: str | None = None) -> None:
        self.db = db
        self.host = host or socket.gethostname()
        db.create(_SCHEMA)

    def __call__(self, record: dict) -> None:
        with self.db.transaction() as tx:
            tx.execute("INSERT INTO audit (time, host, event, record) VALUES (?,?,?,?)",
                       (float(record["time"]), self.host, str(record["event"]),
                        json.dumps(record, sort_keys=True, default=str)))

    def read(self, event: str | None = None, limit: int | None = 1000) -> list[dict]:
        """The newest ``limit`` records (None: all) of every host (of ``event``, when given), the
        oldest first; each with the host it came from."""
        where = "WHERE event=? " if event else ""
        args: list[object] = [event] if event else []
        sql = f"SELECT host, record FROM audit {where}ORDER BY id DESC"
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, max(0, int(limit))]
        with self.db.transaction() as tx:
            rows = tx.execute(sql, args).fetchall()
        return [{**json.loads(r), "host": h} for h, r in reversed(rows)]
