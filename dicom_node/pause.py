"""Destinations an operator paused (from the console): results owed to them wait, unsent.

A paused destination is a small JSON record in ``<spool>/paused/`` (who, since when), named by a
hash of the destination's AE title, host and port (never by the strings themselves). The sender's
caller checks it before each send: a paused destination raises :class:`DestinationPaused`, a
ConnectionError, so the job is given back (still inferred) and the reconciler offers it again
until the destination is resumed; nothing is dead-lettered meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from dicom_node.layout import SpoolLayout


class DestinationPaused(ConnectionError):
    """The destination was paused by an operator; the job waits (transient, worker.failures)."""


def _name(ae_title: str, host: str, port: int) -> str:
    return hashlib.sha256(f"{ae_title}@{host}:{int(port)}".encode()).hexdigest()[:32] + ".json"


class Pauses:
    def __init__(self, spool_root: Path) -> None:
        self.folder = SpoolLayout(Path(spool_root)).paused

    def get(self, ae_title: str, host: str, port: int) -> dict | None:
        try:
            return json.loads((self.folder / _name(ae_title, host, port)).read_text())
        except (OSError, ValueError):
            return None

    def pause(self, ae_title: str, host: str, port: int, user: str, now: float | None = None) -> dict:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"destination": f"{ae_title}@{host}:{port}", "user": user,
                  "since": time.time() if now is None else now}
        tmp = self.folder / (".tmp-" + _name(ae_title, host, port))
        tmp.write_text(json.dumps(record))
        tmp.rename(self.folder / _name(ae_title, host, port))
        return record

    def resume(self, ae_title: str, host: str, port: int) -> bool:
        path = self.folder / _name(ae_title, host, port)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def check(self, ae_title: str, host: str, port: int) -> None:
        """Raise DestinationPaused when this destination is paused."""
        record = self.get(ae_title, host, port)
        if record is not None:
            raise DestinationPaused(f"destination {record['destination']} paused by {record.get('user', '?')}")
