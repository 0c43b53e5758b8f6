"""[objects]: the spool and a real S3 store (SeaweedFS, tests/seaweed.py) behind one interface.

The same contract for both backends; then the node across hosts that share nothing but the object
store and the job table: a listener, a GPU worker and an io worker, each with its own folder; and
the store stopped under a live listener (Out of Resources, nothing half-kept) and started again.
"""

from __future__ import annotations

import itertools
import subprocess
import time
import uuid
from pathlib import Path

import pydicom
import pytest

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.listener import start_listener
from dicom_node.objects import ObjectsUnavailable, S3Objects, SpoolObjects, open_objects, s3_client
from dicom_node.sender import Destination
from dicom_node.spool import Spool
from models.bundle import load_bundle
from models.predictor import Predictor
from tests import seaweed
from tests.conftest import free_port, require_peer
from tests.seaweed import BUCKET, SeaweedFS, weed_binary
from worker import node as node_root
from worker import pipeline
from worker.settings import Settings

pytestmark = pytest.mark.integration
seaweedfs, s3_env = seaweed.seaweedfs, seaweed.s3_env  # the fixtures: one SeaweedFS for the session

SCU_AET = "MODALITY1"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------- the contract, both backends

@pytest.fixture(params=["spool", "s3"])
def host(request, tmp_path):
    """host(name) -> the object store as the host `name` sees it. The spool backend has one folder
    for every host (the embedded default); S3 gives each host its own scratch and one bucket prefix."""
    if request.param == "spool":
        shared = Spool(tmp_path / "spool")
        return lambda name: SpoolObjects(shared)
    store = request.getfixturevalue("s3_env")
    prefix = f"contract/{uuid.uuid4().hex}"
    return lambda name: open_objects(f"s3://{BUCKET}/{prefix}", store.endpoint, Spool(tmp_path / name))


def test_put_then_fetch_from_another_host(host, tmp_path):
    a, b = host("listener"), host("gpu")
    a.put("incoming/j1.dcm", b"instance bytes")
    src = tmp_path / "finished.bin"
    src.write_bytes(b"x" * (3 * 2**20 + 7))  # more than one download chunk
    a.put("results/j1/sc.dcm", src)
    assert src.exists()  # a finished file is left for its owner
    got = b.fetch("incoming/j1.dcm")
    assert got == b.local.root / "incoming" / "j1.dcm" and got.read_bytes() == b"instance bytes"
    assert b.fetch("results/j1/sc.dcm").read_bytes() == src.read_bytes()
    assert list(b.local.tmp.iterdir()) == []  # downloads are renamed into place whole


def test_exists_list_delete(host):
    a, b = host("listener"), host("gpu")
    for key in ("results/j1/prediction.json", "results/j1/saliency.npz", "results/j10/prediction.json"):
        a.put(key, key.encode())
    assert b.keys("results/j1") == ["results/j1/prediction.json", "results/j1/saliency.npz"]  # not j10
    assert b.keys("results/j1/") == b.keys("results/j1") and b.keys("results/nothing") == []
    assert [p.read_bytes() for p in b.fetch_prefix("results/j1")] == [b"results/j1/prediction.json",
                                                                      b"results/j1/saliency.npz"]
    assert b.exists("results/j1/saliency.npz") and not b.exists("results/j2/saliency.npz")
    a.put("results/j1/saliency.npz", b"rewritten")  # a put replaces
    assert b.fetch("results/j1/saliency.npz").read_bytes() == b"rewritten"
    b.delete("results/j1/saliency.npz")
    b.delete("results/j1/saliency.npz")  # a missing key is no error
    assert not a.exists("results/j1/saliency.npz")
    assert not (b.local.root / "results/j1/saliency.npz").exists()
    with pytest.raises(FileNotFoundError):
        a.fetch("results/j1/saliency.npz")


def test_evict_drops_only_a_local_copy(host):
    a, b = host("listener"), host("gpu")
    a.put("incoming/j1.dcm", b"bytes")
    local = b.fetch("incoming/j1.dcm")
    b.evict("incoming/j1.dcm")
    assert b.exists("incoming/j1.dcm")  # the object stays
    assert local.exists() == isinstance(b, SpoolObjects)  # the spool's file is the object itself


def test_unrecorded_instance_objects_swept_once_old(host):
    from dicom_node.objects import sweep_unrecorded

    a = host("listener")
    for key in ("incoming/orphan.dcm", "incoming/recorded.dcm", "results/orphan/sr.dcm"):
        a.put(key, b"x")
    known = {"recorded"}.__contains__
    assert sweep_unrecorded(a, known, older_than_s=3600) == 0  # a listener may be between its PUT and its row
    time.sleep(1.5)  # S3 LastModified has whole seconds
    assert sweep_unrecorded(a, known, older_than_s=1) == 1
    assert a.keys("incoming") == ["incoming/recorded.dcm"] and a.exists("results/orphan/sr.dcm")


@pytest.mark.parametrize("key", ["", "../jobs.sqlite", "/etc/passwd", "incoming//j.dcm", "incoming/./j.dcm",
                                 "incoming/j 1.dcm", "a/../../b"])
def test_keys_are_node_made_relative_paths(host, key):
    with pytest.raises(ValueError, match="not an object key"):
        host("listener").put(key, b"x")


# ---------------------------------------------------------------- a store that is not there

def test_unreachable_store_raises_objects_unavailable(tmp_path):
    spool = Spool(tmp_path / "scratch")
    away = S3Objects(s3_client(f"http://127.0.0.1:{free_port()}", connect_timeout_s=1.0), BUCKET, "x", spool)
    src = tmp_path / "f.dcm"
    src.write_bytes(b"bytes")
    t0 = time.monotonic()
    for call in (lambda: away.put("incoming/j.dcm", b"b"), lambda: away.put("incoming/j.dcm", src),
                 lambda: away.fetch("incoming/j.dcm"), lambda: away.exists("incoming/j.dcm"),
                 lambda: away.keys("incoming"), lambda: away.delete("incoming/j.dcm")):
        with pytest.raises(ObjectsUnavailable, match="unreachable"):
            call()
    assert time.monotonic() - t0 < 60  # prompt: a refusal, not a sender's timeout
    assert _files(spool.root) == []  # nothing half-fetched
    assert isinstance(ObjectsUnavailable("x"), ConnectionError)  # transient for the pipeline (worker.failures)


def test_wrong_credentials_name_what_to_check(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody-known")
    store = open_objects(f"s3://{BUCKET}/creds", s3_env.endpoint, Spool(tmp_path / "scratch"))
    with pytest.raises(ObjectsUnavailable, match="AWS_"):
        store.put("incoming/j.dcm", b"b")


# ---------------------------------------------------------------- hosts sharing only the store

@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor(load_bundle(tiny_bundle), device="cpu")


def _listener(spool: Spool, jobs: JobStore, audit: AuditLog, objects, enqueued: list[str]):
    ids = (f"job{n:04d}" for n in itertools.count())
    port = free_port()
    cfg = node_root.Node(Settings()).listener_config(host="127.0.0.1", port=port, allowed_calling_aets=(SCU_AET,),
                                                     network_timeout=10)
    server = start_listener(cfg, spool, jobs, audit, enqueued.append, new_id=lambda: next(ids), objects=objects)
    return server, port


def _storescu(port: int, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([require_peer("storescu"), "-v", "-aet", SCU_AET, "-aec", "MEDSAM2CXR", "127.0.0.1",
                           str(port), str(path)], capture_output=True, text=True, errors="replace", timeout=60)


def test_listener_gpu_and_io_hosts_share_only_the_store(s3_env, tmp_path, predictor, phantom_dir):
    url = f"s3://{BUCKET}/node-{uuid.uuid4().hex[:8]}"
    jobs = JobStore(tmp_path / "db" / "jobs.sqlite")  # the job table is the other shared thing ([store] url)
    hosts = {name: Spool(tmp_path / name) for name in ("listener", "gpu", "io")}
    objects = {name: open_objects(url, s3_env.endpoint, spool) for name, spool in hosts.items()}
    audits = {name: AuditLog(tmp_path / name / "audit.jsonl") for name in hosts}
    enqueued: list[str] = []
    server, port = _listener(hosts["listener"], jobs, audits["listener"], objects["listener"], enqueued)
    try:
        src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
        r = _storescu(port, src)
        assert r.returncode == 0 and "Received Store Response (Success)" in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        server.shutdown()
    [job_id] = enqueued
    job = jobs.get(job_id)
    assert job.state == JobState.QUEUED and job.path == f"incoming/{job_id}.dcm"
    assert objects["gpu"].exists(job.path)  # the object, not the listener's file, is what the job names
    assert _files(hosts["listener"].incoming) == []  # the listener kept no copy

    gpu = pipeline.Context(spool=hosts["gpu"], objects=objects["gpu"], jobs=jobs, audit=audits["gpu"], lease_s=60)
    sends: list[str] = []
    assert pipeline.infer_jobs([job_id], gpu, predictor, sends.append) == [job_id]
    assert sends == [job_id] and jobs.get(job_id).state == JobState.INFERRED
    assert objects["io"].keys(f"results/{job_id}") == [f"results/{job_id}/prediction.json",
                                                       f"results/{job_id}/saliency.npz"]

    io = pipeline.Context(spool=hosts["io"], objects=objects["io"], jobs=jobs, audit=audits["io"], lease_s=60)
    delivered: list[bytes] = []
    dest = Destination("PACS", "127.0.0.1", 4242)
    state = pipeline.deliver_job(job_id, io, lambda aet: dest,
                                 lambda files, d: delivered.extend(f.read_bytes() for f in files))
    assert state == JobState.DONE
    modalities = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(b)).Modality for b in delivered]
    assert modalities[:3] == ["SR", "OT", "PR"]
    kept = objects["listener"].keys(f"results/{job_id}")
    assert {"sr.dcm", "sc.dcm", "pr.dcm"} <= {k.rsplit("/", 1)[1] for k in kept}  # the results are objects too
    source = pydicom.dcmread(objects["listener"].fetch(job.path), stop_before_pixels=True)
    assert source.SOPInstanceUID == pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID
    for name in ("gpu", "io"):  # each worker host dropped its copies once its step was done
        leftovers = [f for f in _files(hosts[name].root) if f.endswith((".dcm", ".json", ".npz"))
                     and not f.startswith("audit")]
        assert leftovers == [], (name, leftovers)
    assert [e["event"] for e in audits["gpu"].read()] == ["inferred"]
    assert [e["event"] for e in audits["io"].read()] == ["sent"]


def test_store_stopped_out_of_resources_then_recovers(tmp_path, monkeypatch, phantom_dir):
    own = SeaweedFS(tmp_path / "seaweedfs", weed_binary())  # its own, to stop and start under a live listener
    for name, value in own.env().items():
        monkeypatch.setenv(name, value)
    own.start()
    try:
        spool = Spool(tmp_path / "listener")
        jobs, audit = JobStore(tmp_path / "db" / "jobs.sqlite"), AuditLog(tmp_path / "listener" / "audit.jsonl")
        objects = open_objects(f"s3://{BUCKET}/outage", own.endpoint, spool)
        enqueued: list[str] = []
        server, port = _listener(spool, jobs, audit, objects, enqueued)
        try:
            first, second = sorted((phantom_dir / "images").glob("*.dcm"))[:2]
            r = _storescu(port, first)
            assert "Received Store Response (Success)" in r.stdout + r.stderr, r.stdout + r.stderr

            own.stop()
            t0 = time.monotonic()
            r = _storescu(port, second)
            refused_s = time.monotonic() - t0
            assert "Received Store Response (Refused: OutOfResources)" in r.stdout + r.stderr, r.stdout + r.stderr
            print(f"[objects] store stopped: C-STORE refused with Out of Resources in {refused_s:.1f} s")
            assert refused_s < 30
            assert jobs.counts() == {JobState.QUEUED.value: 1} and len(enqueued) == 1  # no row for the refused one
            assert _files(spool.incoming) == [] and _files(spool.tmp) == []  # nothing half-kept
            assert [e["reason"] for e in audit.read() if e["event"] == "failed"] == ["object store unavailable"]

            own.start()  # same folder, same ports: the store comes back with what it had
            r = _storescu(port, second)  # the PACS's retry
            assert "Received Store Response (Success)" in r.stdout + r.stderr, r.stdout + r.stderr
        finally:
            server.shutdown()
        assert len(enqueued) == 2 and jobs.counts() == {JobState.QUEUED.value: 2}
        for job_id in enqueued:  # nothing lost: both instances are in the store, as the job rows say
            job = jobs.get(job_id)
            assert objects.exists(job.path)
        sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (first, second)}
        got = {pydicom.dcmread(objects.fetch(jobs.get(j).path), stop_before_pixels=True).SOPInstanceUID
               for j in enqueued}
        assert got == sent
    finally:
        own.stop()


# ---------------------------------------------------------------- the bundle and index: built once, fetched by digest

def _node(spool: Path, url: str, endpoint: str) -> node_root.Node:
    return node_root.Node(Settings(paths={"spool": spool}, objects={"url": url, "endpoint": endpoint}))


def test_bundle_published_once_fetched_and_verified_by_each_host(s3_env, tmp_path, tiny_bundle):
    import shutil

    from dicom_node.objects import DigestMismatch, manifest_path
    from models.digests import file_digest

    url = f"s3://{BUCKET}/shared-{uuid.uuid4().hex[:8]}"
    builder = _node(tmp_path / "listener", url, s3_env.endpoint)
    shutil.copytree(tiny_bundle, builder.layout.default_bundle)  # what the first start built on this host
    assert builder.publish_shared() == ["bundle"]  # no index built here: only the bundle

    gpu = _node(tmp_path / "gpu", url, s3_env.endpoint)
    got = gpu.fetch_shared("bundle")
    assert got == gpu.layout.default_bundle
    assert {p.name: file_digest(p) for p in got.iterdir()} == {p.name: file_digest(p) for p in tiny_bundle.iterdir()}
    assert load_bundle(got).digest == load_bundle(tiny_bundle).digest
    assert gpu.fetch_shared("index") is None  # none published, none here: no similar cases
    stamp = {p.name: p.stat().st_mtime_ns for p in got.iterdir()}
    assert gpu.fetch_shared("bundle") == got and {p.name: p.stat().st_mtime_ns for p in got.iterdir()} == stamp

    # an object changed in the store after publishing: a new host refuses it, a host with the good copy keeps it
    name = sorted(p.name for p in tiny_bundle.iterdir())[0]
    prefix = url.split("/", 3)[3]
    s3_env.client().put_object(Bucket=BUCKET, Key=f"{prefix}/shared/bundle/files/{name}", Body=b"tampered")
    late = _node(tmp_path / "gpu2", url, s3_env.endpoint)
    with pytest.raises(DigestMismatch, match=name):
        late.fetch_shared("bundle")
    assert not late.layout.default_bundle.exists() and not manifest_path(late.layout.default_bundle).exists()
    assert gpu.fetch_shared("bundle") == got and file_digest(got / name) == file_digest(tiny_bundle / name)
