"""The DICOM SCP: receive -> persist -> record -> enqueue, and answer the modality.

The C-STORE handler writes the encoded bytes durably to the spool first, so everything that can
fail afterwards (parsing, classification, the job table, the broker) either is recovered from
the spool (the reconciler re-enqueues QUEUED jobs) or is reported to the sender as a failure
with nothing left behind. Pixel data are never decoded here.

No patient identifiers are logged: pynetdicom's identifier logging is turned off and our own
log lines and audit records carry only UIDs, AE titles, job ids and reasons.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO

import pydicom
import structlog
from pynetdicom import AE, _config, evt
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS
from pynetdicom.transport import ThreadedAssociationServer
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
)

from dicom_node.audit import AuditLog
from dicom_node.filters import classify
from dicom_node.jobstore import JobState, JobStore
from dicom_node.spool import OutOfSpace, Spool

log = structlog.get_logger(__name__)


def _status(table: dict, code: int) -> int:
    """A status code checked against pynetdicom's table, so a typo fails at import."""
    if code not in table:
        raise KeyError(f"0x{code:04X} is not a status of this service")
    return code


# C-STORE statuses (PS3.4 B.2.3, PS3.7 C), named after pynetdicom.status.
SUCCESS = _status(GENERAL_STATUS, 0x0000)
OUT_OF_RESOURCES = _status(STORAGE_SERVICE_CLASS_STATUS, 0xA700)  # "Refused: Out of Resources"
CANNOT_UNDERSTAND = _status(STORAGE_SERVICE_CLASS_STATUS, 0xC000)  # "Cannot Understand"
PROCESSING_FAILURE = _status(GENERAL_STATUS, 0x0110)  # "Processing Failure"

IMAGE_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)
# Stored and skipped, so a PACS routing a whole study back (with our results) does not fail.
STORED_AND_SKIPPED = (
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
)
TRANSFER_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,  # .4.50
    JPEGLossless,  # .4.57
    JPEGLosslessSV1,  # .4.70
    JPEGLSLossless,  # .4.80
    JPEG2000Lossless,  # .4.90
    JPEG2000,  # .4.91
)
VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = "MEDSAM2CXR"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any
    max_associations: int = 16
    maximum_pdu_size: int = 0
    network_timeout: float = 60.0
    own_manufacturer: str = "medsam2-cxr"


@dataclass(frozen=True)
class _Deps:
    cfg: ListenerConfig
    spool: Spool
    jobs: JobStore
    audit: AuditLog
    enqueue: Callable[[str], None]
    new_id: Callable[[], str]


def quiet_pynetdicom() -> None:
    """Stop pynetdicom logging DIMSE identifiers (PHI) and its INFO chatter."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _calling_aet(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title or "").strip()


def _peer(event: evt.Event) -> str:
    return f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def handle_rejected(event: evt.Event, deps: _Deps) -> None:
    calling = _calling_aet(event)
    allowed = deps.cfg.allowed_calling_aets
    reason = (
        "calling AE title not allowed"
        if allowed and calling not in allowed
        else "association rejected (limit reached or called AE title)"
    )
    log.warning("association refused", calling_aet=calling, peer=_peer(event), reason=reason)
    _audit_quietly(deps, "refused", calling_aet=calling, peer=_peer(event), reason=reason)


def _audit_quietly(deps: _Deps, event: str, **fields: object) -> None:
    """Audit, but never let an audit failure (a full disk) change the DIMSE answer."""
    try:
        deps.audit.record(event, **fields)
    except Exception:  # noqa: BLE001
        log.exception("audit record failed", audit_event=event, job_id=fields.get("job_id"))


def handle_store(event: evt.Event, deps: _Deps) -> int:
    """Persist first, then parse, classify, record, enqueue. Returns a C-STORE status."""
    calling = _calling_aet(event)
    data = event.encoded_dataset()
    job_id = deps.new_id()
    path = deps.spool.incoming_path(job_id)
    try:
        deps.spool.write_atomic(path, data)
    except OutOfSpace as exc:
        log.error("spool full, refusing instance", job_id=job_id, calling_aet=calling, error=str(exc))
        _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="spool full")
        return OUT_OF_RESOURCES
    except OSError as exc:
        log.error("spool write failed", job_id=job_id, calling_aet=calling, error=str(exc))
        _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="spool write failed")
        return PROCESSING_FAILURE

    # From here the bytes are safe on disk.
    reason = None
    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        sop_instance = str(ds.get("SOPInstanceUID", "") or "")
        sop_class = str(ds.get("SOPClassUID", "") or "")
        study = str(ds.get("StudyInstanceUID", "") or "")
        missing = [kw for kw, v in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_instance)) if not v]
        if missing:
            reason = f"missing {', '.join(missing)}"
        else:
            decision = classify(ds, own_manufacturer=deps.cfg.own_manufacturer)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "cannot understand"
        reason = f"unparseable header: {type(exc).__name__}"
    if reason is not None:
        try:
            deps.spool.quarantine_file(path, reason, job_id)
        except Exception:  # noqa: BLE001
            path.unlink(missing_ok=True)
            log.exception("quarantine failed; bytes dropped", job_id=job_id)
        _audit_quietly(deps, "quarantined", job_id=job_id, calling_aet=calling, reason=reason)
        log.warning("instance quarantined", job_id=job_id, calling_aet=calling, reason=reason)
        return CANNOT_UNDERSTAND

    try:
        job, _earlier = deps.jobs.add(
            job_id=job_id,
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            study_instance_uid=study,
            calling_aet=calling,
            path=deps.spool.relative(path),
            state=JobState.QUEUED if decision.process else JobState.SKIPPED,
            reason=decision.reason,
        )
    except Exception:  # noqa: BLE001 - unrecorded bytes are useless: drop them, let the sender retry
        path.unlink(missing_ok=True)
        log.exception("job table write failed; instance refused", job_id=job_id)
        return PROCESSING_FAILURE

    fields = dict(
        job_id=job.id,
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_instance_uid=study,
        calling_aet=calling,
        reason=job.reason,
    )
    queued = job.state == JobState.QUEUED
    _audit_quietly(deps, "received" if queued else "skipped", **fields)
    log.info("instance received" if queued else "instance skipped", state=str(job.state), **fields)

    if queued:
        try:
            deps.enqueue(job.id)
        except Exception as exc:  # noqa: BLE001 - the reconciler re-enqueues QUEUED jobs
            log.warning("enqueue failed; reconciler will retry", job_id=job.id, error=repr(exc))
    return SUCCESS


def start_listener(
    cfg: ListenerConfig,
    spool: Spool,
    jobs: JobStore,
    audit: AuditLog,
    enqueue: Callable[[str], None],
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> ThreadedAssociationServer:
    """Start the Storage/Verification SCP in background threads; call ``.shutdown()`` to stop."""
    quiet_pynetdicom()
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_associations = cfg.max_associations
    ae.maximum_pdu_size = cfg.maximum_pdu_size
    ae.network_timeout = cfg.network_timeout
    if cfg.allowed_calling_aets:
        ae.require_calling_aet = list(cfg.allowed_calling_aets)
    for sop_class in IMAGE_STORAGE + STORED_AND_SKIPPED:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(VERIFICATION, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])

    deps = _Deps(cfg, spool, jobs, audit, enqueue, new_id)
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [deps]),
        (evt.EVT_REJECTED, handle_rejected, [deps]),
    ]
    server = ae.start_server((cfg.host, cfg.port), block=False, evt_handlers=handlers)
    log.info("listener started", ae_title=cfg.ae_title, host=cfg.host, port=cfg.port)
    return server
