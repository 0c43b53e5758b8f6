"""The edge role ([node] role = "edge"): an island site without a GPU, served by a hub node.

The island PACS routes to the edge's listener as it would to a node. Each frontal chest image is
de-identified here (dicom_node.deid: PS3.15 Basic profile with dicognito, keyed so the same patient,
study and UIDs always get the same pseudonyms) and forwarded to the hub over DICOM TLS. The hub runs
the model and sends its results, by its route for this edge's AE title, to the edge's second
listener ([edge] host:port, TLS, the hub's AE title only). Each result is re-identified from
``<spool>/reid.sqlite``, which never leaves the edge, and stored into the PACS of the source's
route, in the source's study.

No model, no GPU, no Celery worker: one relay thread beside the listeners works through the job
table, which stays the truth. A source job goes queued -> inferring (claimed: being forwarded) ->
done ("forwarded to the hub"); a result job queued -> sending -> done. What cannot reach the hub
or the PACS is given back and tried again every [edge] retry_every_s, so a link that is down loses
nothing; an instance that cannot be de-identified or re-identified is FAILED with the reason.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydicom
import structlog
import typer

from dicom_node import deid
from dicom_node.audit import AuditLog
from dicom_node.destinations import open_destination
from dicom_node.filters import TO_RELAY
from dicom_node.identifiers import describe, identifiers
from dicom_node.jobstore import Job, JobState, JobStore
from dicom_node.sender import DeliveryFailed, ResultDestination
from dicom_node.spool import Spool
from worker.node import Node

log = structlog.get_logger()

FORWARDED = "forwarded to the hub"
STORED = "re-identified and stored"
REID_FILE = "reid.sqlite"


@dataclass
class Relay:
    """One pass over the job table forwards what is queued from the PACS and stores what came
    back from the hub. Side effects are passed in: the destinations, the clock of the job store."""

    jobs: JobStore
    spool: Spool
    audit: AuditLog
    reid: deid.ReidentificationMap
    key: str
    hub: ResultDestination
    destination_for: Callable[[str], ResultDestination]  # the source's calling AE -> its PACS
    calling_ae: str
    lease_s: float = 120.0
    timeout_s: float = 30.0
    allow_burned_in_annotation: bool = False

    def run_once(self) -> int:
        """Try every job that waits (and every claim whose lease ran out); how many were finished."""
        done = 0
        for state in (JobState.QUEUED, JobState.INFERRING, JobState.SENDING):
            for job in self.jobs.by_state(state):
                done += self.step(job)
        return done

    def step(self, job: Job) -> int:
        result = job.reason == TO_RELAY
        claimed = JobState.SENDING if result else JobState.INFERRING
        got = self.jobs.claim(job.id, JobState.QUEUED, claimed, self.lease_s)
        if got is None:
            return 0  # another pass has it, or it moved on
        path = self.spool.root / job.path
        ds = None
        try:
            ds = pydicom.dcmread(path)
            if result:
                out = deid.reidentify(ds, self.reid)
                dest = self._pacs_for(out)
                what, event, reason = "store", "sent", STORED
            else:
                out = deid.forward(ds, self.key, self.reid, self.allow_burned_in_annotation)
                dest, what, event, reason = self.hub, "forward", "exported", FORWARDED
            tmp = self.spool.tmp / f"edge-{job.id}.dcm"
            out.save_as(tmp, enforce_file_format=True)
            try:
                dest.store([tmp], calling_ae=self.calling_ae, timeout=self.timeout_s)
            finally:
                tmp.unlink(missing_ok=True)
        except (DeliveryFailed, OSError) as exc:  # the link or the PACS is away: try again later
            self.jobs.release(job.id, claimed, JobState.QUEUED)
            log.warning("edge.retry_later", job_id=job.id, step="store" if result else "forward",
                        error=describe(exc, identifiers(ds)))
            return 0
        except Exception as exc:  # noqa: BLE001 - a defect in this instance: final until resent
            reason_failed = describe(exc, identifiers(ds))
            self.jobs.advance(job.id, claimed, JobState.FAILED, reason_failed)
            self.audit.record("job_failed", job_id=job.id, reason=reason_failed)
            log.error("edge.failed", job_id=job.id, step="store" if result else "forward", reason=reason_failed)
            return 0
        self.jobs.advance(job.id, claimed, JobState.DONE, reason)
        self.audit.record(event, job_id=job.id, destination=str(dest), reason=reason)
        log.info("edge." + what, job_id=job.id, destination=str(dest))
        return 1

    def _pacs_for(self, result: pydicom.Dataset) -> ResultDestination:
        """The PACS of the route the source came by: the caller of the study's first source job."""
        study = str(result.get("StudyInstanceUID", ""))
        callers = [j.calling_aet for j in self.jobs.for_study(study, None) if j.reason != TO_RELAY]
        return self.destination_for(callers[0] if callers else "")


def relay_for(node: Node) -> Relay:
    """The edge's relay from its settings: the hub over TLS, the re-identification table in the spool."""
    s = node.settings
    e = s.edge
    key = node.secret("deid", e.deid_secret)
    return Relay(jobs=node.jobs, spool=node.spool, audit=node.audit, reid=deid.ReidentificationMap(node.layout.root / REID_FILE),
                 key=key.hex() if not e.deid_secret else e.deid_secret, hub=open_destination(e.hub),
                 destination_for=node.destination_for, calling_ae=s.node.ae_title, lease_s=s.worker.lease_s,
                 timeout_s=s.sender.timeout_s, allow_burned_in_annotation=e.allow_burned_in_annotation)


def serve_edge(node: Node) -> None:
    """The edge's listeners and relay in this process until SIGTERM or SIGINT."""
    from dicom_node.listener import start_listener
    from dicom_node.tls import server_context

    s = node.settings
    e = s.edge
    stop, wake = threading.Event(), threading.Event()

    def stopping(*_: object) -> None:
        stop.set()
        wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stopping)
    relay = relay_for(node)
    released = node.jobs.release_claims()  # left by an edge that was killed
    if released:
        log.warning("edge.claims_released", jobs=released)
    pacs_side = start_listener(node.listener_config(), node.spool, node.jobs, node.audit, lambda _job: wake.set())
    hub_cfg = node.listener_config(host=e.host, port=e.port, allowed_calling_aets=(e.hub.ae_title,), relay=True,
                                   tls=server_context(e.tls.cert, e.tls.key, e.tls.ca or None, e.tls.require_client_cert))
    hub_side = start_listener(hub_cfg, node.spool, node.jobs, node.audit, lambda _job: wake.set(), recover=False)
    node.audit.record("application_start", ae_title=s.node.ae_title, port=s.node.port, pid=os.getpid())
    d = s.destination
    typer.echo(f"medsam2-cxr edge listening: AE title {s.node.ae_title}, port {s.node.port}; forwards de-identified "
               f"to {e.hub.ae_title}@{e.hub.host}:{e.hub.port} (TLS); the hub's results arrive on port {e.port} (TLS) "
               f"and go to {d.ae_title}@{d.host}:{d.port}; spool {s.spool}", err=True)
    try:
        while not stop.is_set():
            wake.clear()
            try:
                relay.run_once()
            except Exception:  # noqa: BLE001 - e.g. a locked job table: the next pass tries again
                log.exception("edge.relay_error")
            wake.wait(e.retry_every_s)
    finally:
        pacs_side.shutdown()
        hub_side.shutdown()
        node.jobs.release_claims()
        node.audit.record("application_stop", ae_title=s.node.ae_title, pid=os.getpid())
        log.info("edge.stopped")


def refuse_worker(path: Path | None) -> None:
    """An edge runs no model: `worker` on an edge's configuration is a mistake, said plainly."""
    typer.echo(f"{path or 'the configuration'}: [node] role = \"edge\" runs no worker (no model: the hub runs "
               "it); `medsam2-cxr up` runs the edge's listeners and relay", err=True)
    raise typer.Exit(2)
