"""An unreachable job store (dicom_node.database.StoreUnavailable) at intake: Out of Resources, and the
instance file kept only when the row may have been written (a commit in doubt), for the sweep at
start to judge; a transient failure to the workers."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.audit import AuditLog
from dicom_node.database import StoreUnavailable
from dicom_node.jobstore import JobStore
from dicom_node.listener import OUT_OF_RESOURCES, Intake, accept_instance
from dicom_node.spool import Spool
from worker.failures import is_transient
from worker.node import Node
from worker.settings import Settings


class DownStore(JobStore):
    def __init__(self, path, in_doubt: bool) -> None:
        super().__init__(path)
        self.in_doubt = in_doubt

    def add(self, **kwargs):
        raise StoreUnavailable("the store postgresql://db:5432/x is unavailable", in_doubt=self.in_doubt)


def _image(path):
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = bytes(64 * 64 * 2)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("in_doubt", [False, True])
def test_store_unavailable_answers_out_of_resources(tmp_path, in_doubt):
    spool = Spool(tmp_path / "spool", 0)
    jobs = DownStore(tmp_path / "spool" / "jobs.sqlite", in_doubt)
    audit = AuditLog(tmp_path / "spool" / "audit.jsonl")
    enqueued: list[str] = []
    deps = Intake(cfg=Node(Settings()).listener_config(), spool=spool, jobs=jobs, audit=audit, enqueue=enqueued.append,
                  new_id=lambda: "0" * 32)
    received = _image(tmp_path / "received.dcm")
    answer = accept_instance(deps, received, "MOD", "127.0.0.1", None)
    assert answer.status == OUT_OF_RESOURCES and answer.job is None and enqueued == []
    kept = sorted(p.name for p in spool.incoming.glob("*.dcm"))
    assert kept == ([f"{'0' * 32}.dcm"] if in_doubt else [])
    assert [r["reason"] for r in audit.read() if r["event"] == "failed"] == ["job store unavailable"]
    # the sweep at the next start removes a kept file no row names (here: none was written)
    assert spool.sweep_incoming(lambda job_id: JobStore.get(jobs, job_id) is not None) == int(in_doubt)


def test_store_unavailable_is_transient_for_the_workers():
    assert is_transient(StoreUnavailable("away")) and isinstance(StoreUnavailable("away"), ConnectionError)


def test_metrics_say_the_store_is_down_and_still_give_the_spools_gauges(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from dicom_node.metrics import NodeCollector

    class Down:
        def counts(self):
            raise StoreUnavailable("away")

        def oldest_created_at(self, state):
            raise StoreUnavailable("away")

    spool = Spool(tmp_path / "spool", 0)
    for jobs, up in ((Down(), 0.0), (JobStore(tmp_path / "jobs.sqlite"), 1.0)):
        registry = CollectorRegistry()
        registry.register(NodeCollector(jobs, spool, ["queued"]))
        text = generate_latest(registry).decode()
        assert f"medsam2_store_up {up}" in text and "medsam2_spool_free_bytes" in text
        assert ("medsam2_jobs{" in text) == bool(up)


class FlakyDatabase:
    """A database that is away for the first ``down`` transactions, then answers (a restart)."""

    def __init__(self, real, down: int) -> None:
        self.real, self.down = real, down
        self.kind, self.shared = real.kind, True

    def transaction(self):
        if self.down > 0:
            self.down -= 1
            raise StoreUnavailable("the store postgresql://db:5432/x is unavailable")
        return self.real.transaction()

    def create(self, *args, **kwargs) -> None:
        self.real.create(*args, **kwargs)


def test_a_state_change_waits_for_a_store_that_comes_back_then_gives_up(tmp_path, monkeypatch):
    """A worker's give-back or finish while the store restarts is not lost to the lease: it is
    tried again until the store answers, for MOVE_RETRY_S; after that the error is raised."""
    import dicom_node.jobstore as jobstore
    from dicom_node.database import SqliteDatabase
    from dicom_node.jobstore import JobState

    slept: list[float] = []
    monkeypatch.setattr(jobstore.time, "sleep", slept.append)
    db = FlakyDatabase(SqliteDatabase(tmp_path / "jobs.sqlite"), down=0)
    store = JobStore(db)
    store.add(job_id="j", sop_instance_uid="1.2.3", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", study_instance_uid="1.2",
              calling_aet="CR1", path="incoming/j.dcm", state=JobState.QUEUED)
    assert store.claim("j", JobState.QUEUED, JobState.INFERRING, 600) is not None
    db.down = 3
    assert store.release("j", JobState.INFERRING, JobState.QUEUED)
    assert len(slept) == 3 and store.get("j").state == JobState.QUEUED

    monkeypatch.setattr(jobstore, "MOVE_RETRY_S", 0.0)
    db.down = 1
    with pytest.raises(StoreUnavailable):
        store.advance("j", JobState.QUEUED, JobState.SKIPPED)
