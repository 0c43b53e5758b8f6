"""STOW-RS in over real HTTP (and HTTPS): the node's HTTP app (console/app.py create_app, served by
uvicorn) takes multipart/related DICOM bodies from dicomweb-client and httpx; every instance goes
through the listener's own step (spool, inspection, filter, job row, enqueue on the spool's
filesystem broker), and the answer is PS3.18's Store Instances Response."""

from __future__ import annotations

import ssl
import subprocess
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.uid import generate_uid

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.spool import Spool
from dicom_node.stow import new_token
from models.labels import LABELS
from models.prediction import Finding, ModelIdentity, Prediction
from models.urgency import assess
from tests.conftest import free_port, require_peer

pytestmark = pytest.mark.integration
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BOUNDARY = "medsam2-test-boundary"


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _variant(src: Path, **attrs: object) -> pydicom.Dataset:
    """A phantom radiograph as its own instance (new SOP Instance UID), with attributes changed."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _body(parts: list[bytes], part_type: str = "application/dicom") -> bytes:
    out = b""
    for p in parts:
        out += f"--{BOUNDARY}\r\nContent-Type: {part_type}\r\n\r\n".encode() + p + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


class Node:
    def __init__(self, settings, scheme: str) -> None:
        from console.app import ConsoleServer, create_app

        self.settings = settings
        self.server = ConsoleServer(create_app(settings), settings).start()
        self.base = f"{scheme}://127.0.0.1:{settings.console.port}/dicomweb"
        self.jobs = JobStore(settings.spool / "jobs.sqlite")
        self.audit = AuditLog(settings.spool / "audit.jsonl")

    def all_jobs(self):
        return sorted((j for s in JobState for j in self.jobs.by_state(s)), key=lambda j: j.created_at)

    def broker_messages(self) -> int:
        """Messages the enqueuer left on the spool's filesystem broker (Celery's 'gpu' queue)."""
        folder = self.settings.spool / "broker" / "queue"
        return sum(1 for f in folder.iterdir() if f.is_file()) if folder.exists() else 0

    def post(self, body: bytes, token: str | None, study: str | None = None,
             content_type: str = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
             **kw) -> httpx.Response:
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = self.base + "/studies" + (f"/{study}" if study else "")
        return httpx.post(url, content=body, headers=headers, timeout=30, **kw)


@pytest.fixture
def node(tmp_path):
    from worker.settings import Settings

    token, digest = new_token()
    settings = Settings(paths={"spool": tmp_path / "var"}, console={"port": free_port()}, node={"min_free_mb": 16},
                        dicomweb={"clients": [{"name": "VNA", "token_sha256": digest}]})
    n = Node(settings, "http")
    n.token = token
    yield n
    n.server.stop()


def test_dicomweb_client_stores_and_a_second_post_is_one_job(node, phantom_dir):
    sources = sorted((phantom_dir / "images").glob("*.dcm"))[:2]
    datasets = [pydicom.dcmread(s) for s in sources]
    client = DICOMwebClient(node.base, headers={"Authorization": f"Bearer {node.token}"})
    answer = client.store_instances(datasets)
    stored = {str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence}
    assert stored == {str(d.SOPInstanceUID) for d in datasets} and "FailedSOPSequence" not in answer

    jobs = node.all_jobs()
    assert [(j.state, j.calling_aet) for j in jobs] == [(JobState.QUEUED, "VNA")] * 2
    for j in jobs:  # the bytes are in the spool as sent
        assert pydicom.dcmread(node.settings.spool / j.path).PixelData in {d.PixelData for d in datasets}
    assert node.broker_messages() == 2
    assert list((node.settings.spool / "tmp").iterdir()) == []

    again = client.store_instances(datasets[:1])  # the same instance once more: stored, and skipped
    assert len(again.ReferencedSOPSequence) == 1
    jobs = node.all_jobs()
    assert [j.state for j in jobs].count(JobState.QUEUED) == 2 and node.broker_messages() == 2
    [dup] = [j for j in jobs if j.state == JobState.SKIPPED]
    assert dup.reason.startswith("duplicate of job ") and dup.sop_instance_uid == str(datasets[0].SOPInstanceUID)
    assert [e["event"] for e in node.audit.read()] == ["received", "received", "skipped"]


def test_each_instance_answered_as_ps3_18_says(node, phantom_dir):
    src = min((phantom_dir / "images").glob("*.dcm"))
    good, lateral = _variant(src), _variant(src, ViewPosition="LL")
    ct = _variant(src, SOPClassUID=CT_IMAGE, Modality="CT")
    ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    garbage = b"\0" * 200
    r = node.post(_body([_bytes(good), _bytes(lateral), _bytes(ct), garbage]), node.token)
    assert r.status_code == 202 and r.headers["content-type"] == "application/dicom+json"
    answer = pydicom.Dataset.from_json(r.json())
    assert {str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence} == {
        str(good.SOPInstanceUID), str(lateral.SOPInstanceUID)}
    failed = [(str(i.get("ReferencedSOPInstanceUID", "")), int(i.FailureReason)) for i in answer.FailedSOPSequence]
    assert failed == [(str(ct.SOPInstanceUID), 0x0122), ("", 0xC000)]
    states = {j.sop_instance_uid: (j.state, j.reason) for j in node.all_jobs()}
    assert states == {str(good.SOPInstanceUID): (JobState.QUEUED, None),
                      str(lateral.SOPInstanceUID): (JobState.SKIPPED, "lateral view")}
    [quarantined] = Spool(node.settings.spool).quarantined()
    assert quarantined["reason"].startswith("unparseable header") and quarantined["calling_aet"] == "VNA"

    # The URL names another study: nothing is stored, 409 with 0xA900.
    other = _variant(src)
    r = node.post(_body([_bytes(other)]), node.token, study=generate_uid())
    assert r.status_code == 409
    [item] = pydicom.Dataset.from_json(r.json()).FailedSOPSequence
    assert (str(item.ReferencedSOPInstanceUID), int(item.FailureReason)) == (str(other.SOPInstanceUID), 0xA900)
    # ... and its own study's URL takes it.
    assert node.post(_body([_bytes(other)]), node.token, study=str(other.StudyInstanceUID)).status_code == 200
    assert len(node.all_jobs()) == 3
    assert list((node.settings.spool / "tmp").iterdir()) == []


def test_no_token_wrong_token_wrong_media_type(node, phantom_dir):
    body = _body([_bytes(_variant(min((phantom_dir / "images").glob("*.dcm"))))])
    for token in (None, "not-the-token", node.token + "x"):
        r = node.post(body, token)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert node.post(body, node.token, content_type="application/dicom").status_code == 415
    assert node.post(body, node.token, content_type=f"multipart/related; type=\"application/dicom+xml\"; "
                                                    f"boundary={BOUNDARY}").status_code == 415
    assert node.post(_body([b"{}"], part_type="application/json"), node.token).status_code == 409
    assert node.post(b"no multipart here", node.token).status_code == 400
    assert node.all_jobs() == []
    refusals = [e for e in node.audit.read() if e["event"] == "refused"]
    assert len(refusals) >= 3 and node.token not in node.audit.path.read_text()


def test_a_body_cut_short_keeps_what_was_complete(node, phantom_dir):
    srcs = sorted((phantom_dir / "images").glob("*.dcm"))
    first, second = _bytes(_variant(srcs[0])), _bytes(_variant(srcs[1]))
    body = _body([first, second])
    cut = body[: len(body) - len(second) // 2]  # the second part ends half-way, no closing boundary
    r = node.post(cut, node.token)
    assert r.status_code == 202
    answer = pydicom.Dataset.from_json(r.json())
    assert len(answer.ReferencedSOPSequence) == 1 and int(answer.FailedSOPSequence[0].FailureReason) == 0xC000
    assert [j.state for j in node.all_jobs()] == [JobState.QUEUED]
    assert list((node.settings.spool / "tmp").iterdir()) == []


def test_stow_over_https_with_the_node_certificate(tmp_path, phantom_dir):
    from worker.settings import Settings

    require_peer("openssl")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", "node.key", "-out", "node.crt", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], cwd=tmp_path, check=True,
                   capture_output=True)
    token, digest = new_token()
    settings = Settings(paths={"spool": tmp_path / "var"}, console={"port": free_port()}, node={
        "min_free_mb": 16, "tls": {"cert": str(tmp_path / "node.crt"), "key": str(tmp_path / "node.key")}},
        dicomweb={"clients": [{"name": "CLOUD", "token_sha256": digest}]})
    node = Node(settings, "https")
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "node.crt"))
        ds = _variant(min((phantom_dir / "images").glob("*.dcm")))
        r = node.post(_body([_bytes(ds)]), token, verify=ctx)
        assert r.status_code == 200, r.text
        assert [(j.state, j.calling_aet) for j in node.all_jobs()] == [(JobState.QUEUED, "CLOUD")]
        with pytest.raises(httpx.HTTPError):  # not served in plain HTTP
            httpx.post(f"http://127.0.0.1:{settings.console.port}/dicomweb/studies", content=b"", timeout=5)
    finally:
        node.server.stop()


# ---------------------------------------------------------------- STOW-RS out: WebDestination


def test_web_destination_to_a_node_stores_and_names_each_refusal(node, phantom_dir, tmp_path):
    """The sender against this node's own STOW-RS endpoint: stored instances become jobs there;
    a wrong token and a refused instance fail the delivery with what the server said."""
    from dicom_node.dicomweb import WebDestination
    from dicom_node.sender import DeliveryFailed

    src = sorted((phantom_dir / "images").glob("*.dcm"))
    files = [tmp_path / "a.dcm", tmp_path / "b.dcm"]
    for s, f in zip(src, files):
        _variant(s).save_as(f, enforce_file_format=True)
    dest = WebDestination(node.base, "NODE2", token=node.token)
    assert dest.probe() is None  # GET /studies: 405 from a STOW-only service
    dest.store(files)
    assert [j.calling_aet for j in node.all_jobs()] == ["VNA", "VNA"]

    with pytest.raises(DeliveryFailed, match="HTTP 401"):
        WebDestination(node.base, "NODE2", token="wrong").store(files)
    assert WebDestination(f"http://127.0.0.1:{free_port()}/dicomweb").probe().startswith("cannot connect")
    ct = _variant(src[0], SOPClassUID=CT_IMAGE, Modality="CT")
    ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    with pytest.raises(DeliveryFailed, match=rf"HTTP 409: {ct.SOPInstanceUID} FailureReason 0x0122"):
        dest.store([tmp_path / "ct.dcm"])
    with pytest.raises(DeliveryFailed, match=r"not stored: .* FailureReason 0x0122"):  # 202: one of two failed
        dest.store([tmp_path / "ct.dcm", files[0]])
    assert len(node.all_jobs()) == 3  # a's second copy, skipped as a duplicate


def test_a_dicomweb_destination_retries_with_backoff_then_dead_letters(tmp_path):
    """The pipeline's delivery step with a dicomweb destination nobody serves: send_with_retry's
    backoff, then the results in the dead-letter folder with the reason, as for C-STORE."""
    from dicom_node.dicomweb import WebDestination
    from dicom_node.sender import send_with_retry
    from worker import pipeline

    spool = Spool(tmp_path / "spool")
    ctx = pipeline.Context(spool=spool, jobs=JobStore(spool.root / "jobs.sqlite"),
                           audit=AuditLog(spool.root / "audit.jsonl"), lease_s=60.0)
    source = spool.incoming_path("job1")
    spool.write_atomic(source, b"not read: the results exist")
    ctx.jobs.add(job_id="job1", sop_instance_uid=generate_uid(), sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                 study_instance_uid=generate_uid(), calling_aet="VNA", path=spool.relative(source),
                 state=JobState.QUEUED)
    ctx.jobs.claim("job1", JobState.QUEUED, JobState.INFERRING, 60.0)
    quiet = Prediction(findings=tuple(Finding(k, 0.05, 0.5, "low", 0.01) for k in LABELS), ood_score=0.1,
                       ood_threshold=1.0, center=np.zeros(4), radius=np.ones(4), saliency={})
    model = ModelIdentity(name="m", version="1", digest="d" * 64, manufacturer="medsam2-cxr",
                          synthetic_training=True, training_data="phantoms", intended_use="tests")
    pipeline.save_prediction(spool, spool.result_dir("job1"), quiet, model, assess(quiet))
    results = [pipeline.SR_FILE, pipeline.SC_FILE, pipeline.PR_FILE]  # what deliver_job sends (not urgent)
    for name in results:
        ds = pydicom.Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid(), "1.2.3"
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.save_as(spool.result_dir("job1") / name, enforce_file_format=True)
    ctx.jobs.advance("job1", JobState.INFERRING, JobState.INFERRED)
    dest = WebDestination(f"http://127.0.0.1:{free_port()}/dicom-web", "CLOUD")
    sleeps: list[float] = []

    def send(files, d) -> None:
        send_with_retry(files, d, attempts=4, backoff_s=1.0, max_backoff_s=3.0, sleep=sleeps.append, timeout=3)

    assert pipeline.deliver_job("job1", ctx, lambda aet: dest, send) == JobState.DEAD
    assert sleeps == [1.0, 2.0, 3.0]
    job = ctx.jobs.get("job1")
    assert "CLOUD http://127.0.0.1" in job.reason and "ConnectionError" in job.reason
    assert sorted(p.name for p in (spool.dead / "job1").iterdir()) == sorted([*results, "reason.json"])


def test_a_full_spool_answers_out_of_resources_and_keeps_nothing(tmp_path, phantom_dir):
    from worker.settings import Settings

    token, digest = new_token()
    settings = Settings(paths={"spool": tmp_path / "var"}, console={"port": free_port()},
                        node={"min_free_mb": 2**40},  # a watermark no disk clears
                        dicomweb={"clients": [{"name": "VNA", "token_sha256": digest}]})
    node = Node(settings, "http")
    try:
        ds = _variant(min((phantom_dir / "images").glob("*.dcm")))
        r = node.post(_body([_bytes(ds)]), token)
        assert r.status_code == 409
        [item] = pydicom.Dataset.from_json(r.json()).FailedSOPSequence
        assert (str(item.ReferencedSOPInstanceUID), int(item.FailureReason)) == (str(ds.SOPInstanceUID), 0xA700)
        assert node.all_jobs() == [] and list(Spool(settings.spool).incoming.iterdir()) == []
        assert list(Spool(settings.spool).tmp.iterdir()) == []
    finally:
        node.server.stop()


def test_the_console_probes_a_dicomweb_destination_by_http_not_c_echo():
    import socket

    from console.data import c_echo
    from worker.settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing serves it
    d = Settings(destination={"type": "dicomweb", "url": f"http://127.0.0.1:{port}/dicom-web"}).destination
    up, detail = c_echo(d, 2.0, "MEDSAM2CXR")
    assert up is False and detail.startswith("cannot connect: ConnectionError")
