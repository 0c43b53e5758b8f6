"""Report intake and the second read: a first reader's report is labelled by both labelers, kept,
matched to the jobs of its study, and compared with each job's prediction.

Two ways in, one path: ``receive`` (a report, from the MLLP listener or a Basic Text SR the DICOM
listener stored) keeps it and compares it with every job of its study that already has a
prediction; ``job_inferred`` (the pipeline, after a prediction is saved) compares a new
prediction with every report of its study that came before the image. Matching is by Study
Instance UID or by the keyed hash of the accession number (dicom_node.lookup): the report store
never holds the number. Each discrepancy is recorded, audited ("discrepancy"), counted
(medsam2_discrepancies_total{label}) and notified; a notification that fails is logged and
marked on the row ("failed: ..."), the discrepancy is kept and listed all the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.jobstore import Job, JobStore
from dicom_node.lookup import keyed_hash
from models.prediction import Prediction
from ris.notify import NotifyFailed
from ris.report_in import IncomingReport
from ris.reportstore import ReportStore, StoredDiscrepancy, StoredReport
from ris.second_read import DEFAULT_TIERS, check_tiers, discrepancies, label_report

log = structlog.get_logger()

Notify = Callable[[list[StoredDiscrepancy]], str]  # "sent", or raises NotifyFailed


@dataclass
class SecondReader:
    """The parts of the second read, passed in (worker.node.Node.second_reader builds it)."""

    store: ReportStore
    jobs: JobStore
    audit: AuditLog
    lookup_key: bytes
    load_prediction: Callable[[Job], Prediction | None]  # None: the job has no prediction (yet)
    notify: Notify | None = None
    tiers: Iterable[str] = DEFAULT_TIERS
    also_report_positive: bool = False

    def __post_init__(self) -> None:
        self.tiers = check_tiers(self.tiers)

    def keep(self, report: IncomingReport) -> tuple[StoredReport, bool]:
        """Label and keep a report (durable when this returns); (the row, True when new)."""
        labels = label_report(report.text)
        stored, new = self.store.add(source=report.source, message_id=report.message_id,
                                     study_instance_uid=report.study_instance_uid,
                                     accession_hash=keyed_hash(self.lookup_key, report.accession),
                                     status=report.status, text=report.text, labels=labels)
        if new:
            self.audit.record("report_received", report=stored.id, source=report.source,
                              study_instance_uid=report.study_instance_uid, status=report.status,
                              labeler_agreement=round(labels.agreement, 4))
            metrics.REPORTS_RECEIVED.labels(source=report.source).inc()
            log.info("report received", report=stored.id, source=report.source, status=report.status,
                     study_instance_uid=report.study_instance_uid, labeler_agreement=round(labels.agreement, 4))
        return stored, new

    def match_report(self, stored: StoredReport) -> list[StoredDiscrepancy]:
        """Compare a kept report with every job of its study that has a prediction."""
        out: list[StoredDiscrepancy] = []
        for job in self.jobs.for_study(stored.study_instance_uid, stored.accession_hash):
            out += self._compare(stored, job)
        return out

    def receive(self, report: IncomingReport) -> tuple[StoredReport, list[StoredDiscrepancy]]:
        stored, _ = self.keep(report)
        return stored, self.match_report(stored)

    def job_inferred(self, job: Job) -> list[StoredDiscrepancy]:
        """Compare a job's new prediction with every report of its study that came before it."""
        out: list[StoredDiscrepancy] = []
        for stored in self.store.for_study(job.study_instance_uid, job.accession_hash):
            out += self._compare(stored, job)
        return out

    def _compare(self, stored: StoredReport, job: Job) -> list[StoredDiscrepancy]:
        if stored.status not in ("F", "C") or self.store.compared(stored.id, job.id):
            return []
        prediction = self.load_prediction(job)
        if prediction is None:
            return []
        found = discrepancies(prediction, stored.report_labels, tiers=self.tiers,
                              also_report_positive=self.also_report_positive)
        rows = self.store.record(stored.id, job.id, job.study_instance_uid, found)
        if not rows:  # already compared elsewhere, or nothing found
            return []
        for d in rows:
            self.audit.record("discrepancy", discrepancy=d.id, report=d.report_id, job=d.job_id,
                              study_instance_uid=d.study_instance_uid, label=d.label, direction=d.direction,
                              tier=d.tier, probability=round(d.probability, 4), report_state=d.report_state)
            metrics.DISCREPANCIES.labels(label=d.label).inc()
        log.info("second read: discrepancies", report=stored.id, job=job.id,
                 labels=[d.label for d in rows], directions=[d.direction for d in rows])
        if self.notify is not None:
            try:
                outcome = self.notify(rows)
            except NotifyFailed as exc:
                outcome = f"failed: {exc}"
                log.warning("second read: notification failed", report=stored.id, job=job.id, error=str(exc))
            self.store.mark_notified([d.id for d in rows], outcome)
        return rows
