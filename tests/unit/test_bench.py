"""Benchmarks at tiny sizes (each runs and reports what it promises), and the GPU worker's batching."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.spool import Spool
from models.bundle import load_bundle
from models.predictor import Predictor
from worker import decoding, pipeline
from worker.cli import app


def _bench(args: list[str]) -> dict:
    """Run `medsam2-cxr bench ...` and parse the one JSON object it prints on stdout."""
    out = CliRunner().invoke(app, ["bench", *args])
    assert out.exit_code == 0, out.output
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout
    return json.loads(lines[0])


@pytest.mark.skipif(not Path("/usr/bin/storescp").exists(), reason="DCMTK is not installed: `make peers`")
def test_bench_ingest_compares_node_and_storescp(tmp_path):
    r = _bench(["ingest", "--n", "4", "--rows", "64", "--cols", "48", "--senders", "2", "--repeats", "1",
                "--work", str(tmp_path)])
    assert r["benchmark"] == "ingest" and r["images"] == 4
    for mode in ("sequential", "concurrent"):
        m = r[mode]
        assert m["node_s"] > 0 and m["storescp_s"] > 0
        assert m["ratio_node_over_storescp"] == pytest.approx(m["node_s"] / m["storescp_s"], rel=0.01)
        assert m["node_jobs"] == {"queued": 4}  # every image recorded as a job
        assert m["node_peak_rss_mb"] > 0
    assert {"node_rss_growth_small_mb", "node_rss_growth_full_mb"} <= set(r["memory_vs_size"])
    assert isinstance(r["goal"]["met"], bool)


def test_bench_infer_reports_both_rates():
    r = _bench(["infer", "--specs", "tiny", "--batches", "1,2", "--repeats", "1", "--rows", "96", "--cols", "80"])
    rows = r["specs"]["tiny"]["batches"]
    assert [row["batch"] for row in rows] == [1, 2]
    for row in rows:
        assert row["encoder_images_per_s"] > 0 and row["full_images_per_s"] > 0
        ratio = row["full_images_per_s"] / row["encoder_images_per_s"]
        assert row["ratio_full_over_encoder"] == pytest.approx(ratio, rel=0.02)
        assert set(row["ms_per_image"]) == {"preprocess", "encoder", "head_tta_calibration_saliency"}
        worker = row["worker_step_images_per_s"] / row["encoder_images_per_s"]
        assert row["ratio_worker_step_over_encoder"] == pytest.approx(worker, rel=0.02)
    assert r["goal"]["min_ratio"] == min(row["ratio_full_over_encoder"] for row in rows)
    assert r["goal"]["min_ratio_worker_step"] == min(row["ratio_worker_step_over_encoder"] for row in rows)


def test_bench_decode_checks_every_plugin_against_the_pixels():
    r = _bench(["decode", "--rows", "64", "--cols", "48", "--repeats", "1", "--threads", "1"])
    assert r["cases"], r
    for case in r["cases"]:
        assert case["plugins"], case
        assert case["fastest_correct"] in case["plugins"]
        assert case["plugins"][case["fastest_correct"]]["correct"] is True
        rates = case["worker_decode"]
        assert all(rates[k] > 0 for k in ("one_thread_images_per_s", "threads_images_per_s", "processes_images_per_s"))


def test_bench_train_times_the_evaluation(tmp_path):
    r = _bench(["train", "--n", "60", "--encoder", "tiny", "--seeds", "1", "--variants", "B0,B5", "--n-ood", "4",
                "--epochs", "2", "--work", str(tmp_path)])
    assert r["benchmark"] == "train"
    assert r["cached_s"] > 0 and r["cold_s"] > 0
    assert r["cached_features"] is True  # the timed run extracted nothing


@pytest.mark.integration
@pytest.mark.e2e
def test_bench_e2e_small(tmp_path):
    for tool in ("Orthanc", "/usr/bin/storescu"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `make peers`")
    r = _bench(["e2e", "--spec", "tiny", "--runs", "2", "--burst", "4", "--rows", "96", "--cols", "80",
                "--device", "cpu", "--work", str(tmp_path)])
    assert r["latency"]["runs"] == 2 and r["latency"]["p95_s"] >= r["latency"]["p50_s"] > 0
    assert r["burst"]["images"] == 4 and r["burst"]["images_per_s"] > 0 and r["burst"]["infer_images_per_s"] > 0
    assert r["jobs"].get("done") == 1 + 2 + 4
    assert sum(int(b) * n for b, n in r["burst"]["worker_batches"].items()) == 4  # every burst image, in batches
    assert 0 < r["burst"]["worker_model_busy_fraction"] <= 1
    cpu = r["burst"]["cpu_s_per_image"]
    assert set(cpu) == {"orthanc", "listen", "gpu", "io"} and cpu["gpu"] > 0 and cpu["io"] > 0


# ---------------------------------------------------------------- batching in the GPU worker

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


def test_gpu_benchmark_runs_on_the_cpu_at_tiny_size():
    """bench/gpu.py is only run on a GPU machine; this keeps it importable and working."""
    from bench import gpu

    r = gpu.run(spec="tiny", batches=(1, 2), repeats=1, device="cpu")
    assert set(r["batches"]) == {"1", "2"}
    for row in r["batches"].values():
        for key in ("from_model_size", "from_2500x2048"):
            assert row[key]["encoder_images_per_s"] > 0 and row[key]["full_images_per_s"] > 0
