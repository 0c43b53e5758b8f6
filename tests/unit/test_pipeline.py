"""The pipeline as plain functions, with the tiny phantom-trained bundle and no Celery."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import pydicom
import pytest

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.sender import DeliveryFailed, Destination
from dicom_node.spool import Spool
from models.bundle import load_bundle
from models.predictor import Predictor
from worker import pipeline
from worker.clock import ManualClock


@pytest.fixture
def ctx(tmp_path):
    clock = ManualClock(dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC))  # one clock: jobs, audit, results
    return pipeline.Context(spool=Spool(tmp_path / "spool"),
                            jobs=JobStore(tmp_path / "spool" / "jobs.sqlite", clock=clock.time),
                            audit=AuditLog(tmp_path / "spool" / "audit.jsonl", clock=clock.time), lease_s=60, clock=clock)


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor(load_bundle(tiny_bundle), device="cpu")


def _receive(ctx, src: Path, job_id: str) -> None:
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    ctx.spool.write_atomic(ctx.spool.incoming_path(job_id), src.read_bytes())
    ctx.jobs.add(job_id=job_id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                 study_instance_uid=ds.StudyInstanceUID, calling_aet="MODALITY",
                 path=ctx.spool.relative(ctx.spool.incoming_path(job_id)), state=JobState.QUEUED)


def test_infer_then_deliver_once(ctx, predictor, phantom_dir):
    src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    _receive(ctx, src, "job1")
    sends: list[str] = []
    assert pipeline.infer_jobs(["job1", "job1"], ctx, predictor, sends.append) == ["job1"]
    assert sends == ["job1"] and ctx.jobs.get("job1").state == JobState.INFERRED
    delivered: list[tuple[list[Path], Destination]] = []
    dest = Destination("PACS", "127.0.0.1", 4242)
    ctx.clock.advance(42)  # the one clock: the results' date and the time since received both follow it
    assert pipeline.deliver_job("job1", ctx, lambda aet: dest, lambda f, d: delivered.append((f, d))) == JobState.DONE
    files = delivered[0][0]
    urgent = json.loads((ctx.spool.result_dir("job1") / pipeline.PREDICTION).read_text())["urgency"]["is_urgent"]
    sr, sc, ps, *ko = (pydicom.dcmread(f) for f in files)
    assert [d.Modality for d in (sr, sc, ps, *ko)] == ["SR", "OT", "PR"] + (["KO"] if urgent else [])
    source = pydicom.dcmread(src, stop_before_pixels=True)
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == ps.StudyInstanceUID == source.StudyInstanceUID
    assert sr.ContentDate == ctx.clock.now().strftime("%Y%m%d") == "20261128"
    assert [r["since_received"] for r in ctx.audit.read() if r["event"] == "sent"] == [42.0]
    assert sr.ContentSequence  # TID 1500 content
    # A duplicate message for either step does nothing.
    assert pipeline.infer_jobs(["job1"], ctx, predictor, sends.append) == []
    assert pipeline.deliver_job("job1", ctx, lambda aet: dest, lambda f, d: delivered.append((f, d))) is None
    assert len(delivered) == 1
    events = [r["event"] for r in ctx.audit.read()]
    assert events == ["inferred", "sent"]
    # dciodvfy on what was delivered: tests/integration/test_pipeline_results_valid.py


def test_results_are_deterministic_across_reruns(ctx, predictor, phantom_dir, tmp_path):
    src = sorted((phantom_dir / "images").glob("*.dcm"))[1]
    image = pipeline.read_image(pydicom.dcmread(src))
    pred = predictor.predict([image])[0]
    model = predictor.bundle.identity()
    now = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
    a = [pipeline.to_bytes(d) for d in pipeline.encode_results(pydicom.dcmread(src), image, pred, model, now)]
    b = [pipeline.to_bytes(d) for d in pipeline.encode_results(pydicom.dcmread(src), image, pred, model, now)]
    assert a == b


def test_permanent_failure_dead_letters_and_resend_recovers(ctx, predictor, phantom_dir):
    src = sorted((phantom_dir / "images").glob("*.dcm"))[2]
    _receive(ctx, src, "job2")
    queue: list[str] = []
    pipeline.infer_jobs(["job2"], ctx, predictor, queue.append)

    def refuse(files, dest):
        raise DeliveryFailed(f"{dest}: association refused")

    dest = Destination("PACS", "127.0.0.1", 1)
    assert pipeline.deliver_job("job2", ctx, lambda aet: dest, refuse) == JobState.DEAD
    assert ctx.spool.dead_letters() == ["job2"]
    reason = json.loads((ctx.spool.dead / "job2" / "reason.json").read_text())
    assert "refused" in reason["reason"]
    pipeline.resend("job2", ctx, queue.append)
    assert ctx.jobs.get("job2").state == JobState.INFERRED and queue[-1] == "job2"
    sent = []
    assert pipeline.deliver_job("job2", ctx, lambda aet: dest, lambda f, d: sent.append(f)) == JobState.DONE
    assert [r["event"] for r in ctx.audit.read()] == ["inferred", "dead_letter", "resent", "sent"]


def test_reconciler_requeues_lost_messages_and_dead_workers(ctx, predictor, phantom_dir):
    src = sorted((phantom_dir / "images").glob("*.dcm"))[3]
    _receive(ctx, src, "job3")
    infers: list[str] = []
    sends: list[str] = []
    assert pipeline.reconcile(ctx, 30, infers.append, sends.append) == 0  # fresh: its message may still come
    ctx.clock.t += 31  # the broker lost the message
    assert pipeline.reconcile(ctx, 30, infers.append, sends.append) == 1 and infers == ["job3"]
    # A worker claims it and dies: nobody else may take it until the lease runs out.
    assert ctx.jobs.claim("job3", JobState.QUEUED, JobState.INFERRING, 60) is not None
    assert pipeline.infer_jobs(["job3"], ctx, predictor, sends.append) == []
    ctx.clock.t += 61
    assert pipeline.reconcile(ctx, 30, infers.append, sends.append) == 1 and infers[-1] == "job3"
    assert pipeline.infer_jobs(["job3"], ctx, predictor, sends.append) == ["job3"]


def test_an_undecodable_image_fails_with_its_reason_and_resend_takes_it_back(ctx, predictor, phantom_dir, tmp_path):
    src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    ds = pydicom.dcmread(src)
    ds.PixelData = ds.PixelData[:100]  # lies about its size
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".4"
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad)
    _receive(ctx, bad, "job4")
    assert pipeline.infer_jobs(["job4"], ctx, predictor, lambda j: None) == []
    job = ctx.jobs.get("job4")
    assert job.state == JobState.FAILED and job.reason.startswith("cannot read image: ImageError: ")
    assert "less than expected" in job.reason
    [record] = [a for a in ctx.audit.read() if a["event"] == "job_failed"]
    assert record["event_outcome"] == 8 and record["stage"] == "decode" and record["reason"] == job.reason
    assert (ctx.spool.root / record["quarantined"]).exists() and not (ctx.spool.root / job.path).exists()
    ctx.clock.t += 3600  # final: the reconciler never takes it again
    assert pipeline.reconcile(ctx, 30, lambda j: None, lambda j: None) == 0
    # After a fix (here: the full pixel data put back), resend infers it again.
    shutil.copy(src, ctx.spool.root / record["quarantined"])
    infers: list[str] = []
    assert pipeline.resend("job4", ctx, lambda j: None, infers.append) == JobState.QUEUED and infers == ["job4"]
    assert (ctx.spool.root / job.path).exists() and ctx.spool.quarantined() == []
    assert ctx.jobs.get("job4").attempts == 0
    assert pipeline.infer_jobs(["job4"], ctx, predictor, lambda j: None) == ["job4"]


def test_a_job_that_kills_its_worker_is_given_up_and_can_be_resent(ctx, predictor, phantom_dir):
    src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    _receive(ctx, src, "job5")
    infers: list[str] = []
    for _ in range(5):  # five workers claim it and die
        assert ctx.jobs.claim("job5", JobState.QUEUED, JobState.INFERRING, 60) is not None
        ctx.clock.t += 61
    assert pipeline.reconcile(ctx, 30, infers.append, infers.append, max_attempts=5) == 0
    job = ctx.jobs.get("job5")
    assert job.state == JobState.FAILED and "gave up after 5 attempts" in job.reason
    (record,) = ctx.audit.read()
    assert record["event"] == "job_failed" and record["event_outcome"] == 8  # serious failure
    pipeline.resend("job5", ctx, lambda j: None, infers.append)  # never inferred: infer again
    assert ctx.jobs.get("job5").state == JobState.QUEUED and infers == ["job5"]


def test_while_the_model_is_built_waiting_jobs_are_left_alone_and_a_stop_gives_claims_back(ctx, predictor,
                                                                                            phantom_dir):
    srcs = sorted((phantom_dir / "images").glob("*.dcm"))[:2]
    for i, src in enumerate(srcs):
        _receive(ctx, src, f"wait{i}")
    infers: list[str] = []
    ctx.clock.t += 3600  # an hour of building the model
    assert pipeline.reconcile(ctx, 30, infers.append, infers.append, infer=False) == 0 and infers == []
    assert [ctx.jobs.get(f"wait{i}").attempts for i in range(2)] == [0, 0]
    # The worker is told to stop once it has claimed and decoded a batch: given back, not counted.
    sends: list[str] = []
    assert pipeline.infer_jobs(["wait0", "wait1"], ctx, predictor, sends.append, stopping=lambda: True) == []
    assert sends == [] and all(ctx.jobs.get(f"wait{i}").state == JobState.QUEUED for i in range(2))
    assert [ctx.jobs.get(f"wait{i}").attempts for i in range(2)] == [0, 0]
    # infer_waiting takes no batch at all once stopping.
    assert pipeline.infer_waiting("wait0", ctx, predictor, sends.append, stopping=lambda: True) == []
    # `up` on its next start enqueues them at once (stale_after_s 0).
    ctx.clock.t += 1
    assert pipeline.reconcile(ctx, 0, infers.append, infers.append) == 2 and sorted(infers) == ["wait0", "wait1"]
