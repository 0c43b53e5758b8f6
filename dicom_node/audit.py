"""Append-only audit trail, one JSON object per line, modelled on DICOM PS3.15 A.5 events.

Records carry UIDs, AE titles, states and timings, never patient name, ID or birth date. Each
record is written with O_APPEND and fsync'd, so concurrent processes interleave whole lines; the
trail is only ever appended to (read it with ``medsam2-cxr audit [--event NAME]``). Each record
names its PS3.15 A.5 event, EventID code, action and outcome, so it can be turned into a DICOM
audit message (IHE ATNA) by a forwarder.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

# PS3.15 A.5 event names our records map onto, with the EventID code (DCM, CID 400), the
# EventActionCode (C create, R read, U update, D delete, E execute) and the EventOutcomeIndicator
# (0 success, 4 minor failure, 8 serious failure, 12 major failure) each record carries.
A5 = {
    "received": ("DICOM Instances Transferred", "110104", "C", 0),
    "skipped": ("DICOM Instances Transferred", "110104", "C", 0),
    "inferred": ("DICOM Instances Accessed", "110103", "R", 0),
    "sent": ("DICOM Instances Transferred", "110104", "R", 0),
    "failed": ("DICOM Instances Transferred", "110104", "C", 4),
    "dead_letter": ("DICOM Instances Transferred", "110104", "R", 8),
    # A job a pipeline step could not finish (a bug or a defect in the data): final until resent.
    "job_failed": ("DICOM Instances Accessed", "110103", "R", 8),
    # shadow mode ([node] mode = "shadow"): results made and kept in the spool (or sent to a QA destination only)
    "shadow": ("DICOM Instances Accessed", "110103", "R", 0),
    "resent": ("DICOM Instances Transferred", "110104", "R", 0),
    "exported": ("Export", "110106", "R", 0),  # de-identified copies leaving the site
    "report_sent": ("Export", "110106", "R", 0),  # a report to the RIS (HL7) or a FHIR server (ris/delivery.py)
    # one report per study (ris/delivery.py): this image's findings go with the report of another
    # image of its study; or they came after the study's report went, and are in no report (minor failure)
    "report_deferred": ("Export", "110106", "R", 0),
    "study_already_reported": ("Export", "110106", "R", 4),
    # a first reader's report kept for the second read (ris/intake.py), and a finding it leaves out
    "report_received": ("Import", "110107", "C", 0),
    "discrepancy": ("Patient Record", "110110", "C", 0),
    "refused": ("Security Alert", "110113", "E", 4),
    "quarantined": ("Security Alert", "110113", "E", 4),
    "application_start": ("Application Activity", "110100", "E", 0),
    "application_stop": ("Application Activity", "110100", "E", 0),
    # The web console (console/): every record names its user (and address).
    "login": ("User Authentication", "110114", "E", 0),
    "login_failed": ("User Authentication", "110114", "E", 4),
    "logout": ("User Authentication", "110114", "E", 0),
    "login_locked": ("Security Alert", "110113", "E", 4),  # a user or address locked out after failures
    "access_denied": ("Security Alert", "110113", "E", 4),  # a role without the right, or no CSRF token
    "job_query": ("Query", "110112", "E", 0),  # jobs looked up by the keyed hash of an accession or patient ID
    "identifiers_viewed": ("Patient Record", "110110", "R", 0),  # an admin read a source's identifiers
    # an operator paused or resumed sending to a destination (event type: Software Configuration, 110131)
    "destination_paused": ("Security Alert", "110113", "E", 0),
    "destination_resumed": ("Security Alert", "110113", "E", 0),
}
EVENTS = {name: a5[0] for name, a5 in A5.items()}


class AuditLog:
    """The trail in ``path`` (this host's); ``copy``, when given, also gets each record, after the
    file has it (dicom_node.audit_copy: the shared store's table of every host's records). A copy
    that fails is logged and the record stands: the file is the trail, the copy a convenience."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time,
                 copy: Callable[[dict], None] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._copy = copy

    def record(self, event: str, **fields: object) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}; known: {sorted(EVENTS)}")
        name, code, action, outcome = A5[event]
        record = {"time": round(self._clock(), 3), "event": event, "dicom_event": name, "event_id": code,
                  "event_action": action, "event_outcome": outcome, **fields}
        line = json.dumps(record, sort_keys=True, default=str)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if self._copy is not None:
            try:
                self._copy(json.loads(line))
            except Exception as exc:  # noqa: BLE001 - the file has the record; the copy may miss it
                structlog.get_logger(__name__).warning("audit.copy_failed", audit_event=event,
                                                       error=type(exc).__name__)

    def read(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with self.path.open() as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)
