"""The pipeline as plain functions: no Celery here. Tasks, `up` and the offline `infer` call them.

infer_jobs: received image -> predictor (a batch) -> prediction files in the object store.
deliver_job: prediction -> SR + SC (+ a text SR with the draft report when a similar cases index is
configured; deterministic UIDs) -> C-STORE -> done or dead letter. In shadow mode the results stay
in the spool (or go to the QA destination only) and the job ends done with reason "shadow".
Each step claims its job in the job store first, so a duplicate message does nothing.
Instances, predictions and results are objects (dicom_node.objects): the spool's own files by
default; with [objects] url an S3 store, each step fetching what it reads into this host's spool
(its scratch), putting what it writes, and dropping the local copies when the job is done.
An error that will not go away (worker.failures) ends the job at once in FAILED, with its reason,
audited and logged; a transient one gives the job back for the reconciler to retry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import structlog
from pydicom import Dataset

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.encoders.header import clean_header
from dicom_node.encoders.ko import encode_ko
from dicom_node.encoders.pr import encode_pr
from dicom_node.encoders.sc import encode_sc
from dicom_node.encoders.sr import encode_sr
from dicom_node.encoders.text import encode_text_sr
from dicom_node.identifiers import describe, identifiers_of
from dicom_node.jobstore import FINAL_FAILURES, Job, JobState, JobStore
from dicom_node.objects import Objects, ObjectsUnavailable, SpoolObjects
from dicom_node.sender import DeliveryFailed, Destination, Priority, ResultDestination
from dicom_node.spool import OutOfSpace, Spool
from dicom_node.uids import ResultUIDs
from models import drift
from models.prediction import ModelIdentity, Prediction
from models.preprocess import read_image
from models.urgency import DEFAULT_RULES, Urgency, assess
from ris.delivery import deliver_results
from worker.clock import SYSTEM, Clock
from worker.decoding import model_input
from worker.failures import is_transient

if TYPE_CHECKING:
    from index.draft import Draft
    from ris.content import ReportContent
    from ris.delivery import Reports

log = structlog.get_logger()

PREDICTION = "prediction.json"
SALIENCY = "saliency.npz"
SR_FILE = "sr.dcm"
SC_FILE = "sc.dcm"
TEXT_FILE = "text.dcm"  # Basic Text SR with the draft report, when a similar cases index is configured
PR_FILE = "pr.dcm"  # Grayscale Softcopy Presentation State: the outlines a viewer can toggle
KO_FILE = "ko.dcm"  # Key Object Selection "Of Interest", urgent studies only (models.urgency)

# prediction, bundle digest -> draft report with similar cases (index.draft.Reporter)
Reporter = Callable[[Prediction, str], "Draft"]


@dataclass
class Context:
    """The side effects a pipeline step needs, passed in so tests can swap them."""

    spool: Spool
    jobs: JobStore
    audit: AuditLog
    lease_s: float = 120.0
    send_lease_s: float | None = None  # SENDING claims; must outlast the sender's retries (None: lease_s)
    clock: Clock = SYSTEM  # UTC datetimes for the results, epoch seconds for timings (worker.clock)
    reporter: Reporter | None = None  # similar cases + draft report; None: no index configured
    language: str = "en"  # of the draft and the notices in the results ([report] language)
    reports: Reports | None = None  # RIS (HL7) and FHIR targets of the routes (ris.delivery); None: the PACS only
    urgent_rules: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_RULES))  # [urgent] rules
    # the second read (ris.intake.SecondReader.job_inferred): a new prediction against its study's reports
    second_read: Callable[[Job], object] | None = None
    # [node] mode = "shadow": results are encoded and kept in the spool, never sent to the PACS, RIS or FHIR
    # server; only qa_destination ([node.qa_destination]), when given, receives the DICOM results.
    shadow: bool = False
    qa_destination: ResultDestination | None = None
    # calling AE title -> the bounded `site` label of the drift metrics ([node] allowed_calling_aets and the
    # DICOMweb clients are their own labels; without an allow list the first 64 titles are)
    site_label: Callable[[str], str] = field(default_factory=metrics.AeLabels)
    # where instances, predictions and results are kept (dicom_node.objects); None: the spool itself
    objects: Objects | None = None

    def __post_init__(self) -> None:
        if self.objects is None:
            self.objects = SpoolObjects(self.spool)

    @property
    def store(self) -> Objects:
        """The object store (``objects``, set in __post_init__)."""
        assert self.objects is not None
        return self.objects

    def key(self, path: Path) -> str:
        """The object key of a path in this host's spool (the same relative path)."""
        return self.spool.relative(path)

    def source(self, job: Job) -> Path:
        """The job's received instance as a local file (fetched from the object store when remote)."""
        return self.store.fetch(job.path)

    def evict(self, job: Job) -> None:
        """Drop this host's copies of a finished job's objects (none with the spool as the store)."""
        folder = self.spool.results / job.id
        for key in [job.path, *((self.key(f) for f in folder.iterdir()) if folder.is_dir() else ())]:
            try:
                self.store.evict(key)
            except OSError as exc:
                log.warning("objects.evict_failed", job=job.id, error=type(exc).__name__)


# ---------------------------------------------------------------- results, shared with `infer`

def result_files(folder: Path, reporter: bool, urgent: bool) -> list[Path]:
    """The files encode_results' objects go to, in its order."""
    return ([folder / SR_FILE, folder / SC_FILE] + ([folder / TEXT_FILE] if reporter else []) + [folder / PR_FILE]
            + ([folder / KO_FILE] if urgent else []))


def encode_results(source: Dataset, image: np.ndarray, prediction: Prediction, model: ModelIdentity,
                   now: dt.datetime, reporter: Reporter | None = None, language: str = "en",
                   urgency: Urgency | None = None) -> list[Dataset]:
    """SR, SC, (text SR,) GSPS (, KOS) for one source image, with UIDs derived from the source and the bundle.

    With a reporter (a similar cases index), the SR also carries the draft report and similar
    cases, and a Basic Text SR with the draft comes third; without one the SR says so. The
    presentation state with the outlines follows; an urgent study (`urgency`, else the default
    rules) ends with a Key Object Selection of the image (result_files names them). Values the
    source header holds invalid are repaired or left out by their type (encoders.header) and
    logged by tag; a missing Type 1 reference raises HeaderError.
    language: of the notices in the SRs ([report] language); the reporter drafts in the same one.
    The SC's burned-in notices stay English (its overlay font has Latin glyphs only).
    """
    from index.wording import wording_for

    repairs = clean_header(source).repairs
    if repairs:  # what the results did not copy as received, by tag and rule (never a value)
        log.warning("encode.source_header_repaired", sop_instance_uid=str(source.SOPInstanceUID),
                    repairs=[str(r) for r in repairs])
    wording = wording_for(language)
    uids = ResultUIDs.for_model(source.StudyInstanceUID, source.SOPInstanceUID, model)
    draft = reporter(prediction, model.digest) if reporter is not None else None
    out: list[Dataset] = [encode_sr(source, prediction, model, uids, now, draft=draft, wording=wording),
           encode_sc(source, image, prediction, model, uids, now)]
    if draft is not None:
        out.append(encode_text_sr(source, prediction, model, draft, uids, now, wording=wording))
    out.append(encode_pr(source, image, prediction, model, uids, now))
    urgency = urgency if urgency is not None else assess(prediction)
    if urgency.is_urgent:
        out.append(encode_ko(source, urgency, model, uids, now))
    return out


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def save_prediction(store: Spool | Objects, folder: Path, prediction: Prediction, model: ModelIdentity,
                    urgency: Urgency | None = None) -> None:
    """prediction.json (findings, OOD, model, and the study's urgency: decided once, here) and the saliency maps,
    into the object store (a Spool: its own files) at the keys of ``folder``, a folder of its spool."""
    objects = SpoolObjects(store) if isinstance(store, Spool) else store
    urgency = urgency if urgency is not None else assess(prediction)
    body = {**prediction.to_json(), "urgency": urgency.to_json(), "model": dataclasses.asdict(model),
            "center": prediction.center.tolist(), "radius": prediction.radius.tolist()}
    buf = io.BytesIO()
    np.savez_compressed(buf, **prediction.saliency)  # type: ignore[arg-type]  # numpy's stub: **kwds as allow_pickle
    objects.put(objects.local.relative(folder / SALIENCY), buf.getvalue())
    objects.put(objects.local.relative(folder / PREDICTION), json.dumps(body, indent=1).encode())


def load_prediction(folder: Path) -> tuple[Prediction, ModelIdentity]:
    body = json.loads((folder / PREDICTION).read_text())
    with np.load(folder / SALIENCY) as z:
        saliency = {k: z[k] for k in z.files}
    return Prediction.from_json(body, saliency=saliency), ModelIdentity(**body["model"])


def load_urgency(folder: Path, prediction: Prediction) -> Urgency:
    """The urgency saved with the prediction (the rules in force at inference); the default rules
    for a prediction saved before urgency was recorded."""
    saved = json.loads((folder / PREDICTION).read_text()).get("urgency")
    if saved is None:
        return assess(prediction)
    by_label = {f.label: f for f in prediction.findings}
    return Urgency(tuple(by_label[k] for k in saved["findings"]), bool(saved["confidence_validated"]))


# ---------------------------------------------------------------- failures

def _where(exc: BaseException, frames: int = 3) -> str:
    """The innermost frames of a traceback as file:line function: where to look, with no values."""
    tb = traceback.extract_tb(exc.__traceback__)[-frames:]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(tb))


def fail_job(ctx: Context, job: Job, claimed: JobState, stage: str, what: str, exc: BaseException,
             redact: Sequence[str] | None = None, **extra: object) -> bool:
    """End a claimed job in FAILED: the reason says what failed and the exception's type and
    message (patient identifiers of its source, or `redact`, taken out), audited as a serious
    failure and logged once. False when the job was no longer ours (its lease ran out and another
    worker took it). Nothing retries it; ``medsam2-cxr resend`` brings it back."""
    if redact is None:
        try:
            redact = identifiers_of(ctx.source(job))
            ctx.store.evict(job.path)  # fetched only to read its identifiers (an S3 store)
        except OSError:  # the store is away or the instance gone: nothing read, nothing to redact from it
            redact = []
    reason = f"{what}: {describe(exc, redact)}"
    if not ctx.jobs.advance(job.id, claimed, JobState.FAILED, reason=reason):
        log.warning("job.failed_not_ours", job=job.id, stage=stage, error=type(exc).__name__)
        return False
    ctx.audit.record("job_failed", job=job.id, sop_instance_uid=job.sop_instance_uid, stage=stage,
                     error=type(exc).__name__, reason=reason, **extra)
    metrics.JOBS_FAILED.labels(stage=stage).inc()
    log.error("job.failed", job=job.id, sop_instance_uid=job.sop_instance_uid, stage=stage,
              error=type(exc).__name__, reason=reason, at=_where(exc))
    return True


# ---------------------------------------------------------------- the GPU step

def _predict_each(predictor, images: list) -> list:
    """The batch's predictions; when the batch raises, each image alone, so that only the images
    that raise by themselves fail. Each entry is a Prediction or the exception of its image."""
    try:
        out = list(predictor.predict(images))
        if len(out) != len(images):
            raise ValueError(f"the predictor returned {len(out)} predictions for {len(images)} images")
        return out
    except Exception as exc:  # noqa: BLE001 - decided per image below
        if len(images) == 1:
            return [exc]
        log.warning("infer.batch_failed", images=len(images), error=type(exc).__name__, at=_where(exc))
        return [_predict_each(predictor, [image])[0] for image in images]


def _fetch(ctx: Context, job: Job) -> BaseException | None:
    """Bring the job's instance to its path in this host's spool; the error when it cannot be."""
    try:
        ctx.source(job)
    except Exception as exc:  # noqa: BLE001 - ObjectsUnavailable gives the job back, a missing one fails it
        return exc
    return None


def _failed(exc: BaseException) -> Future:
    future: Future = Future()
    future.set_exception(exc)
    return future


def _submit(decode: Executor, path: str, size: int) -> Future:
    """model_input in the decode pool; a pool that cannot take it (broken: one of its processes
    was killed) gives a future holding that error, decided per job like any decode error."""
    try:
        return decode.submit(model_input, path, size)
    except Exception as exc:  # noqa: BLE001 - e.g. BrokenProcessPool, transient (worker.failures)
        return _failed(exc)


def infer_jobs(job_ids: Sequence[str], ctx: Context, predictor, enqueue_send: Callable[[str], None],
               forward_lock: threading.Lock | None = None, decode: Executor | None = None,
               stopping: Callable[[], bool] | None = None) -> list[str]:
    """Claim, load, predict as one batch, persist; returns the jobs that were inferred.

    An image that cannot be decoded fails (FAILED, reason, audited, its file quarantined); when
    the batch's forward raises, each image is tried alone and only those that raise alone fail.
    The rest go on. A transient error (worker.failures) gives its job back to QUEUED and is raised
    once the others are done.
    `forward_lock`, when batches run in threads, lets one forward run at a time (infer_waiting);
    `decode` runs model_input for the batch's images in parallel (decoding a radiograph costs more
    than its forward on a GPU). When `stopping()` (the worker is shutting down) is true by the
    time the forward could start, the batch's jobs are given back uncounted and nothing runs.
    """
    jobs = []
    for job_id in job_ids:
        job = ctx.jobs.claim(job_id, JobState.QUEUED, JobState.INFERRING, ctx.lease_s)
        if job is None:
            log.info("infer.not_claimed", job=job_id)  # done already, or another worker has it
            continue
        jobs.append(job)

    size = predictor.bundle.image_size
    paths = [str(ctx.spool.root / job.path) for job in jobs]
    fetched = [_fetch(ctx, job) for job in jobs]  # None, or why the instance is not here (decided below)
    loading = [_failed(missing) if missing is not None else _submit(decode, path, size) if decode else None
               for path, missing in zip(paths, fetched)]
    claimed, images = [], []
    transient: list[BaseException] = []

    def give_back(job: Job, exc: BaseException) -> None:
        ctx.jobs.release(job.id, JobState.INFERRING, JobState.QUEUED)
        log.warning("infer.released", job=job.id, error=type(exc).__name__)
        transient.append(exc)

    for job, path, future in zip(jobs, paths, loading):
        try:
            images.append(future.result() if future else model_input(path, size))
            claimed.append(job)
        except Exception as exc:  # noqa: BLE001 - decided by worker.failures
            if is_transient(exc):
                give_back(job, exc)
                continue
            redact = identifiers_of(path)
            where = ctx.spool.quarantine_dir / f"{job.id}.dcm"
            if fail_job(ctx, job, JobState.INFERRING, "decode", "cannot read image", exc, redact,
                        quarantined=ctx.spool.relative(where)):
                try:  # the bytes the model cannot take leave the incoming folder; resend brings them back
                    ctx.spool.quarantine_file(ctx.spool.root / job.path, f"cannot read image: {describe(exc, redact)}",
                                              job.id, stage="worker", calling_aet=job.calling_aet)
                    ctx.store.delete(job.path)  # an S3 store's object (the spool's file moved already)
                except OSError:
                    log.exception("infer.quarantine_failed", job=job.id)
    predictions: list = []
    if claimed:
        with forward_lock or contextlib.nullcontext():
            if stopping is not None and stopping():
                for job in claimed:
                    ctx.jobs.release(job.id, JobState.INFERRING, JobState.QUEUED)
                log.info("infer.released_for_shutdown", jobs=len(claimed))
                claimed = []
            else:
                t0 = time.perf_counter()
                predictions = _predict_each(predictor, images)
                step = time.perf_counter() - t0
                seconds = step / len(claimed)
                metrics.MODEL_STEP.observe(step)
                metrics.BATCH_SIZE.observe(len(claimed))
        model = predictor.bundle.identity()
    done = []
    for i, (job, pred) in enumerate(zip(claimed, predictions)):
        if isinstance(pred, BaseException):
            if is_transient(pred):
                give_back(job, pred)
            else:
                fail_job(ctx, job, JobState.INFERRING, "infer", "inference failed", pred)
            continue
        try:
            urgency = assess(pred, ctx.urgent_rules)
            save_prediction(ctx.store, ctx.spool.result_dir(job.id), pred, model, urgency)
        except (OutOfSpace, ObjectsUnavailable):  # a full spool, a store away: give the unsaved jobs back now,
            # not when their lease runs out
            for rest in claimed[i:]:
                ctx.jobs.release(rest.id, JobState.INFERRING, JobState.QUEUED)
            raise
        except Exception as exc:  # noqa: BLE001 - decided by worker.failures
            if is_transient(exc):
                give_back(job, exc)
            else:
                fail_job(ctx, job, JobState.INFERRING, "infer", "cannot save prediction", exc)
            continue
        with contextlib.suppress(OSError):
            ctx.store.evict(job.path)  # this host's copy; the io step fetches it again where it runs
        if ctx.jobs.advance(job.id, JobState.INFERRING, JobState.INFERRED):
            figures = drift.image_figures(pred)  # the console's daily drift figures read them back (models.drift)
            ctx.audit.record("inferred", job=job.id, sop_instance_uid=job.sop_instance_uid, model_digest=model.digest,
                             seconds=round(seconds, 3), batch=len(claimed), out_of_distribution=pred.out_of_distribution,
                             present=figures["present"], urgent=urgency.labels, calling_aet=job.calling_aet,
                             mean_radius=round(figures["mean_radius"], 6))
            metrics.record_prediction(model.digest, pred, urgency.is_urgent)
            metrics.record_drift(model.digest, ctx.site_label(job.calling_aet), pred)
            done.append(job.id)
            if ctx.second_read is not None:
                try:
                    ctx.second_read(job)
                except Exception as exc:  # noqa: BLE001 - the results go out all the same; the report stays kept
                    log.error("second read failed", job_id=job.id, error=f"{type(exc).__name__}: {exc}")
            _enqueue(enqueue_send, job.id)
    if transient:
        raise transient[0]
    return done


def infer_waiting(job_id: str, ctx: Context, predictor, enqueue_send: Callable[[str], None], batch_size: int = 16,
                  gather_s: float = 0.005, sleep: Callable[[float], None] = time.sleep,
                  decode: Executor | None = None, stopping: Callable[[], bool] = lambda: False) -> list[str]:
    """Infer `job_id` together with the jobs waiting behind it, in batches, until none wait or
    `stopping()` says the worker is shutting down (then a batch not yet in its forward is given
    back, see infer_jobs, and the rest stay queued: SIGTERM stops a worker within one forward).

    The job store says what waits (oldest first); infer_jobs claims each job as before, so the
    broker messages of jobs taken here find nothing to claim later and do nothing. Two batches
    are in flight: while one runs its forward, the next is read and decoded (by `decode`, the
    worker's decode processes; two threads when none is given) and the one before it is written. The first batch waits up to `gather_s` to fill. Messages
    to the io queue go out from the calling thread only (a kombu connection is not thread-safe).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    forward = threading.Lock()
    taken: set[str] = set()

    def gather(first: list[str]) -> list[str]:
        # Up to two batches may be taken but not yet claimed (still queued): look past them.
        more = [j for j in ctx.jobs.waiting(3 * batch_size) if j not in taken and j not in first]
        return (first + more)[:batch_size]

    batch = gather([job_id])
    if len(batch) < batch_size and gather_s > 0:
        sleep(gather_s)
        batch = gather(batch)
    done: list[str] = []
    inflight: deque[Future] = deque()
    owed: queue.SimpleQueue[str] = queue.SimpleQueue()  # inferred, send not yet enqueued

    errors: list[BaseException] = []

    def finish(future: Future) -> None:
        try:
            done.extend(future.result())
        except Exception as exc:  # noqa: BLE001 - a transient error (its jobs were given back): raised below
            errors.append(exc)
        finally:
            while not owed.empty():
                _enqueue(enqueue_send, owed.get())

    with ThreadPoolExecutor(2, thread_name_prefix="infer") as pool, \
            (contextlib.nullcontext(decode) if decode else ThreadPoolExecutor(2, thread_name_prefix="decode")) as decode:
        while batch and not errors and not stopping():  # after an error no new batch: the one in flight finishes
            taken.update(batch)
            inflight.append(pool.submit(infer_jobs, batch, ctx, predictor, owed.put, forward, decode, stopping))
            if len(inflight) == 2:
                finish(inflight.popleft())
            batch = gather([])
        while inflight:
            finish(inflight.popleft())
    if errors:
        raise errors[0]
    return done


# ---------------------------------------------------------------- the IO step

def report_content(ctx: Context, jobs: Sequence[Job], reports: Reports) -> ReportContent:
    """The report of a study for the RIS and FHIR server: every job given that has a prediction in the
    spool (the study's inferred images; ``jobs`` the oldest first), from their source headers,
    predictions and text SRs. Urgent when any image is."""
    from ris.content import Inferred, gather

    images = []
    for job in jobs:
        folder = ctx.spool.result_dir(job.id)
        ctx.store.fetch_prefix(ctx.key(folder))  # its prediction and text SR (an S3 store)
        if not (folder / PREDICTION).exists():
            continue  # failed before inference, or its prediction is not written yet
        prediction, model = load_prediction(folder)
        urgent = bool(reports.urgency(prediction)) if reports.urgency is not None else False
        images.append(Inferred(job.id, ctx.source(job), prediction, model, folder / TEXT_FILE, urgent))
    return gather(images, ctx.clock.now(), ctx.language)


def deliver_job(job_id: str, ctx: Context, destination_for: Callable[[str], ResultDestination],
                send: Callable[[list[Path], ResultDestination], None]) -> JobState | None:
    """Encode (if not yet) and send the results of one job; dead-letter them on final failure.

    `send` does its own retries (dicom_node.sender.send_with_retry) and raises DeliveryFailed
    after the last attempt: the results are dead-lettered. Any other error while encoding or
    sending ends the job in FAILED at once when it will not go away, or gives it back to INFERRED
    and is raised when it may (worker.failures). Returns the job's new state, or None when the
    job was not ours.
    """
    job = ctx.jobs.claim(job_id, JobState.INFERRED, JobState.SENDING, ctx.send_lease_s or ctx.lease_s)
    if job is None:
        log.info("deliver.not_claimed", job=job_id)
        return None
    folder = ctx.spool.result_dir(job_id)
    files: list[Path] = []
    urgency = Urgency((), True)
    stage = "encode"
    try:
        ctx.store.fetch_prefix(ctx.key(folder))  # the prediction, and results encoded before (an S3 store)
        prediction, model = load_prediction(folder)
        urgency = load_urgency(folder, prediction)
        files = result_files(folder, ctx.reporter is not None, urgency.is_urgent)
        kept = set(ctx.store.keys(ctx.key(folder)))
        if not all(ctx.key(f) in kept for f in files):
            source = pydicom.dcmread(ctx.source(job))
            results = encode_results(source, read_image(source), prediction, model, ctx.clock.now(), ctx.reporter,
                                     ctx.language, urgency)
            for path, ds in zip(files, results, strict=True):
                ctx.spool.write_atomic(path, to_bytes(ds))
                ctx.store.put(ctx.key(path), path)  # the spool's file is the object; else a PUT
        stage = "send"
        if ctx.shadow:
            return _shadow(ctx, job, files, urgency, send)
        dest = destination_for(job.calling_aet)
        if urgency.is_urgent and isinstance(dest, Destination):  # every result of the study goes first at
            dest = dataclasses.replace(dest, priority=Priority.HIGH)  # the PACS (STOW-RS has no priority)
        t0 = time.perf_counter()
        # the PACS, then the route's RIS and FHIR server
        deliver_results(ctx, job, files, dest, send, lambda reports, jobs: report_content(ctx, jobs, reports))
    except DeliveryFailed as exc:
        where = ctx.spool.dead_letter(job_id, files, str(exc))
        ctx.jobs.advance(job_id, JobState.SENDING, JobState.DEAD, reason=str(exc))
        metrics.DEAD_LETTERS.labels(destination=metrics.destination_label(dest)).inc()
        ctx.audit.record("dead_letter", job=job_id, sop_instance_uid=job.sop_instance_uid, destination=dest.ae_title,
                         reason=str(exc), folder=str(where))
        log.error("deliver.dead_letter", job=job_id, destination=dest.ae_title)
        return JobState.DEAD
    except Exception as exc:  # noqa: BLE001 - decided by worker.failures
        if is_transient(exc):
            # e.g. a full spool: the reconciler retries it, not a claim that outlasts every send retry
            ctx.jobs.release(job_id, JobState.SENDING, JobState.INFERRED)
            raise
        what = "cannot encode results" if stage == "encode" else "cannot send results"
        return JobState.FAILED if fail_job(ctx, job, JobState.SENDING, stage, what, exc) else None
    sent_s = time.perf_counter() - t0
    ctx.jobs.advance(job_id, JobState.SENDING, JobState.DONE)
    since_received = ctx.clock.time() - job.created_at
    metrics.SEND.labels(destination=metrics.destination_label(dest)).observe(sent_s)
    metrics.TIME_TO_STORED.observe(since_received)
    ctx.audit.record("sent", job=job_id, sop_instance_uid=job.sop_instance_uid, destination=dest.ae_title,
                     results=[pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files],
                     seconds=round(sent_s, 3), since_received=round(since_received, 3), urgent=urgency.labels)
    ctx.evict(job)
    return JobState.DONE


SHADOW_REASON = "shadow"  # the reason of a job done in shadow mode (the console and status show it)


def _shadow(ctx: Context, job: Job, files: list[Path], urgency: Urgency,
            send: Callable[[list[Path], ResultDestination], None]) -> JobState | None:
    """Shadow mode's end of a claimed job whose results are in the spool: nothing to the PACS, RIS
    or FHIR server; the DICOM results to the QA destination when one is configured (a refusal after
    the last retry dead-letters them, as for the PACS). Done with reason "shadow", audited "shadow"."""
    qa = ctx.qa_destination
    t0 = time.perf_counter()
    if qa is not None:
        if urgency.is_urgent and isinstance(qa, Destination):
            qa = dataclasses.replace(qa, priority=Priority.HIGH)
        try:
            send(files, qa)
        except DeliveryFailed as exc:
            where = ctx.spool.dead_letter(job.id, files, str(exc))
            ctx.jobs.advance(job.id, JobState.SENDING, JobState.DEAD, reason=str(exc))
            metrics.DEAD_LETTERS.labels(destination=metrics.destination_label(qa)).inc()
            ctx.audit.record("dead_letter", job=job.id, sop_instance_uid=job.sop_instance_uid,
                             destination=qa.ae_title, reason=str(exc), folder=str(where), shadow=True)
            log.error("deliver.dead_letter", job=job.id, destination=qa.ae_title, shadow=True)
            return JobState.DEAD
    reason = SHADOW_REASON + (f": results to the QA destination {qa.ae_title}" if qa is not None else
                              ": results kept in the spool")
    results = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    kept = [ctx.spool.relative(f) for f in files]
    if not ctx.jobs.advance(job.id, JobState.SENDING, JobState.DONE, reason=reason):
        log.warning("deliver.shadow_not_ours", job=job.id)
        return None
    metrics.SHADOW_JOBS.labels(qa="none" if qa is None else metrics.destination_label(qa)).inc()
    ctx.audit.record("shadow", job=job.id, sop_instance_uid=job.sop_instance_uid, results=results, files=kept,
                     qa_destination=None if qa is None else qa.ae_title,
                     seconds=round(time.perf_counter() - t0, 3), urgent=urgency.labels)
    log.info("deliver.shadow", job=job.id, results=len(files), qa_destination=None if qa is None else qa.ae_title)
    ctx.evict(job)
    return JobState.DONE


def resend(job_id: str, ctx: Context, enqueue_send: Callable[[str], None],
           enqueue_infer: Callable[[str], None] | None = None, user: str | None = None) -> JobState:
    """Bring a dead-lettered or failed job back: its results are sent again, or, when it never
    got as far as a prediction, it is inferred again. A failed job's results are encoded again
    (the fix may be in the encoder; the UIDs stay the same) and its source comes back from the
    quarantine. Returns the state the job is back in; its attempts count from 0 again.
    `user`: who asked (a console login), recorded in the audit."""
    job = ctx.jobs.get(job_id)
    if job is None or job.state not in FINAL_FAILURES:
        raise ValueError(f"job {job_id}: not dead-lettered or failed ({job.state if job else 'unknown job'})")
    folder = ctx.spool.result_dir(job_id)
    if job.state == JobState.DEAD:
        try:
            ctx.spool.take_back_dead_letter(job_id)
        except FileNotFoundError:
            if isinstance(ctx.store, SpoolObjects):
                raise
            # dead-lettered on another host (dead letters stay local): the results are in the object store
    else:
        for name in (SR_FILE, SC_FILE, TEXT_FILE, PR_FILE, KO_FILE):
            ctx.store.delete(ctx.key(folder / name))
        source = ctx.spool.root / job.path
        if not ctx.store.exists(job.path):
            with contextlib.suppress(FileNotFoundError):
                ctx.spool.take_back_quarantined(job_id, source)  # quarantined on this host
                ctx.store.put(job.path, source)
                ctx.store.evict(job.path)
    inferred = ctx.store.exists(ctx.key(folder / PREDICTION))
    back_to = JobState.INFERRED if inferred or enqueue_infer is None else JobState.QUEUED
    if not ctx.jobs.reopen(job_id, job.state, back_to, reason="resend requested"):
        raise ValueError(f"job {job_id}: changed state during the resend")
    ctx.audit.record("resent", job=job_id, sop_instance_uid=job.sop_instance_uid, was=job.state.value,
                     **({"user": user} if user else {}))
    enqueue = enqueue_send if back_to == JobState.INFERRED else enqueue_infer
    assert enqueue is not None  # back_to is QUEUED only where there is an enqueue_infer
    _enqueue(enqueue, job_id)
    return back_to


def resend_jobs(job_ids: Sequence[str], ctx: Context, enqueue_send: Callable[[str], None],
                enqueue_infer: Callable[[str], None] | None = None,
                user: str | None = None) -> list[tuple[str, JobState | Exception]]:
    """:func:`resend` for each job: (job, the state it is back in, or why it was not requeued:
    a ValueError when it is not dead-lettered or failed, an OSError when its files could not
    be moved). `medsam2-cxr resend` and the console's resend button both come here."""
    out: list[tuple[str, JobState | Exception]] = []
    for job_id in job_ids:
        try:
            out.append((job_id, resend(job_id, ctx, enqueue_send, enqueue_infer, user=user)))
        except (ValueError, OSError) as exc:
            out.append((job_id, exc))
    return out


# ---------------------------------------------------------------- reconciling with the broker

def reconcile(ctx: Context, stale_after_s: float, enqueue_infer: Callable[[str], None],
              enqueue_send: Callable[[str], None], max_attempts: int = 5, infer: bool = True) -> int:
    """Re-enqueue what the broker may have forgotten; the job store is the source of truth.

    infer False (the model is still being built, no GPU worker yet): jobs waiting for inference
    are left alone, neither re-enqueued again and again nor counted; they have their message.

    A job whose worker died max_attempts times (a poison image, a crash in a library) is given
    up: failed with the reason and audited as a serious failure, instead of killing workers forever. Partial
    writes a killed worker left in the spool's tmp/ are removed once they are that stale too. A done
    job that left its study's RIS/FHIR report to an image that then failed or was dead-lettered goes
    back to the sender to send it (ris.ledger.Ledger.owed).
    """
    swept = ctx.spool.sweep_tmp(older_than_s=stale_after_s)
    if swept:
        log.warning("reconcile.partial_writes_removed", files=swept)
    n = 0
    for job in ctx.jobs.stale(stale_after_s):
        if not infer and job.state in (JobState.QUEUED, JobState.INFERRING):
            continue
        claimed = job.state in (JobState.INFERRING, JobState.SENDING)
        if claimed and job.attempts >= max_attempts:
            # An error would have failed the job at once (fail_job): here its worker never came back.
            reason = (f"gave up after {job.attempts} attempts in state {job.state.value}: "
                      "each time its worker died or outlived its lease")
            if ctx.jobs.advance(job.id, job.state, JobState.FAILED, reason=reason):
                stage = "infer" if job.state == JobState.INFERRING else "encode or send"
                ctx.audit.record("job_failed", job=job.id, sop_instance_uid=job.sop_instance_uid, stage=stage,
                                 error="worker lost", reason=reason)
                metrics.JOBS_FAILED.labels(stage="worker_lost").inc()
                log.error("job.failed", job=job.id, sop_instance_uid=job.sop_instance_uid, stage=stage,
                          error="worker lost", reason=reason, attempts=job.attempts)
            continue
        target = enqueue_infer if job.state in (JobState.QUEUED, JobState.INFERRING) else enqueue_send
        if _enqueue(target, job.id):
            ctx.jobs.touch(job.id)
            n += 1
    n += _report_owed(ctx, stale_after_s, enqueue_send)
    if n:
        log.warning("reconcile.requeued", jobs=n)
    return n


def _report_owed(ctx: Context, stale_after_s: float, enqueue_send: Callable[[str], None]) -> int:
    """Hand back to the sender each done job whose study's report it left to an image that will not
    send it (that image failed, or was dead-lettered at the PACS): its delivery finds the PACS has
    its results and sends the study's report (ris.delivery.deliver_results)."""
    reports = ctx.reports
    if reports is None:
        return 0
    n = 0
    for job_id in reports.ledger.owed(stale_after_s):
        if ctx.jobs.reopen(job_id, JobState.DONE, JobState.INFERRED, reason="its study's report is owed"):
            log.warning("reconcile.report_owed", job=job_id)
            if _enqueue(enqueue_send, job_id):
                n += 1
    return n


def _enqueue(fn: Callable[[str], None], job_id: str) -> bool:
    try:
        fn(job_id)
        return True
    except Exception as exc:  # noqa: BLE001  broker down (kombu, redis, amqp or OS errors): the reconciler will try again
        log.warning("enqueue.failed", job=job_id, error=type(exc).__name__)
        return False
