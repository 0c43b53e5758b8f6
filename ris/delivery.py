"""Results to every target of the caller's route: the job's DICOM results to the PACS, then its
study's report to the RIS (HL7 ORU^R01 over MLLP) and a FHIR server, one per study (see
deliver_results for when), as one step of worker.pipeline.deliver_job.

Each target that acknowledged is recorded (ris.ledger: the PACS per job, the RIS and FHIR server
per study); a target recorded is not sent to again, so when the RIS rejects a message (ACK AE/AR:
the job is dead-lettered with the RIS's reason) and `medsam2-cxr resend` brings the job back, the
PACS gets no second copy. The ORU's MSH-10 and the FHIR resources' identifiers derive from the
study (not the job, nor the target), so a message repeated after a lost ACK (or by a worker that
died before recording) can be recognised by the receiver: the RIS by MSH-10, the FHIR server by
the conditional create. Transient failures are retried with the sender's backoff
([sender] attempts, backoff_s, max_backoff_s, timeout_s); the last one dead-letters the job too.
Logs and audit name targets, job ids and UIDs, never a patient identifier; a peer's error text is
redacted of the source's identifiers before it becomes a reason.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import structlog

from dicom_node.sender import DeliveryFailed, ResultDestination
from ris.ledger import Ledger, Report

if TYPE_CHECKING:
    from dicom_node.jobstore import Job
    from models.prediction import Prediction
    from ris.content import ReportContent
    from worker.pipeline import Context
    from worker.settings import Settings

log = structlog.get_logger()
T = TypeVar("T")


class ReportUndelivered(DeliveryFailed):
    """The RIS or FHIR server refused the report, or did not answer after the last attempt."""

    def __init__(self, target: str, reason: str) -> None:
        super().__init__(f"{target}: {reason}")
        self.target = target


@dataclass(frozen=True)
class Hl7Target:
    host: str
    port: int
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    sending_facility: str = ""
    processing_id: str = "P"
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"hl7:{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"RIS {self.receiving_application}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


@dataclass(frozen=True)
class FhirTarget:
    url: str
    token: str = field(default="", repr=False)
    verify: ssl.SSLContext | bool = field(default=True, compare=False, repr=False)

    @property
    def key(self) -> str:
        return f"fhir:{self.url}"

    def __str__(self) -> str:
        return f"FHIR {self.url}"


Target = Hl7Target | FhirTarget


@dataclass
class Reports:
    """What deliver_results needs beyond the pipeline's Context (worker.pipeline.Context.reports)."""

    targets_for: Callable[[str], list[Target]]  # calling AE title -> the RIS/FHIR targets of its route
    ledger: Ledger
    sending_application: str = "MEDSAM2CXR"  # MSH-3
    attempts: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0
    timeout_s: float = 30.0
    # prediction -> urgent (models/urgency.py supplies the rule); None: every study routine
    urgency: Callable[[Prediction], bool] | None = None
    sleep: Callable[[float], None] = time.sleep


def dicom_key(dest: ResultDestination) -> str:
    return f"dicom:{dest.ae_title}@{dest.host}:{dest.port}"


# ---------------------------------------------------------------- from the configuration

def targets_of(route) -> list[Target]:
    """The RIS and FHIR targets of one settings Destination (a route or the default)."""
    from dicom_node.tls import client_context

    out: list[Target] = []
    r = route.ris
    if r.host:
        tls = client_context(r.tls.ca, r.tls.cert or None, r.tls.key or None, r.tls.check_hostname) if r.tls.ca else None
        out.append(Hl7Target(r.host, r.port, r.receiving_application, r.receiving_facility, r.sending_facility,
                             r.processing_id, tls))
    f = route.fhir
    if f.url:
        out.append(FhirTarget(f.url, f.token, client_context(f.ca) if f.ca else True))
    return out


def from_settings(settings: Settings, ledger: Ledger | Path,
                  urgency: Callable[[Prediction], bool] | None = None) -> Reports | None:
    """Reports for a node whose default destination or any route names a RIS or FHIR server; else None.
    ``ledger``: the node's delivery ledger (worker.node.Node.ledger), or the job store's SQLite file."""
    d = settings.destination
    routes = [d, *d.routes.values()]
    if not any(r.ris.host or r.fhir.url for r in routes):
        return None
    s = settings.sender

    @functools.lru_cache(maxsize=256)
    def targets_for(calling_aet: str) -> tuple[Target, ...]:  # TLS contexts made once per route
        return tuple(targets_of(d.for_caller(calling_aet)))

    ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
    return Reports(targets_for=lambda aet: list(targets_for(aet.strip())), ledger=ledger,
                   sending_application=settings.node.ae_title, attempts=s.attempts, backoff_s=s.backoff_s,
                   max_backoff_s=s.max_backoff_s, timeout_s=s.timeout_s, urgency=urgency)


def window_s(settings: Settings) -> float:
    """The longest the RIS and FHIR deliveries of one job can take with every retry (added to the
    SENDING lease, so the reconciler does not hand the job to a second sender meanwhile)."""
    d = settings.destination
    s = settings.sender
    waits = sum(min(s.backoff_s * 2 ** (a - 1), s.max_backoff_s) for a in range(1, s.attempts))
    per_target = s.attempts * s.timeout_s * 3 + waits  # connect, send, answer
    return max((bool(r.ris.host) + bool(r.fhir.url)) * per_target for r in [d, *d.routes.values()])


# ---------------------------------------------------------------- one target

def _retry(what: str, attempts: int, backoff_s: float, max_backoff_s: float, sleep: Callable[[float], None],
           fn: Callable[[], T], transient: tuple[type[BaseException], ...], redact: tuple[str, ...]) -> tuple[T, int]:
    """fn() with exponential backoff on ``transient`` errors (as dicom_node.sender.send_with_retry):
    (its result, the attempts it took); ReportUndelivered after the last attempt."""
    from dicom_node.identifiers import describe

    for attempt in range(1, attempts + 1):
        try:
            return fn(), attempt
        except transient as exc:
            reason = describe(exc, redact)
            if attempt == attempts:
                log.error("ris.delivery_failed", target=what, attempt=attempt, error=reason)
                raise ReportUndelivered(what, f"no answer after {attempts} attempts: {reason}") from exc
            delay = min(backoff_s * 2 ** (attempt - 1), max_backoff_s)
            log.warning("ris.delivery_retry", target=what, attempt=attempt, delay_s=delay, error=reason)
            sleep(delay)
    raise AssertionError("unreachable")


def send_hl7(content: ReportContent, target: Hl7Target, reports: Reports) -> dict:
    """The study's ORU^R01 to the RIS; raises ReportUndelivered on AE/AR or after the last attempt."""
    from dicom_node.identifiers import describe
    from ris import hl7v2, mllp  # the HL7 libraries load in the io worker only, when a route has a RIS

    control = hl7v2.control_id(content.key)
    er7, charset = hl7v2.build(content, control=control, sending_application=reports.sending_application,
                               sending_facility=target.sending_facility,
                               receiving_application=target.receiving_application,
                               receiving_facility=target.receiving_facility, processing_id=target.processing_id)
    data = charset.encode(er7)
    try:
        ack, attempts = _retry(str(target), reports.attempts, reports.backoff_s, reports.max_backoff_s, reports.sleep,
                               lambda: mllp.send(target.host, target.port, data, control, charset.codec, target.tls,
                                                 reports.timeout_s),
                               (mllp.MllpUnavailable,), content.identifiers)
    except mllp.AckRejected as exc:
        raise ReportUndelivered(str(target), f"the RIS rejected ORU^R01 {control}: "
                                             f"{describe(exc, content.identifiers)}") from exc
    return {"control_id": control, "ack": ack, "attempts": attempts, "charset": "~".join(charset.names),
            "priority": "S" if content.urgent else "R"}


def send_fhir(content: ReportContent, target: FhirTarget, reports: Reports) -> dict:
    """The study's transaction Bundle to the FHIR server; raises ReportUndelivered on a refusal or after the last attempt."""
    from dicom_node.identifiers import describe
    from ris import fhir  # fhir.resources takes seconds to import: only where a route has a FHIR server

    bundle = fhir.build_bundle(content)
    try:
        statuses, attempts = _retry(str(target), reports.attempts, reports.backoff_s, reports.max_backoff_s,
                                    reports.sleep,
                                    lambda: fhir.post_bundle(target.url, bundle, target.token, target.verify,
                                                             reports.timeout_s),
                                    (fhir.FhirUnavailable,), content.identifiers)
    except fhir.FhirRefused as exc:
        raise ReportUndelivered(str(target), f"the FHIR server refused the report: "
                                             f"{describe(exc, content.identifiers)}") from exc
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s] = counts.get(s, 0) + 1
    return {"report": fhir.resource_uuid(content.key), "entries": counts, "attempts": attempts}


# ---------------------------------------------------------------- the pipeline's step

def report_key(job: Job) -> str:
    """What a study's report is keyed by, in the ledger and in its identifiers: the Study Instance
    UID (a job whose source had none is a study of its own)."""
    return job.study_instance_uid or f"job:{job.id}"


def deliver_results(ctx: Context, job: Job, files: list[Path], dest: ResultDestination,
                    send: Callable[[list[Path], ResultDestination], None],
                    content_of: Callable[[Reports, list[Job]], ReportContent]) -> None:
    """The job's DICOM results to ``dest`` (unless already stored there), then its study's report to
    each RIS and FHIR target of the job's route, when this job's delivery is the study's last.
    Raises DeliveryFailed (a ReportUndelivered for the RIS or FHIR server) for deliver_job to
    dead-letter.

    One report per study and target: the job whose PACS delivery is the study's last sends it,
    once no other job of the study is queued, inferring, inferred or sending without its PACS
    delivery recorded (ris.ledger.Ledger.claim_study: one transaction on the job store's file, so
    two io workers finishing two images of a study at once send one report, not none and not two).
    A job that finds another image still on its way leaves the report owed to it (audit
    "report_deferred"); should that image never come to this step (it failed, or the PACS
    dead-lettered it), the reconciler hands the owing job back to the sender (ris.ledger.owed).
    A settle window (send when no image came for N seconds) was not taken: it is a guess at how
    long a modality takes, a retry or a reconciler pass that outlasts it sends a second report,
    and a window short enough for urgent studies splits slow ones; the job states say exactly what
    is still coming.

    Limitation: an image of the study that comes after its report went (a late series, an image
    sent again under a new SOP Instance UID, a dead-lettered image resent after the others were
    reported) does not change the report, nor makes a second one: it is logged and audited
    "study_already_reported"; its DICOM results reach the PACS as always.

    ``content_of`` reads the report of the study's jobs given from the spool (worker.pipeline.
    report_content), only when a target needs it."""
    reports = getattr(ctx, "reports", None)
    targets = reports.targets_for(job.calling_aet) if reports is not None else []
    if not targets:
        send(files, dest)
        return
    assert reports is not None
    ledger = reports.ledger
    if ledger.delivered(job.id, dicom_key(dest)):
        log.info("ris.dicom_already_stored", job=job.id, destination=str(dest))
    else:
        send(files, dest)
        ledger.record(job.id, dicom_key(dest), "stored")
    key = report_key(job)
    lease_s = ctx.send_lease_s or ctx.lease_s
    content: ReportContent | None = None
    for target in targets:
        claim = ledger.claim_study(key, job.study_instance_uid, target.key, job.id, lease_s)
        if claim.state == Report.SENT:
            if job.id in claim.jobs:
                log.info("ris.already_delivered", job=job.id, target=str(target))
            else:
                log.warning("ris.study_already_reported", job=job.id, target=str(target), reported_by=claim.job_id)
                ctx.audit.record("study_already_reported", job=job.id, sop_instance_uid=job.sop_instance_uid,
                                 study_instance_uid=job.study_instance_uid, target=str(target),
                                 reported_by=claim.job_id, reported_jobs=list(claim.jobs))
            continue
        if not claim.ours(job.id):
            waiting = {"waiting_for": list(claim.waiting_for)} if claim.state == Report.OWED else {
                "sending_job": claim.job_id}
            log.info("ris.report_deferred", job=job.id, target=str(target), **waiting)
            ctx.audit.record("report_deferred", job=job.id, sop_instance_uid=job.sop_instance_uid,
                             study_instance_uid=job.study_instance_uid, target=str(target), **waiting)
            continue
        if content is None:
            study_jobs = ctx.jobs.for_study(job.study_instance_uid, None) if job.study_instance_uid else []
            content = content_of(reports, study_jobs if any(j.id == job.id for j in study_jobs) else [job])
        t0 = time.perf_counter()
        try:
            detail = (send_hl7(content, target, reports) if isinstance(target, Hl7Target)
                      else send_fhir(content, target, reports))
        except ReportUndelivered as exc:
            ledger.study_failed(key, target.key, job.id, str(exc))
            raise
        ledger.study_sent(key, target.key, job.id, content.job_ids, str(detail))
        seconds = round(time.perf_counter() - t0, 3)
        ctx.audit.record("report_sent", job=job.id, sop_instance_uid=job.sop_instance_uid,
                         study_instance_uid=job.study_instance_uid, target=str(target), seconds=seconds,
                         jobs=content.job_ids, **detail)
        log.info("ris.delivered", job=job.id, target=str(target), seconds=seconds, jobs=content.job_ids, **detail)
