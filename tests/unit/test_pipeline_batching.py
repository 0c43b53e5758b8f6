"""The GPU worker's batching: oldest queued jobs first, one forward at a time, the next batch decoded
during the forward, decode processes that quarantine like the worker (the benchmarks: tests/bench/)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.spool import Spool
from models.bundle import load_bundle
from models.predictor import Predictor
from worker import decoding, pipeline


@pytest.fixture
def ctx(tmp_path):
    root = tmp_path / "spool"
    return pipeline.Context(spool=Spool(root), jobs=JobStore(root / "jobs.sqlite"), audit=AuditLog(root / "audit.jsonl"))


def _queue(ctx, src: Path, n: int) -> list[str]:
    ids = []
    for i in range(n):
        job_id = f"job{i}"
        ctx.spool.write_atomic(ctx.spool.incoming_path(job_id), src.read_bytes())
        ctx.jobs.add(job_id=job_id, sop_instance_uid=f"1.2.826.0.1.{i}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                     study_instance_uid="1.2.826.0.2", calling_aet="MODALITY",
                     path=ctx.spool.relative(ctx.spool.incoming_path(job_id)), state=JobState.QUEUED)
        ids.append(job_id)
        time.sleep(0.002)  # distinct creation times: "oldest first" is then well defined
    return ids


class Spy:
    """The real predictor, recording batch sizes and when each forward ran."""

    def __init__(self, predictor: Predictor, delay_s: float = 0.0) -> None:
        self.predictor, self.bundle, self.delay_s = predictor, predictor.bundle, delay_s
        self.batches: list[int] = []
        self.spans: list[tuple[float, float]] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def predict(self, images):
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        t0 = time.perf_counter()
        try:
            time.sleep(self.delay_s)
            return self.predictor.predict(images)
        finally:
            self.spans.append((t0, time.perf_counter()))
            self.batches.append(len(images))
            with self._lock:
                self.active -= 1


def test_waiting_lists_queued_jobs_oldest_first(ctx, phantom_dir):
    src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    ids = _queue(ctx, src, 4)
    ctx.jobs.claim(ids[1], JobState.QUEUED, JobState.INFERRING, 60)
    assert ctx.jobs.waiting(10) == [ids[0], ids[2], ids[3]]
    assert ctx.jobs.waiting(2) == [ids[0], ids[2]]


def test_infer_waiting_batches_everything_queued(ctx, tiny_bundle, phantom_dir):
    src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    ids = _queue(ctx, src, 5)
    spy = Spy(Predictor(load_bundle(tiny_bundle), device="cpu"))
    sent: list[str] = []
    done = pipeline.infer_waiting(ids[3], ctx, spy, sent.append, batch_size=2, gather_s=0)
    assert sorted(done) == sorted(ids) and sorted(sent) == sorted(ids)
    assert sorted(spy.batches, reverse=True) == [2, 2, 1]
    assert spy.max_active == 1  # one forward at a time
    assert all(ctx.jobs.get(j).state == JobState.INFERRED for j in ids)
    # The broker messages of the jobs taken along find nothing to do.
    assert pipeline.infer_jobs([ids[0]], ctx, spy, sent.append) == []
    assert pipeline.infer_waiting(ids[1], ctx, spy, sent.append, batch_size=2, gather_s=0) == []


def test_infer_waiting_decodes_the_next_batch_during_the_forward(ctx, tiny_bundle, phantom_dir, monkeypatch):
    src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    ids = _queue(ctx, src, 4)
    reads: list[float] = []
    real_read = decoding.read_image

    def read(ds: pydicom.Dataset):
        reads.append(time.perf_counter())
        return real_read(ds)

    monkeypatch.setattr(decoding, "read_image", read)
    spy = Spy(Predictor(load_bundle(tiny_bundle), device="cpu"), delay_s=0.5)
    pipeline.infer_waiting(ids[0], ctx, spy, lambda j: None, batch_size=2, gather_s=0)
    first_forward = min(spy.spans)
    assert len(reads) == 4
    # The second batch's images were read before the first batch's forward ended (in series they
    # would be read after it).
    assert all(t < first_forward[1] for t in reads)


def test_decode_processes_give_the_same_results_and_quarantine_the_same(ctx, tiny_bundle, phantom_dir):
    """The GPU worker's spawned decode processes: same predictions as decoding in the worker,
    and an image no decoder can read comes back as the worker's ImageError, so it is quarantined."""
    src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    ids = _queue(ctx, src, 3)
    broken = pydicom.dcmread(src)
    broken.BitsAllocated = 7  # pydicom cannot decode it; the header checks pass
    broken.save_as(ctx.spool.incoming_path(ids[2]))
    predictor = Predictor(load_bundle(tiny_bundle), device="cpu")
    with decoding.start(2) as decode:
        done = pipeline.infer_waiting(ids[0], ctx, predictor, lambda j: None, batch_size=3, gather_s=0, decode=decode)
    assert done == ids[:2]
    failed = ctx.jobs.get(ids[2])  # final at once, with its reason (worker.failures)
    assert failed.state == JobState.FAILED and failed.reason.startswith("cannot read image: ")
    assert "Pixel Data could not be decoded" in failed.reason, failed.reason
    got = pipeline.load_prediction(ctx.spool.result_dir(ids[0]))[0]
    want = predictor.predict([pipeline.read_image(pydicom.dcmread(src))])[0]
    for f, g in zip(got.findings, want.findings, strict=True):  # Pillow's resize vs torch's: float rounding
        assert f.label == g.label and abs(f.probability - g.probability) < 1e-4


def test_infer_waiting_refuses_a_batch_size_below_one(ctx, tiny_bundle):
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.infer_waiting("job0", ctx, Spy(Predictor(load_bundle(tiny_bundle), device="cpu")), print,
                               batch_size=0)
