"""The listener over real sockets, driven by DCMTK's storescu/echoscu."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.listener import CANNOT_UNDERSTAND, start_listener
from dicom_node.spool import Spool
from tests.conftest import free_port
from worker import node as node_root
from worker.settings import Settings

pytestmark = pytest.mark.integration

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-12345"
SCU_AET = "MODALITY1"


def make_image(path: Path, sop_class: str = CR_IMAGE, sop_instance_uid: str | None = None,
               **attrs: object) -> Path:
    """A small 256x256 16-bit radiograph carrying patient identifiers."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.Manufacturer = "ACME Radiography"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.Rows = ds.Columns = 256
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(256 * 256, dtype=np.uint32) % 4096).astype(np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


@dataclass
class Node:
    port: int
    spool: Spool
    jobs: JobStore
    audit: AuditLog
    enqueued: list[str] = field(default_factory=list)
    ae_title: str = "MEDSAM2CXR"

    def storescu(self, *files: Path, aet: str = SCU_AET, extra: tuple[str, ...] = ()):
        return subprocess.run(
            [STORESCU, "-v", "-aet", aet, "-aec", self.ae_title, *extra, "127.0.0.1",
             str(self.port), *map(str, files)],
            capture_output=True, text=True, errors="replace", timeout=30,
        )

    def only_job(self):
        jobs = [j for s in JobState for j in self.jobs.by_state(s)]
        assert len(jobs) == 1, jobs
        return jobs[0]

    def events(self) -> list[dict]:
        return list(self.audit.read())


@pytest.fixture
def start_node(tmp_path) -> Callable[..., Node]:
    servers = []
    ids = (f"job{n:04d}" for n in itertools.count())

    def start(min_free_bytes: int = 0, enqueue: Callable[[str], None] | None = None,
              allowed: tuple[str, ...] = (SCU_AET,)) -> Node:
        port = free_port()
        node = Node(port, Spool(tmp_path / "spool", min_free_bytes),
                    JobStore(tmp_path / "spool" / "jobs.sqlite"),
                    AuditLog(tmp_path / "spool" / "audit.jsonl"))
        cfg = node_root.Node(Settings()).listener_config(host="127.0.0.1", port=port, allowed_calling_aets=allowed,
                                                         network_timeout=10)
        servers.append(start_listener(cfg, node.spool, node.jobs, node.audit,
                                      enqueue or node.enqueued.append, new_id=lambda: next(ids)))
        return node

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture(autouse=True)
def _capture_all_logs(caplog):
    caplog.set_level(logging.DEBUG)


def assert_no_phi(node: Node, capsys, caplog, *extra: str) -> None:
    out = capsys.readouterr()
    audit = node.audit.path.read_text() if node.audit.path.exists() else ""
    text = "\n".join([out.out, out.err, caplog.text, audit, *extra])
    assert PATIENT_NAME not in text and "DOE" not in text
    assert PATIENT_ID not in text
    assert "19700101" not in text


def test_frontal_chest_queued_and_enqueued(start_node, tmp_path, capsys, caplog):
    node = start_node()
    src = make_image(tmp_path / "pa.dcm")
    r = node.storescu(src)
    assert r.returncode == 0, r.stderr

    job = node.only_job()
    assert job.state == JobState.QUEUED and job.reason is None
    assert job.calling_aet == SCU_AET
    assert job.sop_instance_uid == pydicom.dcmread(src).SOPInstanceUID
    assert node.enqueued == [job.id]
    stored = node.spool.root / job.path
    assert stored == node.spool.incoming_path(job.id) and stored.exists()
    assert pydicom.dcmread(stored).PixelData == pydicom.dcmread(src).PixelData
    assert list(node.spool.tmp.iterdir()) == []

    [event] = node.events()
    assert event["event"] == "received" and event["job_id"] == job.id
    assert event["calling_aet"] == SCU_AET and event["sop_class_uid"] == CR_IMAGE
    assert event["study_instance_uid"] == job.study_instance_uid
    assert_no_phi(node, capsys, caplog, r.stdout, r.stderr)


def test_duplicate_is_skipped(start_node, tmp_path, capsys, caplog):
    node = start_node()
    src = make_image(tmp_path / "pa.dcm")
    assert node.storescu(src).returncode == 0
    assert node.storescu(src).returncode == 0
    first, second = node.jobs.by_state(JobState.QUEUED) + node.jobs.by_state(JobState.SKIPPED)
    assert first.state == JobState.QUEUED
    assert second.state == JobState.SKIPPED and second.reason == f"duplicate of job {first.id}"
    assert node.enqueued == [first.id]
    assert [e["event"] for e in node.events()] == ["received", "skipped"]
    assert_no_phi(node, capsys, caplog)


@pytest.mark.parametrize("attrs,sop_class,reason", [
    ({"ViewPosition": "LL"}, CR_IMAGE, "lateral view"),
    ({"BodyPartExamined": "HAND"}, CR_IMAGE, "body part HAND not chest"),
    ({"Modality": "CT"}, CT_IMAGE, "SOP class not processed: CT Image Storage"),
])
def test_not_frontal_chest_is_stored_and_skipped(start_node, tmp_path, capsys, caplog,
                                                 attrs, sop_class, reason):
    node = start_node()
    src = make_image(tmp_path / "x.dcm", sop_class, **attrs)
    extra = ("-R",) if sop_class == CT_IMAGE else ()  # propose only what the file needs
    r = node.storescu(src, extra=extra)
    if sop_class == CT_IMAGE:
        # CT is not a supported presentation context: storescu cannot send it at all.
        assert r.returncode != 0
        assert node.events() == [] and node.enqueued == []
        return
    assert r.returncode == 0, r.stderr
    job = node.only_job()
    assert job.state == JobState.SKIPPED and job.reason == reason
    assert (node.spool.root / job.path).exists()
    assert node.enqueued == []
    [event] = node.events()
    assert event["event"] == "skipped" and event["reason"] == reason
    assert_no_phi(node, capsys, caplog, r.stdout, r.stderr)


def test_jpeg2000_stored_unchanged(start_node, capsys, caplog):
    node = start_node()
    src = Path(get_testdata_file("RG1_J2KR.dcm"))
    r = node.storescu(src, extra=("-xv",))  # propose JPEG 2000 lossless
    assert r.returncode == 0, r.stderr
    job = node.only_job()
    assert job.state == JobState.QUEUED
    original = pydicom.dcmread(src)
    stored = pydicom.dcmread(node.spool.root / job.path)
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert stored.PixelData == original.PixelData  # compressed bytes, not re-encoded
    assert stored == original
    assert node.enqueued == [job.id]


def test_echo(start_node):
    node = start_node()
    r = subprocess.run([ECHOSCU, "-aet", SCU_AET, "-aec", node.ae_title, "127.0.0.1",
                        str(node.port)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_unknown_calling_aet_refused(start_node, tmp_path):
    node = start_node(allowed=("PACS1", SCU_AET))
    r = node.storescu(make_image(tmp_path / "pa.dcm"), aet="INTRUDER")
    assert r.returncode != 0
    assert "Calling AE Title Not Recognized" in r.stdout + r.stderr
    assert node.jobs.counts() == {}
    assert list(node.spool.incoming.iterdir()) == []
    events = node.events()
    assert events[0]["event"] == "refused" and events[0]["calling_aet"] == "INTRUDER"
    assert events[0]["reason"] == "calling AE title not allowed"


def test_enqueue_failure_does_not_fail_the_store(start_node, tmp_path, capsys, caplog):
    def broker_down(job_id: str) -> None:
        raise ConnectionError("redis is down")

    node = start_node(enqueue=broker_down)
    r = node.storescu(make_image(tmp_path / "pa.dcm"))
    assert r.returncode == 0, r.stderr
    job = node.only_job()
    assert job.state == JobState.QUEUED
    assert (node.spool.root / job.path).exists()
    out = capsys.readouterr()
    assert "enqueue failed" in out.out + out.err + caplog.text


def test_spool_full_answers_out_of_resources(start_node, tmp_path, capsys, caplog):
    node = start_node(min_free_bytes=10**18)
    r = node.storescu(make_image(tmp_path / "pa.dcm"))
    assert r.returncode != 0
    assert "Received Store Response (Refused: OutOfResources)" in r.stdout + r.stderr
    assert list(node.spool.incoming.iterdir()) == []
    assert list(node.spool.tmp.iterdir()) == []
    assert node.jobs.counts() == {} and node.enqueued == []
    [event] = node.events()
    assert event["event"] == "failed" and event["reason"] == "spool full"
    assert_no_phi(node, capsys, caplog, r.stdout, r.stderr)


def _send_raw(node: Node, path: Path, monkeypatch) -> int:
    """C-STORE a file's bytes as they are (pynetdicom streams them without decoding)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(CR_IMAGE, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    try:
        return assoc.send_c_store(path).Status
    finally:
        assoc.release()


def _raw_file(path: Path, body: bytes) -> Path:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = CR_IMAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    buf = DicomBytesIO()
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + buf.getvalue() + body)
    return path


@pytest.mark.parametrize("body,reason", [
    # (0008,0018) declared a sequence of undefined length holding garbage
    (b"\x08\x00\x18\x00SQ\x00\x00\xff\xff\xff\xff\x01\x02", "unparseable header: "),
    # a well-formed header without SOP Class / SOP Instance UID
    (b"\x08\x00\x60\x00CS\x02\x00CR", "missing SOPClassUID, SOPInstanceUID"),
])
def test_not_understood_is_quarantined(start_node, tmp_path, monkeypatch, body, reason):
    node = start_node()
    status = _send_raw(node, _raw_file(tmp_path / "bad.dcm", body), monkeypatch)
    assert status == CANNOT_UNDERSTAND
    [event] = node.events()
    assert event["event"] == "quarantined" and event["reason"].startswith(reason)
    qid = event["job_id"]
    assert (node.spool.quarantine_dir / f"{qid}.dcm").exists()
    saved = json.loads((node.spool.quarantine_dir / f"{qid}.json").read_text())
    assert saved["reason"] == event["reason"]
    assert list(node.spool.incoming.iterdir()) == []
    assert node.jobs.counts() == {} and node.enqueued == []
