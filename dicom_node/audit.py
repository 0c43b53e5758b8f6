"""Append-only audit trail, one JSON object per line, modelled on DICOM PS3.15 A.5 events.

Records carry UIDs, AE titles, states and timings, never patient name, ID or birth date. Each
record is written with O_APPEND and fsync'd, so concurrent processes interleave whole lines.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

# PS3.15 A.5 event names our records map onto.
EVENTS = {
    "received": "DICOM Instances Transferred",
    "skipped": "DICOM Instances Transferred",
    "inferred": "DICOM Instances Accessed",
    "sent": "DICOM Instances Transferred",
    "failed": "DICOM Instances Transferred",
    "dead_letter": "DICOM Instances Transferred",
    "resent": "DICOM Instances Transferred",
    "refused": "Security Alert",
    "quarantined": "Security Alert",
    "application_start": "Application Activity",
    "application_stop": "Application Activity",
}


class AuditLog:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock

    def record(self, event: str, **fields: object) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}; known: {sorted(EVENTS)}")
        line = json.dumps(
            {"time": round(self._clock(), 3), "event": event, "dicom_event": EVENTS[event], **fields},
            sort_keys=True, default=str,
        )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with self.path.open() as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)
