"""The edge's relay (worker/edge.py) on a real job table and spool, with destinations that record
what they are given: a source goes to the hub de-identified, a hub that is away loses nothing, a
result comes back re-identified into the source's PACS, and a defect fails only its own job."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.audit import AuditLog
from dicom_node.deid import ReidentificationMap
from dicom_node.filters import TO_RELAY
from dicom_node.jobstore import JobState, JobStore
from dicom_node.sender import DeliveryFailed
from dicom_node.spool import Spool
from worker.edge import FORWARDED, STORED, Relay
from worker.settings import Settings


@dataclass
class Recorder:
    ae_title: str
    host: str = "127.0.0.1"
    port: int = 104
    down: bool = False
    got: list[Dataset] = field(default_factory=list)

    def store(self, files: list[Path], calling_ae: str = "", timeout: float = 0) -> None:
        if self.down:
            raise DeliveryFailed(f"{self.ae_title}: association failed")
        self.got += [pydicom.dcmread(f) for f in files]

    def probe(self, calling_ae: str = "", timeout: float = 0) -> str | None:
        return None


def _file(ds: Dataset, path: Path) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)


def _source(burned: str = "NO") -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Hakata^Hanako=博多^花子=はかた^はなこ", "JP-0001", "19610401"
    ds.AccessionNumber, ds.Modality, ds.BurnedInAnnotation = "ACC-7", "DX", burned
    ds.FrameOfReferenceUID = generate_uid()
    return ds


@pytest.fixture
def edge(tmp_path):
    spool = Spool(tmp_path / "spool", min_free_bytes=0)
    jobs, audit = JobStore(tmp_path / "spool" / "jobs.sqlite"), AuditLog(tmp_path / "spool" / "audit.jsonl")
    hub, pacs = Recorder("HUB"), Recorder("PACS")
    relay = Relay(jobs=jobs, spool=spool, audit=audit, reid=ReidentificationMap(tmp_path / "spool" / "reid.sqlite"),
                  key="site-key", hub=hub, destination_for=lambda caller: pacs if caller == "ISLAND" else Recorder("?"),
                  calling_ae="EDGE")

    def receive(ds: Dataset, caller: str, reason: str | None = None) -> str:
        job_id = generate_uid().split(".")[-1]
        path = spool.incoming_path(job_id)
        _file(ds, path)
        jobs.add(job_id=job_id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                 study_instance_uid=ds.StudyInstanceUID, calling_aet=caller, path=spool.relative(path),
                 state=JobState.QUEUED, reason=reason)
        return job_id

    return relay, receive, hub, pacs, jobs


def test_forwarded_de_identified_kept_while_the_hub_is_away_then_results_come_back_re_identified(edge):
    relay, receive, hub, pacs, jobs = edge
    src = _source()
    job = receive(src, "ISLAND")
    hub.down = True
    assert relay.run_once() == 0 and relay.run_once() == 0
    assert jobs.get(job).state == JobState.QUEUED  # given back, not failed: tried again on the next pass
    hub.down = False
    assert relay.run_once() == 1
    assert jobs.get(job).state == JobState.DONE and jobs.get(job).reason == FORWARDED
    (sent,) = hub.got
    assert "JP-0001" not in str(sent) and "博多" not in str(sent) and sent.PatientIdentityRemoved == "YES"
    assert sent.StudyInstanceUID != src.StudyInstanceUID and sent.SOPInstanceUID != src.SOPInstanceUID

    result = Dataset()  # what the hub makes: its own SOP and series UIDs, references to what it was sent
    result.SpecificCharacterSet = sent.SpecificCharacterSet
    result.SOPClassUID, result.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.34", generate_uid()
    result.StudyInstanceUID, result.SeriesInstanceUID = sent.StudyInstanceUID, generate_uid()
    result.PatientName, result.PatientID, result.Manufacturer = sent.PatientName, sent.PatientID, "medsam2-cxr"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sent.SOPClassUID, sent.SOPInstanceUID
    result.ReferencedImageSequence = [ref]
    result.FrameOfReferenceUID = sent.FrameOfReferenceUID
    assert sent.FrameOfReferenceUID != src.FrameOfReferenceUID
    back_job = receive(result, "HUB", TO_RELAY)
    pacs.down = True
    assert relay.run_once() == 0 and jobs.get(back_job).state == JobState.QUEUED
    pacs.down = False
    assert relay.run_once() == 1 and jobs.get(back_job).reason == STORED
    (stored,) = pacs.got
    assert str(stored.PatientName) == str(src.PatientName) and stored.PatientID == "JP-0001"
    assert stored.StudyInstanceUID == src.StudyInstanceUID and stored.AccessionNumber == "ACC-7"
    assert stored.ReferencedImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert stored.FrameOfReferenceUID == src.FrameOfReferenceUID
    assert stored.SOPInstanceUID == result.SOPInstanceUID and stored.SeriesInstanceUID == result.SeriesInstanceUID


def test_a_defect_fails_its_own_job_only(edge):
    relay, receive, hub, pacs, jobs = edge
    burned = receive(_source(burned="YES"), "ISLAND")
    stranger = _source()
    stranger.Manufacturer = "medsam2-cxr"
    unknown = receive(stranger, "HUB", TO_RELAY)  # a "result" of a study this edge never forwarded
    fine = receive(_source(), "ISLAND")
    assert relay.run_once() == 1
    assert jobs.get(burned).state == JobState.FAILED and "Burned In Annotation" in jobs.get(burned).reason
    assert jobs.get(unknown).state == JobState.FAILED and "not forwarded from this site" in jobs.get(unknown).reason
    assert jobs.get(fine).state == JobState.DONE and len(hub.got) == 1 and not pacs.got
    assert "JP-0001" not in jobs.get(burned).reason


def test_edge_role_needs_a_hub_over_tls():
    with pytest.raises(ValueError, match="needs \\[edge.hub\\]"):
        Settings(node={"role": "edge"}, edge={"hub": {"ae_title": "HUB", "host": "hub"}})
    s = Settings(node={"role": "edge"}, edge={"hub": {"ae_title": "HUB", "host": "hub", "tls": {"ca": "ca.pem"}},
                                              "tls": {"cert": "e.crt", "key": "e.key"}})
    assert s.edge.port == 11113 and Settings().node.role == "node"
