"""The node's Prometheus metrics (dicom_node/metrics.py) where the events happen, and the HTTP app
(console/app.py): /metrics, /healthz, /readyz. In one process (no multiprocess folder), so the
counters are read from prometheus-client's default registry."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from console.app import Readiness, create_app
from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.sender import DeliveryFailed, Destination
from dicom_node.spool import Spool
from models.bundle import load_bundle
from models.labels import LABELS
from models.predictor import Predictor
from worker import pipeline
from worker.clock import ManualClock
from worker.settings import Settings


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def settings_for(tmp_path: Path, bundle: Path | None = None, dest_port: int = 4242, **console) -> Settings:
    return Settings(paths={"spool": tmp_path / "var"}, model={"bundle": str(bundle or tmp_path / "no-bundle")},
                    destination={"port": dest_port}, node={"min_free_mb": 1}, console=console)


def scrape(client: TestClient) -> dict[str, list]:
    text = client.get("/metrics").text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_the_pipeline_counts_predictions_positives_steps_and_dead_letters(tmp_path, tiny_bundle, phantom_dir):
    spool = Spool(tmp_path / "spool")
    clock = ManualClock(dt.datetime(2026, 11, 28, tzinfo=dt.UTC))
    ctx = pipeline.Context(spool=spool, jobs=JobStore(spool.root / "jobs.sqlite", clock=clock.time),
                           audit=AuditLog(spool.root / "a.jsonl", clock=clock.time), clock=clock)
    predictor = Predictor(load_bundle(tiny_bundle), device="cpu")
    model = metrics.model_label(predictor.bundle.digest)
    srcs = sorted((phantom_dir / "images").glob("*.dcm"))[:2]
    for i, src in enumerate(srcs):
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        spool.write_atomic(spool.incoming_path(f"j{i}"), src.read_bytes())
        ctx.jobs.add(job_id=f"j{i}", sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                     study_instance_uid=ds.StudyInstanceUID, calling_aet="MOD", state=JobState.QUEUED,
                     path=spool.relative(spool.incoming_path(f"j{i}")))
    before = {k: value(k, model=model) for k in ("medsam2_predictions_total", "medsam2_predictions_ood_total")}
    positives = {label: value("medsam2_findings_positive_total", model=model, label=label) for label in LABELS}
    steps, batches = value("medsam2_model_step_seconds_count"), value("medsam2_batch_size_sum")
    assert pipeline.infer_jobs(["j0", "j1"], ctx, predictor, lambda j: None) == ["j0", "j1"]
    assert value("medsam2_predictions_total", model=model) == before["medsam2_predictions_total"] + 2
    present = [f.label for j in ("j0", "j1") for f in pipeline.load_prediction(spool.result_dir(j))[0].findings
               if f.present]
    ood = sum(pipeline.load_prediction(spool.result_dir(j))[0].out_of_distribution for j in ("j0", "j1"))
    assert value("medsam2_predictions_ood_total", model=model) == before["medsam2_predictions_ood_total"] + ood
    for label in LABELS:
        assert value("medsam2_findings_positive_total", model=model, label=label) == positives[label] + present.count(label)
    assert value("medsam2_model_step_seconds_count") == steps + 1  # one batch of two
    assert value("medsam2_batch_size_sum") == batches + 2

    dest = Destination("PACS", "127.0.0.1", 4242)
    label = {"destination": "PACS@127.0.0.1:4242"}
    sent, stored = value("medsam2_send_seconds_count", **label), value("medsam2_receipt_to_stored_seconds_count")
    dead = value("medsam2_dead_letters_total", **label)
    assert pipeline.deliver_job("j0", ctx, lambda aet: dest, lambda f, d: None) == JobState.DONE

    def refuse(files, d):
        raise DeliveryFailed("refused")

    assert pipeline.deliver_job("j1", ctx, lambda aet: dest, refuse) == JobState.DEAD
    assert value("medsam2_send_seconds_count", **label) == sent + 1
    assert value("medsam2_receipt_to_stored_seconds_count") == stored + 1
    assert value("medsam2_dead_letters_total", **label) == dead + 1


def test_calling_ae_labels_are_bounded():
    anyone = metrics.AeLabels(cap=2)
    assert [anyone(a) for a in ("A", "B", "C", "A", "")] == ["A", "B", "other", "A", "unknown"]
    listed = metrics.AeLabels(allowed=["MOD1"])
    assert [listed(a) for a in ("MOD1", "EVIL")] == ["MOD1", "not_allowed"]


def test_dead_processes_live_gauges_are_swept(tmp_path):
    for name in ("gauge_livesum_111.db", "gauge_livesum_222.db", "counter_111.db"):
        (tmp_path / name).write_bytes(b"")
    assert metrics.sweep_dead(tmp_path, alive=lambda pid: pid == 222) == [111]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_111.db", "gauge_livesum_222.db"]


def test_multiprocess_mode_adds_up_every_process(tmp_path):
    """Two processes count into one folder; the app's registry reports the sum, and a dead
    process's live gauge is dropped."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)}
    code = ("from dicom_node import metrics; metrics.INSTANCES_RECEIVED.labels(calling_aet='A').inc(); "
            "metrics.MODEL_LOADED.labels(model='m', device='cpu').set(1)")
    for _ in range(2):
        subprocess.run([os.sys.executable, "-c", code], env=env, check=True, timeout=60)
    code = ("from dicom_node import metrics; from prometheus_client import generate_latest; "
            "print(generate_latest(metrics.registry()).decode())")
    out = subprocess.run([os.sys.executable, "-c", code], env=env, check=True, timeout=60, capture_output=True,
                         text=True).stdout
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(out) for s in f.samples}
    assert samples[("medsam2_instances_received_total", (("calling_aet", "A"),))] == 2
    assert ("medsam2_model_loaded", (("device", "cpu"), ("model", "m"))) not in samples  # both processes ended


def test_gpu_gauges_from_torch_allocator(monkeypatch):
    """The GPU worker's sampler (worker.runtime.sample_gpu) with torch.cuda's answers faked:
    no CUDA device here."""
    import torch

    from worker.runtime import sample_gpu

    class Props:
        total_memory = 1000

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 100)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 200)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 150)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: Props())
    sample_gpu(torch.device("cuda", 0))
    got = {n: value(f"medsam2_gpu_memory_{n}_bytes", device="cuda:0") for n in ("allocated", "reserved", "peak", "total")}
    assert got == {"allocated": 100, "reserved": 200, "peak": 150, "total": 1000}


TOUCH_EVERY_METRIC = """
import os, sys
from pathlib import Path
from dicom_node.metrics_dir import prepare
folder = Path(sys.argv[1])
assert prepare(folder)
from prometheus_client.metrics import MetricWrapperBase
from dicom_node import metrics
for m in vars(metrics).values():
    if not isinstance(m, MetricWrapperBase):
        continue
    child = m.labels(*["x"] * len(m._labelnames)) if m._labelnames else m
    {"counter": lambda: child.inc(), "histogram": lambda: child.observe(1), "gauge": lambda: child.set(1)}[m._type]()
if len(sys.argv) > 2:  # then fill the filesystem and make new series, as many as the node makes at most
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"0" * 4096)
    except OSError:
        pass
    assert os.statvfs(folder).f_bavail == 0
    for i in range(64):  # as many calling AE titles as metrics.AeLabels lets through, and 5 destinations
        for counter in (metrics.INSTANCES_RECEIVED, metrics.INSTANCES_SKIPPED, metrics.INSTANCES_QUARANTINED,
                        metrics.ASSOCIATIONS_REFUSED):
            counter.labels(calling_aet=f"AE_TITLE_{i:06d}").inc()
        for reason in ("out_of_resources", "processing_failure"):
            metrics.INSTANCES_REFUSED.labels(calling_aet=f"AE_TITLE_{i:06d}", reason=reason).inc()
    for i in range(5):
        metrics.SEND.labels(destination=f"PACSNAME{i}@10.0.0.{i}:104").observe(1)
        metrics.DEAD_LETTERS.labels(destination=f"PACSNAME{i}@10.0.0.{i}:104").inc()
print(os.getpid())
"""


def test_every_metric_file_a_process_writes_is_reserved(tmp_path):
    """dicom_node.metrics_dir allocates exactly the files prometheus-client then writes, so no
    new series needs a page of the (possibly full) spool."""
    from dicom_node.metrics_dir import FILES

    out = subprocess.run([os.sys.executable, "-c", TOUCH_EVERY_METRIC, str(tmp_path)], capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
    assert out.returncode == 0, out.stderr
    pid = out.stdout.split()[-1]
    written = {p.name: p.stat() for p in tmp_path.glob("*.db")}
    assert sorted(written) == sorted(f"{prefix}_{pid}.db" for prefix in FILES)
    for prefix, size in FILES.items():
        st = written[f"{prefix}_{pid}.db"]
        assert st.st_size == size and st.st_blocks * 512 >= size  # allocated, not sparse, and not grown


def test_a_full_spool_does_not_kill_a_process_that_counts(tmp_path):
    """On a full filesystem, memory-mapped metric files that were sparse would kill the process
    (SIGBUS) at its first new series; reserved ones do not. Needs a tmpfs (root)."""
    where = tmp_path / "fs"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        out = subprocess.run([os.sys.executable, "-c", TOUCH_EVERY_METRIC, str(where), "full"], capture_output=True,
                             text=True, timeout=120,
                             env={k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"})
        assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_the_folder_is_emptied_only_when_every_process_that_wrote_there_is_gone(tmp_path):
    from dicom_node import metrics_dir

    gone = subprocess.run([os.sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / f"counter_{gone}.db").write_bytes(b"")
    (tmp_path / f"counter_{os.getpid()}.db").write_bytes(b"")
    metrics_dir.prepare(tmp_path)  # this test's process is alive: nothing goes
    assert len(list(tmp_path.glob("counter_*.db"))) == 2
    (tmp_path / f"counter_{os.getpid()}.db").unlink()
    metrics_dir.prepare(tmp_path)  # only a process that ended wrote there: emptied
    assert not (tmp_path / f"counter_{gone}.db").exists()


def test_one_port_serves_metrics_health_and_the_console(tmp_path):
    """create_app is the node's app: the console's login page and API sit beside /metrics."""
    settings = settings_for(tmp_path)
    client = TestClient(create_app(settings, Readiness(settings, echo=lambda d: None)))
    assert client.get("/healthz").status_code == 200 and "medsam2_jobs" in client.get("/metrics").text
    login = client.get("/login")
    assert login.status_code == 200 and "<form" in login.text
    assert client.get("/api/jobs", follow_redirects=False).status_code in (401, 303, 307)  # behind the login
    assert "/api/jobs" in client.get("/openapi.json").json()["paths"]
