"""Destinations an operator paused (from the console): results owed to them wait, unsent.

A paused destination is a small JSON record in ``<spool>/paused/`` (who, since when), named by a
hash of the destination's AE title, host and port (never by the strings themselves); with a
shared store ([store] url) the same record is a row of its ``paused`` table instead, so a pause
made on one host's console holds every host's senders. The sender's
caller checks it before each send: a paused destination raises :class:`DestinationPaused`, a
ConnectionError, so the job is given back (still inferred) and the reconciler offers it again
until the destination is resumed; nothing is dead-lettered meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from dicom_node.database import Database
from dicom_node.layout import SpoolLayout


class DestinationPaused(ConnectionError):
    """The destination was paused by an operator; the job waits (transient, worker.failures)."""


def _name(ae_title: str, host: str, port: int) -> str:
    return hashlib.sha256(f"{ae_title}@{host}:{int(port)}".encode()).hexdigest()[:32] + ".json"


_SCHEMA = "CREATE TABLE IF NOT EXISTS paused (name TEXT PRIMARY KEY, record TEXT NOT NULL);"


class Pauses:
    """Paused destinations in the spool's folder, or in ``db`` (a shared store) when given."""

    def __init__(self, spool_root: Path, db: Database | None = None) -> None:
        self.folder = SpoolLayout(Path(spool_root)).paused
        self.db = db
        if db is not None:
            db.create(_SCHEMA)

    def get(self, ae_title: str, host: str, port: int) -> dict | None:
        name = _name(ae_title, host, port)
        if self.db is not None:
            with self.db.transaction() as tx:
                row = tx.execute("SELECT record FROM paused WHERE name=?", (name,)).fetchone()
            return json.loads(row[0]) if row else None
        try:
            return json.loads((self.folder / name).read_text())
        except (OSError, ValueError):
            return None

    def pause(self, ae_title: str, host: str, port: int, user: str, now: float | None = None) -> dict:
        record = {"destination": f"{ae_title}@{host}:{port}", "user": user,
                  "since": time.time() if now is None else now}
        name = _name(ae_title, host, port)
        if self.db is not None:
            with self.db.transaction() as tx:
                tx.execute("INSERT INTO paused (name, record) VALUES (?, ?) "
                           "ON CONFLICT (name) DO UPDATE SET record=excluded.record", (name, json.dumps(record)))
            return record
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / (".tmp-" + name)
        tmp.write_text(json.dumps(record))
        tmp.rename(self.folder / name)
        return record

    def resume(self, ae_title: str, host: str, port: int) -> bool:
        name = _name(ae_title, host, port)
        if self.db is not None:
            with self.db.transaction() as tx:
                return tx.execute("DELETE FROM paused WHERE name=?", (name,)).rowcount == 1
        path = self.folder / name
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def check(self, ae_title: str, host: str, port: int) -> None:
        """Raise DestinationPaused when this destination is paused."""
        record = self.get(ae_title, host, port)
        if record is not None:
            raise DestinationPaused(f"destination {record['destination']} paused by {record.get('user', '?')}")
