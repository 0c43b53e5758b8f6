"""Faults inside the worker steps, driven through the plain pipeline functions with a fake clock.

These are the races the process-level scenarios can only hit by chance: a send whose retries
outlast its lease while another io thread is free, and an image that only the worker finds
undecodable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.sender import Destination
from dicom_node.spool import Spool
from models.prediction import ModelIdentity, Prediction
from worker import decoding, pipeline
from worker.clock import ManualClock

pytestmark = pytest.mark.faults
MODEL = ModelIdentity(name="m", version="1", digest="d" * 64, manufacturer="medsam2-cxr",
                      synthetic_training=True, training_data="phantoms", intended_use="tests")


def _result_dataset() -> Dataset:
    """A minimal SC result object: enough for the spool, the sender and the audit."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _result(path: Path) -> None:
    _result_dataset().save_as(path, enforce_file_format=True)


@pytest.fixture
def ctx(tmp_path):
    clock = ManualClock(1_000_000.0)
    spool = Spool(tmp_path / "spool")
    jobs = JobStore(spool.root / "jobs.sqlite", clock=clock.time)
    audit = AuditLog(spool.root / "audit.jsonl", clock=clock.time)
    return pipeline.Context(spool=spool, jobs=jobs, audit=audit, lease_s=8.0, clock=clock)


def _inferred_job(ctx, job_id: str = "job1") -> str:
    path = ctx.spool.incoming_path(job_id)
    ctx.spool.write_atomic(path, b"source bytes are not read when the results exist")
    ctx.jobs.add(job_id=job_id, sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                 study_instance_uid=generate_uid(), calling_aet="MODALITY1", path=ctx.spool.relative(path),
                 state=JobState.QUEUED)
    assert ctx.jobs.claim(job_id, JobState.QUEUED, JobState.INFERRING, 8.0)
    folder = ctx.spool.result_dir(job_id)
    _result(folder / pipeline.SR_FILE)
    _result(folder / pipeline.SC_FILE)
    _result(folder / pipeline.PR_FILE)
    pipeline.save_prediction(ctx.spool, folder, Prediction((), 0.0, 1.0, np.zeros(1), np.zeros(1)), MODEL)
    assert ctx.jobs.advance(job_id, JobState.INFERRING, JobState.INFERRED)
    return job_id


def test_a_send_outlasting_its_lease_is_not_sent_twice(ctx, tmp_path):
    """The PACS is down for a minute; the sender retries inside its claim. Meanwhile the
    reconciler looks for SENDING leases that ran out and re-enqueues them, and a free io thread
    takes such a message. With the runtime's wiring (an 8 s worker lease, sender retries that
    last over a minute) the job must still be sent once."""
    from worker.runtime import Runtime
    from worker.settings import Settings

    settings = Settings(paths={"spool": str(tmp_path / "rt")}, worker={"lease_s": 8.0},
                        sender={"attempts": 14, "backoff_s": 1.0, "max_backoff_s": 8.0, "timeout_s": 10.0})
    ctx.send_lease_s = Runtime.from_settings(settings).ctx.send_lease_s
    assert ctx.send_lease_s > 60
    job_id = _inferred_job(ctx)
    dest = Destination("PACS", "127.0.0.1", 4242)
    sent: list[str] = []
    requeued: list[str] = []

    def send(files, destination) -> None:
        sent.append(job_id)
        if len(sent) == 1:
            ctx.clock.t += 60  # retries with backoff while the PACS is down
            pipeline.reconcile(ctx, 20.0, requeued.append, requeued.append)
            for again in requeued:  # a second io thread picks the re-enqueued message up
                pipeline.deliver_job(again, ctx, lambda aet: dest, send)

    assert pipeline.deliver_job(job_id, ctx, lambda aet: dest, send) == JobState.DONE
    assert len(sent) == 1, f"the results of {job_id} were sent {len(sent)} times"
    assert sum(a["event"] == "sent" for a in ctx.audit.read()) == 1


def test_an_image_only_the_worker_cannot_read_is_quarantined(ctx):
    """Bytes the listener accepted but the decoder refuses (any exception type, not only
    ImageError): the job fails at once with its reason (the exception's type and message), the
    file moves to the quarantine, and the audit says so as a serious failure, instead of a task
    that fails and is retried for ever."""
    path = ctx.spool.incoming_path("job2")
    ctx.spool.write_atomic(path, b"\0" * 132)  # not DICOM at all: dcmread raises
    ctx.jobs.add(job_id="job2", sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                 study_instance_uid=generate_uid(), calling_aet="MODALITY1", path=ctx.spool.relative(path),
                 state=JobState.QUEUED)

    class NoModel:
        bundle = type("Bundle", (), {"image_size": 8})()

        def predict(self, images):
            raise AssertionError("nothing decodable should reach the model")

    assert pipeline.infer_jobs(["job2"], ctx, NoModel(), lambda j: None) == []
    job = ctx.jobs.get("job2")
    assert job.state == JobState.FAILED and job.reason.startswith("cannot read image: InvalidDicomError: ")
    [record] = ctx.spool.quarantined()
    assert record["id"] == "job2" and record["stage"] == "worker" and record["reason"] == job.reason
    assert not path.exists() and (ctx.spool.quarantine_dir / "job2.dcm").exists()
    assert [(a["event"], a["event_outcome"]) for a in ctx.audit.read()] == [("job_failed", 8)]
    assert pydicom.misc.is_dicom(ctx.spool.quarantine_dir / "job2.dcm") is False


def _queued_job(ctx, job_id: str) -> str:
    path = ctx.spool.incoming_path(job_id)
    _result(path)  # a readable source header; the steps that decode it are swapped out below
    ctx.jobs.add(job_id=job_id, sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                 study_instance_uid=generate_uid(), calling_aet="MODALITY1", path=ctx.spool.relative(path),
                 state=JobState.QUEUED)
    return job_id


def test_a_full_spool_gives_jobs_back_at_once(ctx, monkeypatch):
    """The spool fills while a worker writes a prediction or encodes results. The job goes back
    to the state before its claim (not held for the length of a lease: a SENDING claim outlasts
    every send retry, many minutes), nothing half-written stays, and once there is room the
    reconciler's retry goes through, sent once."""
    from dicom_node.spool import OutOfSpace
    from models.prediction import Finding, ModelIdentity, Prediction

    identity = ModelIdentity(name="m", version="1", digest="d" * 64, manufacturer="medsam2-cxr",
                             synthetic_training=True, training_data="phantoms", intended_use="tests")

    class Model:
        bundle = type("Bundle", (), {"identity": staticmethod(lambda: identity), "image_size": 8})()

        def predict(self, images):
            return [Prediction(findings=(Finding("Cardiomegaly", 0.7, 0.5, "high", 0.01),), ood_score=0.1,
                               ood_threshold=1.0, center=np.zeros(4), radius=np.ones(4),
                               saliency={"Cardiomegaly": np.zeros((4, 4), np.float32)}) for _ in images]

    for module in (decoding, pipeline):  # the infer and the deliver step
        monkeypatch.setattr(module, "read_image", lambda ds: np.zeros((8, 8), np.float32))
    jobs = [_queued_job(ctx, f"job{i}") for i in range(3)]
    ctx.spool.min_free_bytes = 2**62  # the disk is full
    with pytest.raises(OutOfSpace):
        pipeline.infer_jobs(jobs, ctx, Model(), lambda j: None)
    assert {ctx.jobs.get(j).state for j in jobs} == {JobState.QUEUED}
    ctx.spool.min_free_bytes = 0
    sends: list[str] = []
    assert pipeline.infer_jobs(jobs, ctx, Model(), sends.append) == jobs == sends

    def encode(source, image, prediction, model, now, reporter=None, language="en", urgency=None):
        return [_result_dataset(), _result_dataset(), _result_dataset()]

    monkeypatch.setattr(pipeline, "encode_results", encode)
    dest = Destination("PACS", "127.0.0.1", 4242)
    sent: list[list[Path]] = []
    ctx.send_lease_s = 900.0
    ctx.spool.min_free_bytes = 2**62
    with pytest.raises(OutOfSpace):
        pipeline.deliver_job("job0", ctx, lambda aet: dest, lambda files, d: sent.append(files))
    assert ctx.jobs.get("job0").state == JobState.INFERRED and sent == []
    assert not (ctx.spool.result_dir("job0") / pipeline.SC_FILE).exists()
    assert list(ctx.spool.tmp.iterdir()) == []
    ctx.spool.min_free_bytes = 0
    ctx.clock.t += 21  # past stale_after_s, far short of the SENDING lease
    requeued: list[str] = []
    pipeline.reconcile(ctx, 20.0, requeued.append, requeued.append)
    assert "job0" in requeued
    assert pipeline.deliver_job("job0", ctx, lambda aet: dest, lambda files, d: sent.append(files)) == JobState.DONE
    assert len(sent) == 1


def test_reconciler_removes_partial_writes_a_killed_writer_left(ctx):
    """A SIGKILLed worker leaves its tmp/ file; the reconciler removes it once it is stale, and
    leaves a write in progress alone."""
    import os
    import time

    orphan, fresh = ctx.spool.tmp / "orphan", ctx.spool.tmp / "fresh"
    orphan.write_bytes(b"half a result")
    fresh.write_bytes(b"being written")
    old = time.time() - 60
    os.utime(orphan, (old, old))
    pipeline.reconcile(ctx, 20.0, lambda j: None, lambda j: None)
    assert sorted(p.name for p in ctx.spool.tmp.iterdir()) == ["fresh"]
