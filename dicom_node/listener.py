"""The DICOM SCP: receive -> persist -> record -> enqueue, and answer the modality.

pynetdicom receives each instance straight into a temporary file (chunked receive), which the
C-STORE handler makes durable in the spool (a hard link, fsync, rename) before anything else, so everything that can
fail afterwards (parsing, classification, the job table, the broker) either is recovered from
the spool (the reconciler re-enqueues QUEUED jobs) or is reported to the sender as a failure
with nothing left behind. Pixel data are never decoded here, nor even read into memory: the
listener's memory does not grow with image size.

Before the handler sees anything, :mod:`dicom_node.pdu_guard` checks the peer address, does the
TLS handshake (:mod:`dicom_node.tls`), waits (a few seconds at most) for the whole association
request before a connection takes a slot, caps the slots and unfinished requests per address, and
caps every PDU's declared length. Inside the handler the instance is inspected
(:mod:`dicom_node.inspect`: the whole header parsed, the pixel data checked against Rows x
Columns and the pixel limit without decoding, a deflated data set inflated in bounded pieces)
and classified (:mod:`dicom_node.filters`). Whatever fails lands in the quarantine with its
reason and gets 0xC000 with that reason as its Error Comment.

No patient identifiers are logged: pynetdicom's identifier logging is turned off
(:func:`dicom_node.config.configure`, which every entry point calls before serving) and our own
log lines and audit records carry only UIDs, AE titles, job ids and reasons.
"""

from __future__ import annotations

import os
import sqlite3
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.config import require_configured
from dicom_node.database import StoreUnavailable
from dicom_node.filters import OWN_RESULT, TO_RELAY, Decision, classify
from dicom_node.inspect import MAX_PIXELS, inspect_instance
from dicom_node.jobstore import Job, JobState, JobStore
from dicom_node.lookup import keyed_hash, spool_secret
from dicom_node.objects import Objects, ObjectsUnavailable, SpoolObjects, sweep_unrecorded
from dicom_node.pdu_guard import Guard, GuardedServer, parse_networks
from dicom_node.sop import BASIC_TEXT_SR, IMAGE_STORAGE, STORED_AND_SKIPPED, TRANSFER_SYNTAXES, VERIFICATION
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


@dataclass(frozen=True)
class ListenerConfig:
    """The listener's settings.

    ``maximum_pdu_size`` is the Maximum Length Received we advertise (0: as large as the guard
    allows); ``max_pdu_length`` is the guard's cap on any PDU's declared length, so it must be at
    least as large. ``allowed_addresses`` are IP addresses or networks (empty: any).
    ``association_request_timeout`` is how long a connection may take to deliver its whole
    A-ASSOCIATE-RQ before it is dropped (until then it holds no association slot);
    ``max_associations_per_address`` caps the slots one peer address holds (0: no cap) and
    ``max_pending_per_address`` the connections from one address still sending their request
    (one more evicts the oldest; 0: no cap), ``max_pending`` those from all addresses together.
    See :mod:`dicom_node.pdu_guard`.
    """

    # From [node] (worker.settings), which holds their defaults: worker.node.Node.listener_config.
    ae_title: str
    host: str
    port: int
    allowed_calling_aets: tuple[str, ...]  # empty: any
    allowed_addresses: tuple[str, ...]  # empty: any
    max_associations: int
    max_associations_per_address: int
    max_pending_per_address: int
    max_pending: int
    association_request_timeout: float
    max_pdu_length: int
    maximum_pdu_size: int = 262144
    network_timeout: float = 60.0
    tls: ssl.SSLContext | None = None
    max_pixels: int = MAX_PIXELS
    own_manufacturer: str = "medsam2-cxr"
    # Site secret of the job table's keyed hashes of Accession Number and Patient ID
    # (dicom_node.lookup); empty: the key the node made in <spool>/secrets/lookup.key.
    lookup_key: bytes = field(default=b"", repr=False)
    # SO_REUSEPORT on the listening socket: one of several listener processes on this port
    # ([node] processes); the caps above are then per process.
    reuse_port: bool = False
    # An edge's listener for its hub's results (worker/edge.py): every instance is queued as a result
    # to relay (reason TO_RELAY), not classified (a result of ours is otherwise stored and skipped).
    relay: bool = False

    def advertised_pdu_size(self) -> int:
        if self.maximum_pdu_size and self.maximum_pdu_size > self.max_pdu_length:
            raise ValueError(f"maximum_pdu_size {self.maximum_pdu_size} exceeds max_pdu_length "
                             f"{self.max_pdu_length}: peers would send PDUs the guard refuses")
        return self.maximum_pdu_size or self.max_pdu_length


@dataclass(frozen=True)
class Intake:
    """What accepting an instance needs (:func:`accept_instance`): the C-STORE handler's and
    STOW-RS's (dicom_node.stow) dependencies."""

    cfg: ListenerConfig
    spool: Spool
    jobs: JobStore
    audit: AuditLog
    enqueue: Callable[[str], None]
    new_id: Callable[[], str]
    lookup_key: bytes = field(default=b"", repr=False)
    ae_label: metrics.AeLabels = field(default_factory=metrics.AeLabels)  # calling AE -> metric label (a bounded set)
    # a Basic Text SR (not our own) is also a first reader's report: the second read's intake
    # (ris.intake via worker.cli.serve); None: stored and skipped like any SR
    on_report: Callable[[Dataset], None] | None = None
    # where the instance is kept for the workers (dicom_node.objects); None: the spool itself
    objects: Objects | None = None

    @property
    def store(self) -> Objects:
        return self.objects if self.objects is not None else SpoolObjects(self.spool)


def _calling_aet(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title or "").strip()


def _peer(event: evt.Event) -> str:
    return f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def handle_rejected(event: evt.Event, deps: Intake) -> None:
    calling = _calling_aet(event)
    allowed = deps.cfg.allowed_calling_aets
    if allowed and calling not in allowed:
        reason = "calling AE title not allowed"
    elif len([a for a in event.assoc.ae.active_associations if a.is_acceptor]) > deps.cfg.max_associations:
        reason = f"association limit of {deps.cfg.max_associations} reached"
    else:
        reason = "association rejected (called AE title or no acceptable context)"
    log.warning("association refused", calling_aet=calling, peer=_peer(event), reason=reason)
    metrics.ASSOCIATIONS_REFUSED.labels(calling_aet=deps.ae_label(calling)).inc()
    _audit_quietly(deps, "refused", calling_aet=calling, peer=_peer(event), reason=reason)


def _audit_quietly(deps: Intake, event: str, **fields: object) -> None:
    """Audit, but never let an audit failure (a full disk) change the DIMSE answer."""
    try:
        deps.audit.record(event, **fields)
    except Exception:  # noqa: BLE001
        log.exception("audit record failed", audit_event=event, job_id=fields.get("job_id"))


def _answer(status: int, comment: str) -> Dataset:
    """A C-STORE failure status with an Error Comment (0000,0902) saying why: LO, so at most 64
    characters. Quarantine reasons name tags and checks, never values, so they may go out."""
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]
    return rsp


@dataclass(frozen=True)
class Accepted:
    """What became of one instance: a C-STORE ``status``, the Error Comment that says why
    (empty: the bare status), and its job row when one was recorded."""

    status: int
    comment: str = ""
    job: Job | None = None

    def dimse(self) -> int | Dataset:
        return _answer(self.status, self.comment) if self.comment else self.status


def handle_store(event: evt.Event, deps: Intake) -> int | Dataset:
    """C-STORE: :func:`accept_instance` on the file pynetdicom received the instance into."""
    context = str(event.context.abstract_syntax) if getattr(event, "context", None) else None
    return accept_instance(deps, Path(event.dataset_path), _calling_aet(event), _peer(event), context).dimse()


def accept_instance(deps: Intake, received: Path, calling: str, peer: str, context: str | None) -> Accepted:
    """Persist first, then parse, classify, record, enqueue: one instance, whoever sent it.

    ``received`` is the finished file (it stays for its owner to remove); ``context`` the SOP
    class the sender declared (the presentation context's, or the STOW-RS part's file meta).
    Success only once the instance is in the object store (the spool's file by default) and
    the job row is durable; a store that cannot be reached refuses it with Out of Resources and
    keeps nothing of it, so the sender's retry finds the node as new.
    """
    ae = deps.ae_label(calling)
    job_id = deps.new_id()
    path = deps.spool.incoming_path(job_id)
    try:
        deps.spool.adopt(received, path)
    except OutOfSpace as exc:
        log.error("spool full, refusing instance", job_id=job_id, calling_aet=calling, error=str(exc))
        _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="spool full")
        metrics.INSTANCES_REFUSED.labels(calling_aet=ae, reason="out_of_resources").inc()
        return Accepted(OUT_OF_RESOURCES)
    except OSError as exc:
        log.error("spool write failed", job_id=job_id, calling_aet=calling, error=str(exc))
        _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="spool write failed")
        metrics.INSTANCES_REFUSED.labels(calling_aet=ae, reason="processing_failure").inc()
        return Accepted(PROCESSING_FAILURE)

    # From here the bytes are safe on disk.
    try:
        ds, reason = inspect_instance(path, context, deps.cfg.max_pixels, scratch=deps.spool.tmp)
    except OSError as exc:  # no room in tmp/ to inflate a deflated data set: the sender may retry
        path.unlink(missing_ok=True)
        log.error("inspection failed; instance refused", job_id=job_id, calling_aet=calling, error=str(exc))
        _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="spool write failed while inflating")
        metrics.INSTANCES_REFUSED.labels(calling_aet=ae, reason="out_of_resources").inc()
        return Accepted(OUT_OF_RESOURCES, "no spool space to inflate the data set")
    if reason is None:
        assert ds is not None  # inspect_instance gives a data set or a reason, never neither
        try:
            decision = (Decision(True, TO_RELAY) if deps.cfg.relay
                        else classify(ds, own_manufacturer=deps.cfg.own_manufacturer))
        except Exception as exc:  # noqa: BLE001
            reason = f"unclassifiable header: {type(exc).__name__}"
    if reason is not None:
        try:
            deps.spool.quarantine_file(path, reason, job_id, stage="listener", calling_aet=calling,
                                       peer=peer)
        except Exception:  # noqa: BLE001
            path.unlink(missing_ok=True)
            log.exception("quarantine failed; bytes dropped", job_id=job_id)
        _audit_quietly(deps, "quarantined", job_id=job_id, calling_aet=calling, peer=peer, reason=reason)
        log.warning("instance quarantined", job_id=job_id, calling_aet=calling, reason=reason)
        metrics.INSTANCES_QUARANTINED.labels(calling_aet=ae).inc()
        return Accepted(CANNOT_UNDERSTAND, reason)

    assert ds is not None
    sop_instance, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    study = str(ds.get("StudyInstanceUID", "") or "")
    key = deps.spool.relative(path)
    store = deps.store
    try:
        store.put(key, path)  # the spool's own file is the object; an S3 store gets a PUT
    except ObjectsUnavailable as exc:
        path.unlink(missing_ok=True)
        log.error("object store unavailable, refusing instance", job_id=job_id, calling_aet=calling, error=str(exc))
        _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="object store unavailable")
        metrics.INSTANCES_REFUSED.labels(calling_aet=ae, reason="out_of_resources").inc()
        return Accepted(OUT_OF_RESOURCES, "object store unavailable")
    try:
        job, _earlier = deps.jobs.add(
            job_id=job_id,
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            study_instance_uid=study,
            calling_aet=calling,
            path=key,
            state=JobState.QUEUED if decision.process else JobState.SKIPPED,
            reason=decision.reason,
            accession_hash=keyed_hash(deps.lookup_key, ds.get("AccessionNumber")),
            patient_hash=keyed_hash(deps.lookup_key, ds.get("PatientID")),
        )
    except StoreUnavailable as exc:  # the database is away: the sender retries later, as for a full spool
        if not exc.in_doubt:  # written or not? keep the bytes: the sweep at start drops them if no row names them
            path.unlink(missing_ok=True)
        log.error("job store unavailable; instance refused", job_id=job_id, error=str(exc), in_doubt=exc.in_doubt)
        _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="job store unavailable")
        metrics.INSTANCES_REFUSED.labels(calling_aet=ae, reason="out_of_resources").inc()
        return Accepted(OUT_OF_RESOURCES, "job store unavailable")
    except Exception as exc:  # noqa: BLE001 - unrecorded bytes are useless: drop them, let the sender retry
        path.unlink(missing_ok=True)
        try:
            store.delete(key)
        except OSError:  # an object no job row names: nothing ever reads it (it is not swept yet)
            log.warning("unrecorded object left in the store", job_id=job_id)
        full = isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)
        log.error("job table write failed; instance refused", job_id=job_id, error=type(exc).__name__,
                  disk_full=full)
        if full:
            _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="spool full")
        metrics.INSTANCES_REFUSED.labels(calling_aet=ae, reason="out_of_resources" if full else "processing_failure").inc()
        return Accepted(OUT_OF_RESOURCES if full else PROCESSING_FAILURE)

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
    (metrics.INSTANCES_RECEIVED if queued else metrics.INSTANCES_SKIPPED).labels(calling_aet=ae).inc()

    if deps.on_report is not None and sop_class == BASIC_TEXT_SR and decision.reason != OWN_RESULT:
        try:
            deps.on_report(ds)
        except Exception as exc:  # noqa: BLE001 - the instance is stored; the report can be sent again
            log.error("report intake failed", job_id=job.id, error=f"{type(exc).__name__}: {exc}")
    try:
        store.evict(key)  # this host's copy of an object kept elsewhere (the spool's own file stays)
    except OSError as exc:
        log.warning("local copy not removed", job_id=job.id, error=type(exc).__name__)
    if queued:
        try:
            deps.enqueue(job.id)
        except Exception as exc:  # noqa: BLE001 - the reconciler re-enqueues QUEUED jobs
            log.warning("enqueue failed; reconciler will retry", job_id=job.id, error=repr(exc))
    return Accepted(SUCCESS, job=job)


def _guard(cfg: ListenerConfig, deps: Intake) -> Guard:
    def refused(peer: str, reason: str) -> None:
        log.warning("connection refused", peer=peer, reason=reason)
        metrics.ASSOCIATIONS_REFUSED.labels(calling_aet=metrics.UNKNOWN_AE).inc()
        _audit_quietly(deps, "refused", peer=peer, reason=reason)

    def violation(peer: str, reason: str, data: bytes) -> None:
        qid = deps.new_id()
        try:
            deps.spool.quarantine(data, reason, qid, suffix="pdu", stage="listener", peer=peer)
        except Exception:  # noqa: BLE001 - a full spool must not keep the abort from going out
            log.exception("PDU quarantine failed", quarantine_id=qid)
        log.warning("PDU refused", peer=peer, reason=reason, quarantine_id=qid)
        metrics.INSTANCES_QUARANTINED.labels(calling_aet=metrics.UNKNOWN_AE).inc()
        _audit_quietly(deps, "quarantined", peer=peer, reason=reason, quarantine_id=qid)

    return Guard(max_pdu_length=cfg.max_pdu_length, allowed_networks=parse_networks(cfg.allowed_addresses),
                 tls=cfg.tls, network_timeout=cfg.network_timeout, request_timeout=cfg.association_request_timeout,
                 max_associations_per_address=cfg.max_associations_per_address,
                 max_pending_per_address=cfg.max_pending_per_address, max_pending=cfg.max_pending, on_refused=refused, on_violation=violation)


def recover_spool(spool: Spool, jobs: JobStore, objects: Objects | None = None) -> dict[str, int]:
    """Before serving: drop partial writes and instance files no job records (see Spool.sweep_*),
    and, with a remote object store, instance objects no job records (objects.sweep_unrecorded)."""
    known = lambda job_id: jobs.get(job_id) is not None  # noqa: E731
    swept = {"partial_writes": spool.sweep_tmp(), "unrecorded_instances": spool.sweep_incoming(known)}
    if objects is not None and not isinstance(objects, SpoolObjects):
        try:
            swept["unrecorded_objects"] = sweep_unrecorded(objects, known)
        except ObjectsUnavailable as exc:  # the listener serves anyway: it refuses until the store is back
            log.warning("object store unavailable at start; unrecorded objects not swept", error=str(exc))
    return swept


def start_listener(
    cfg: ListenerConfig,
    spool: Spool,
    jobs: JobStore,
    audit: AuditLog,
    enqueue: Callable[[str], None],
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    on_report: Callable[[Dataset], None] | None = None,
    recover: bool = True,
    objects: Objects | None = None,
) -> GuardedServer:
    """Start the Storage/Verification SCP in background threads; call ``.shutdown()`` to stop.

    With ``recover`` it sweeps the spool's partial writes on start, so only one such listener may
    serve a spool; the further processes of ``[node] processes`` start with ``recover=False``
    after the first one swept (worker.cli.serve), and so does an edge's listener for its hub (worker/edge.py).
    """
    require_configured()  # chunked receive, no identifiers in pynetdicom's logs (dicom_node.config)
    if recover:
        swept = recover_spool(spool, jobs, objects)
        if any(swept.values()):
            log.warning("spool recovered after an unclean stop", **swept)
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_associations = cfg.max_associations
    ae.maximum_pdu_size = cfg.advertised_pdu_size()
    ae.network_timeout = cfg.network_timeout
    if cfg.allowed_calling_aets:
        ae.require_calling_aet = list(cfg.allowed_calling_aets)
    for sop_class in IMAGE_STORAGE + STORED_AND_SKIPPED:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(VERIFICATION, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])

    deps = Intake(cfg, spool, jobs, audit, enqueue, new_id, cfg.lookup_key or spool_secret(spool.root, "lookup"),
                 on_report=on_report, ae_label=metrics.AeLabels(cfg.allowed_calling_aets), objects=objects)
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [deps]),
        (evt.EVT_REJECTED, handle_rejected, [deps]),
    ]
    server = cast(GuardedServer, ae.make_server((cfg.host, cfg.port), evt_handlers=handlers,
                                                server_class=GuardedServer, guard=_guard(cfg, deps),
                                                reuse_port=cfg.reuse_port))
    thread = threading.Thread(target=server.serve_forever, name=f"listener@{cfg.port}", daemon=True)
    thread.start()
    ae._servers.append(server)  # so ae.shutdown() also stops it, as with ae.start_server
    log.info("listener started", ae_title=cfg.ae_title, host=cfg.host, port=cfg.port, tls=cfg.tls is not None,
             max_associations=cfg.max_associations, max_associations_per_address=cfg.max_associations_per_address,
             reuse_port=cfg.reuse_port, pid=os.getpid())
    return server
