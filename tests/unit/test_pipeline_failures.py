"""A job that fails says so at once: deliver_job and infer_jobs with parts that raise.

No model here: the predictor, the decoder and the encoder are small fakes (the pipeline takes
its predictor as an argument; decoding and encoding are module functions swapped per test), so
each test takes well under a second.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import sqlite3
from pathlib import Path

import kombu.exceptions
import numpy as np
import pydicom
import pytest
import redis.exceptions
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from typer.testing import CliRunner

from dicom_node import identifiers
from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.sender import DeliveryFailed, Destination
from dicom_node.spool import OutOfSpace, Spool
from models.prediction import Finding, ModelIdentity, Prediction
from worker import failures, pipeline
from worker.clock import ManualClock

NAME, PID = "DOE^JANE", "MRN-4711"  # the source's patient: never in a reason, audit record or log line
IDENTITY = ModelIdentity(name="m", version="1", digest="d" * 64, manufacturer="medsam2-cxr",
                         synthetic_training=True, training_data="phantoms", intended_use="tests")
DEST = Destination("PACS", "127.0.0.1", 4242)


@pytest.fixture
def ctx(tmp_path):
    clock = ManualClock(dt.datetime(2026, 12, 1, tzinfo=dt.UTC))  # one clock: jobs, audit, results
    spool = Spool(tmp_path / "spool")
    return pipeline.Context(spool=spool, jobs=JobStore(spool.root / "jobs.sqlite", clock=clock.time),
                            audit=AuditLog(spool.root / "audit.jsonl", clock=clock.time), lease_s=60.0,
                            send_lease_s=900.0, clock=clock)


def _dataset(sop_class: str = "1.2.840.10008.5.1.4.1.1.7") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = sop_class, generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = NAME, PID
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _prediction(value: float = 0.7) -> Prediction:
    return Prediction(findings=(Finding("Cardiomegaly", value, 0.5, "high", 0.01),), ood_score=0.1,
                      ood_threshold=1.0, center=np.zeros(4), radius=np.ones(4),
                      saliency={"Cardiomegaly": np.zeros((4, 4), np.float32)})


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """One small phantom chest radiograph, for the tests that run the real encoders."""
    from phantoms import generate

    out = tmp_path_factory.mktemp("phantom")
    generate(1, out, seed=5, size=128)
    return sorted((out / "images").glob("*.dcm"))[0]


def _job(ctx, job_id: str, inferred: bool, source: Path | None = None) -> str:
    path = ctx.spool.incoming_path(job_id)
    ds = _dataset("1.2.840.10008.5.1.4.1.1.1")
    if source is not None:  # a real image, for the real encoders
        ds = pydicom.dcmread(source)
        ds.PatientName, ds.PatientID = NAME, PID
    ds.save_as(path, enforce_file_format=True)
    ctx.jobs.add(job_id=job_id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                 study_instance_uid=ds.StudyInstanceUID, calling_aet="MODALITY1", path=ctx.spool.relative(path),
                 state=JobState.QUEUED)
    if inferred:
        assert ctx.jobs.claim(job_id, JobState.QUEUED, JobState.INFERRING, 60)
        pipeline.save_prediction(ctx.spool, ctx.spool.result_dir(job_id), _prediction(), IDENTITY)
        assert ctx.jobs.advance(job_id, JobState.INFERRING, JobState.INFERRED)
    return job_id


@pytest.fixture
def fake_parts(monkeypatch):
    """Decoding and encoding without pixels: model_input gives a 4 x 4 image whose value is the
    job's number, encode_results three minimal result objects (SR, SC, GSPS; or raises, per test)."""
    monkeypatch.setattr(pipeline, "model_input", lambda path, size: np.full((4, 4), float(Path(path).stem[3:])))
    monkeypatch.setattr(pipeline, "read_image", lambda ds: np.zeros((4, 4), np.float32))
    monkeypatch.setattr(pipeline, "encode_results", lambda *a, **k: [_dataset(), _dataset(), _dataset()])
    return monkeypatch


class Model:
    """A predictor; `poison` images (by value) make a forward raise `error`."""

    def __init__(self, poison: set[float] = frozenset(), error: type[Exception] = ValueError) -> None:
        self.poison, self.error, self.calls = poison, error, []
        self.bundle = type("Bundle", (), {"identity": staticmethod(lambda: IDENTITY), "image_size": 4})()

    def predict(self, images):
        values = [float(im[0, 0]) for im in images]
        self.calls.append(values)
        bad = [v for v in values if v in self.poison]
        if bad:
            raise self.error(f"cannot take image {bad[0]:g}")
        return [_prediction() for _ in images]


def _failed_records(ctx) -> list[dict]:
    return [a for a in ctx.audit.read() if a["event"] == "job_failed"]


# ---------------------------------------------------------------- the rule

@pytest.mark.parametrize("exc", [OutOfSpace("spool full"), ConnectionError("refused"), TimeoutError("slow"),
                                 OSError(errno.ENOSPC, "No space left on device"),
                                 kombu.exceptions.OperationalError("broker gone"),
                                 redis.exceptions.ConnectionError("redis gone"),
                                 sqlite3.OperationalError("database is locked")])
def test_what_goes_away_is_transient(exc):
    assert failures.is_transient(exc) and not failures.is_permanent(exc)


@pytest.mark.parametrize("exc", [ValueError("bad value"), KeyError("Rows"), TypeError("None"),
                                 AttributeError("no attribute"), pydicom.errors.InvalidDicomError("no DICM"),
                                 FileNotFoundError(errno.ENOENT, "gone"), PermissionError(errno.EACCES, "denied"),
                                 RuntimeError("a bug"), NotImplementedError("no decoder")])
def test_bugs_and_defects_are_permanent(exc):
    assert failures.is_permanent(exc) and not failures.is_transient(exc)


def test_describe_names_the_type_and_redacts_the_patient():
    ds = _dataset()
    text = identifiers.describe(ValueError(f"Value '{NAME}' of PN\nis invalid for {PID}"), identifiers.identifiers(ds))
    assert text == "ValueError: Value '***' of PN is invalid for ***"
    assert identifiers.describe(KeyError("x" * 2000)).startswith("KeyError: 'xxx") and len(identifiers.describe(
        KeyError("x" * 2000))) < identifiers.MAX_MESSAGE + 40


# ---------------------------------------------------------------- the io step

def test_an_encoder_error_fails_the_job_at_once(ctx, fake_parts, capsys):
    job_id = _job(ctx, "job1", inferred=True)

    def encode(source, *args, **kw):
        raise ValueError(f"Value '{source.PatientName}' is not valid for Person Name")

    fake_parts.setattr(pipeline, "encode_results", encode)
    sent = []
    capsys.readouterr()
    state = pipeline.deliver_job(job_id, ctx, lambda aet: DEST, lambda files, d: sent.append(files))
    # the JSON lines the node writes to stderr (worker.logs), as an operator's log collector reads them
    logs = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert state == JobState.FAILED and sent == []
    job = ctx.jobs.get(job_id)
    assert job.state == JobState.FAILED and job.lease_until == 0
    assert job.reason == "cannot encode results: ValueError: Value '***' is not valid for Person Name"
    assert (ctx.spool.root / job.path).exists()  # the source stays in the spool for the resend
    [record] = _failed_records(ctx)
    assert record["event_outcome"] == 8 and record["stage"] == "encode" and record["error"] == "ValueError"
    assert record["reason"] == job.reason and record["sop_instance_uid"] == job.sop_instance_uid
    [line] = [entry for entry in logs if entry["event"] == "job.failed"]
    assert line["level"] == "error" and line["job"] == job_id and "encode" in line["at"]
    text = json.dumps([logs, list(ctx.audit.read()), job.reason])
    assert NAME not in text and NAME.replace("^", " ") not in text and PID not in text
    # Final: no lease to sit out, nothing the reconciler takes again, even after an hour.
    ctx.clock.t += 3600
    again: list[str] = []
    assert pipeline.reconcile(ctx, 30, again.append, again.append) == 0 and again == []
    # A duplicate message does nothing either.
    assert pipeline.deliver_job(job_id, ctx, lambda aet: DEST, lambda files, d: sent.append(files)) is None


def test_a_corrupted_prediction_fails_and_resend_after_the_fix_sends(ctx, fake_parts, phantom):
    fake_parts.undo()  # the real load_prediction and encoders: the prediction file itself is the poison
    job_id = _job(ctx, "job2", inferred=True, source=phantom)
    folder = ctx.spool.result_dir(job_id)
    good = (folder / pipeline.PREDICTION).read_bytes()
    (folder / pipeline.PREDICTION).write_bytes(good[: len(good) // 2])
    assert pipeline.deliver_job(job_id, ctx, lambda aet: DEST, lambda files, d: None) == JobState.FAILED
    assert ctx.jobs.get(job_id).reason.startswith("cannot encode results: JSONDecodeError: ")
    # Resend without a fix: the same error, at once, once more (never a loop).
    sends: list[str] = []
    assert pipeline.resend(job_id, ctx, sends.append) == JobState.INFERRED and sends == [job_id]
    assert pipeline.deliver_job(job_id, ctx, lambda aet: DEST, lambda files, d: None) == JobState.FAILED
    (folder / pipeline.PREDICTION).write_bytes(good)  # the fix
    pipeline.resend(job_id, ctx, sends.append)
    assert ctx.jobs.get(job_id).attempts == 0
    delivered: list[list[Path]] = []
    assert pipeline.deliver_job(job_id, ctx, lambda aet: DEST, lambda files, d: delivered.append(files)) == JobState.DONE
    assert [pydicom.dcmread(f).SOPClassUID.name for f in delivered[0]] == [
        "Comprehensive 3D SR Storage", "Secondary Capture Image Storage", "Grayscale Softcopy Presentation State Storage"]
    events = [a["event"] for a in ctx.audit.read()]
    assert events == ["job_failed", "resent", "job_failed", "resent", "sent"]


def test_a_sender_bug_fails_but_a_destination_down_dead_letters(ctx, fake_parts):
    a, b = _job(ctx, "job3", inferred=True), _job(ctx, "job4", inferred=True)

    def buggy(files, dest):
        raise TypeError("send() got an unexpected keyword argument")

    def down(files, dest):
        raise DeliveryFailed(f"{dest}: association rejected")

    assert pipeline.deliver_job(a, ctx, lambda aet: DEST, buggy) == JobState.FAILED
    assert ctx.jobs.get(a).reason == "cannot send results: TypeError: send() got an unexpected keyword argument"
    assert _failed_records(ctx)[0]["stage"] == "send"
    assert pipeline.deliver_job(b, ctx, lambda aet: DEST, down) == JobState.DEAD
    assert ctx.spool.dead_letters() == [b] and "rejected" in ctx.jobs.get(b).reason
    # resend brings both back: the failed one is encoded again, the dead letter sent as it was.
    sends: list[str] = []
    assert [pipeline.resend(j, ctx, sends.append) for j in (a, b)] == [JobState.INFERRED] * 2
    assert not (ctx.spool.result_dir(a) / pipeline.SR_FILE).exists()
    assert (ctx.spool.result_dir(b) / pipeline.SR_FILE).exists()
    assert [pipeline.deliver_job(j, ctx, lambda aet: DEST, lambda f, d: None) for j in sends] == [JobState.DONE] * 2


def test_a_transient_error_while_sending_gives_the_job_back(ctx, fake_parts):
    job_id = _job(ctx, "job5", inferred=True)

    def broken(files, dest):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    with pytest.raises(ConnectionResetError):
        pipeline.deliver_job(job_id, ctx, lambda aet: DEST, broken)
    job = ctx.jobs.get(job_id)
    assert job.state == JobState.INFERRED and job.lease_until == 0 and _failed_records(ctx) == []
    ctx.clock.t += 31  # the reconciler retries it after stale_after_s, not after the 900 s send lease
    again: list[str] = []
    assert pipeline.reconcile(ctx, 30, again.append, again.append) == 1 and again == [job_id]


# ---------------------------------------------------------------- the GPU step

def test_one_image_the_model_cannot_take_fails_alone(ctx, fake_parts):
    jobs = [_job(ctx, f"job{i}", inferred=False) for i in (1, 2, 3)]
    model = Model(poison={2.0})
    sends: list[str] = []
    assert pipeline.infer_jobs(jobs, ctx, model, sends.append) == ["job1", "job3"] == sends
    assert model.calls == [[1.0, 2.0, 3.0], [1.0], [2.0], [3.0]]  # the batch, then each image alone
    assert [ctx.jobs.get(j).state for j in jobs] == [JobState.INFERRED, JobState.FAILED, JobState.INFERRED]
    assert ctx.jobs.get("job2").reason == "inference failed: ValueError: cannot take image 2"
    [record] = _failed_records(ctx)
    assert record["job"] == "job2" and record["stage"] == "infer" and record["event_outcome"] == 8
    assert (ctx.spool.root / ctx.jobs.get("job2").path).exists()  # its source stays for a resend
    infers: list[str] = []
    assert pipeline.resend("job2", ctx, sends.append, infers.append) == JobState.QUEUED and infers == ["job2"]


def test_a_predictor_that_returns_too_few_is_a_failure_not_a_silent_loss(ctx, fake_parts):
    jobs = [_job(ctx, f"job{i}", inferred=False) for i in (1, 2)]

    class Short(Model):
        def predict(self, images):
            return super().predict(images)[:1]  # drops the last image's prediction when batched

    assert pipeline.infer_jobs(jobs, ctx, Short(), lambda j: None) == jobs  # each alone: both fine


def test_a_batch_with_a_transient_error_is_given_back(ctx, fake_parts):
    jobs = [_job(ctx, f"job{i}", inferred=False) for i in (1, 2)]
    with pytest.raises(ConnectionError):
        pipeline.infer_jobs(jobs, ctx, Model(poison={1.0, 2.0}, error=ConnectionError), lambda j: None)
    assert [ctx.jobs.get(j).state for j in jobs] == [JobState.QUEUED] * 2 and _failed_records(ctx) == []


def test_a_transient_error_in_one_batch_lets_the_batch_in_flight_finish(ctx, fake_parts):
    jobs = [_job(ctx, f"job{i}", inferred=False) for i in (1, 2)]
    sends: list[str] = []
    with pytest.raises(ConnectionError):
        pipeline.infer_waiting("job1", ctx, Model(poison={1.0}, error=ConnectionError), sends.append, batch_size=1,
                               gather_s=0)
    assert [ctx.jobs.get(j).state for j in jobs] == [JobState.QUEUED, JobState.INFERRED] and sends == ["job2"]


def test_a_broken_decode_pool_gives_the_jobs_back_at_once(ctx, fake_parts):
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    jobs = [_job(ctx, f"job{i}", inferred=False) for i in (1, 2)]

    class Broken(ThreadPoolExecutor):
        def submit(self, *args, **kw):
            raise BrokenProcessPool("A child process terminated abruptly")

    with Broken(1) as pool, pytest.raises(BrokenProcessPool):
        pipeline.infer_jobs(jobs, ctx, Model(), lambda j: None, decode=pool)
    assert [ctx.jobs.get(j).state for j in jobs] == [JobState.QUEUED] * 2 and _failed_records(ctx) == []


def test_an_image_that_cannot_be_decoded_fails_and_the_rest_go_on(ctx, fake_parts):
    jobs = [_job(ctx, f"job{i}", inferred=False) for i in (1, 2)]

    def decode(path, size):
        if path.endswith("job1.dcm"):
            raise KeyError("(0028,0010) Rows")
        return np.ones((4, 4)) * 2

    fake_parts.setattr(pipeline, "model_input", decode)
    assert pipeline.infer_jobs(jobs, ctx, Model(), lambda j: None) == ["job2"]
    job = ctx.jobs.get("job1")
    assert job.state == JobState.FAILED and job.reason == "cannot read image: KeyError: '(0028,0010) Rows'"
    assert [r["id"] for r in ctx.spool.quarantined()] == ["job1"]


# ---------------------------------------------------------------- what the operator sees

def test_status_and_audit_show_the_failures(ctx, fake_parts, tmp_path):
    from worker.cli import app

    _job(ctx, "job1", inferred=True)
    _job(ctx, "job2", inferred=True)

    def encode(*args, **kw):
        raise AttributeError("'NoneType' object has no attribute 'CodeValue'")

    fake_parts.setattr(pipeline, "encode_results", encode)
    assert pipeline.deliver_job("job1", ctx, lambda aet: DEST, lambda f, d: None) == JobState.FAILED
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[paths]\nspool = "{ctx.spool.root}"\n')
    out = CliRunner().invoke(app, ["status", "--config", str(cfg)])
    assert out.exit_code == 0, out.output
    status = json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])
    assert status["counts"] == {"failed": 1, "inferred": 1}
    [failure] = status["failures"]
    assert failure["job"] == "job1" and failure["state"] == "failed"
    assert failure["reason"] == "cannot encode results: AttributeError: 'NoneType' object has no attribute 'CodeValue'"
    out = CliRunner().invoke(app, ["audit", "--config", str(cfg), "--event", "job_failed"])
    [line] = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert line["job"] == "job1" and line["reason"] == failure["reason"] and line["event_outcome"] == 8


def test_a_failed_instance_sent_again_is_a_new_job(ctx):
    _job(ctx, "job1", inferred=False)
    job = ctx.jobs.get("job1")
    assert ctx.jobs.claim("job1", JobState.QUEUED, JobState.INFERRING, 60)
    assert ctx.jobs.advance("job1", JobState.INFERRING, JobState.FAILED, reason="inference failed: ValueError: x")
    again, earlier = ctx.jobs.add(job_id="job9", sop_instance_uid=job.sop_instance_uid, sop_class_uid=job.sop_class_uid,
                                  study_instance_uid=job.study_instance_uid, calling_aet="MODALITY1", path=job.path,
                                  state=JobState.QUEUED)
    assert again.state == JobState.QUEUED and earlier is None


def test_the_tasks_leave_every_retry_to_the_reconciler(tmp_path):
    import worker.tasks  # noqa: F401  (registers the tasks)
    from worker.app import INFER, SEND, make_app
    from worker.settings import Settings

    app = make_app(Settings(paths={"spool": str(tmp_path / "spool")}))
    assert app.conf.task_acks_late and app.conf.task_acks_on_failure_or_timeout
    for name in (INFER, SEND):
        assert not getattr(app.tasks[name], "autoretry_for", ())


def test_the_worker_starts_its_decode_processes_again_when_one_was_killed(tmp_path):
    import os
    from concurrent.futures.process import BrokenProcessPool

    from worker.runtime import Runtime
    from worker.settings import Settings

    rt = Runtime.from_settings(Settings(paths={"spool": str(tmp_path / "spool")}))
    pool = rt.decoder(1)
    with pytest.raises(BrokenProcessPool):
        pool.submit(os._exit, 1).result(timeout=60)  # a decode process killed (the OOM killer, say)
    again = rt.decoder(1)
    try:
        assert again is not pool and again.submit(abs, -3).result(timeout=60) == 3
    finally:
        again.shutdown()
        pool.shutdown()


def test_a_source_without_a_series_uid_fails_at_once_naming_the_tag(ctx, phantom, tmp_path):
    """The real encoders on a source whose Type 1 reference cannot be repaired (encoders.header)."""
    ds = pydicom.dcmread(phantom)
    ds.SeriesInstanceUID = ""
    broken = tmp_path / "no-series.dcm"
    ds.save_as(broken, enforce_file_format=True)
    job_id = _job(ctx, "job9", inferred=True, source=broken)
    sent: list = []
    assert pipeline.deliver_job(job_id, ctx, lambda aet: DEST, lambda files, dest: sent.append(files)) \
        == JobState.FAILED
    job = ctx.jobs.get(job_id)
    assert "HeaderError" in job.reason and "(0020,000E) SeriesInstanceUID" in job.reason and not sent
    assert NAME not in job.reason and PID not in job.reason
    assert [r["stage"] for r in _failed_records(ctx)] == ["encode"]
