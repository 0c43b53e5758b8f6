"""Shadow mode ([node] mode = "shadow"): results computed and kept in the spool, nothing sent to the
PACS, RIS or FHIR server; only a configured QA destination receives the DICOM results."""

from __future__ import annotations

import datetime as dt
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
from worker.errors import ConfigError
from worker.node import Node
from worker.settings import Settings, load_settings


def _ctx(tmp_path: Path, **kw) -> pipeline.Context:
    clock = ManualClock(dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC))
    return pipeline.Context(spool=Spool(tmp_path / "spool"),
                            jobs=JobStore(tmp_path / "spool" / "jobs.sqlite", clock=clock.time),
                            audit=AuditLog(tmp_path / "spool" / "audit.jsonl", clock=clock.time), lease_s=60,
                            clock=clock, **kw)


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor(load_bundle(tiny_bundle), device="cpu")


def _inferred(ctx: pipeline.Context, predictor, src: Path, job_id: str = "job1") -> None:
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    ctx.spool.write_atomic(ctx.spool.incoming_path(job_id), src.read_bytes())
    ctx.jobs.add(job_id=job_id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                 study_instance_uid=ds.StudyInstanceUID, calling_aet="MODALITY",
                 path=ctx.spool.relative(ctx.spool.incoming_path(job_id)), state=JobState.QUEUED)
    assert pipeline.infer_jobs([job_id], ctx, predictor, lambda j: None) == [job_id]


def _no_pacs(aet: str):
    raise AssertionError("shadow mode asked for the PACS of a caller")


def _no_reports(aet: str):
    raise AssertionError("shadow mode asked for the RIS or FHIR targets of a caller")


def test_shadow_mode_sends_nothing_and_keeps_every_result_in_the_spool(tmp_path, predictor, phantom_dir):
    from ris.delivery import Reports
    from ris.ledger import Ledger

    reports = Reports(targets_for=_no_reports, ledger=Ledger(tmp_path / "ledger.sqlite"))  # a RIS and FHIR route
    ctx = _ctx(tmp_path, shadow=True, reports=reports)
    _inferred(ctx, predictor, sorted((phantom_dir / "images").glob("*.dcm"))[0])
    sent: list = []
    assert pipeline.deliver_job("job1", ctx, _no_pacs, lambda f, d: sent.append((f, d))) == JobState.DONE
    assert sent == []
    job = ctx.jobs.get("job1")
    assert job.state == JobState.DONE and job.reason == "shadow: results kept in the spool"
    folder = ctx.spool.result_dir("job1")
    names = sorted(p.name for p in folder.glob("*.dcm"))
    assert {"sr.dcm", "sc.dcm", "pr.dcm"} <= set(names)
    shadow = [r for r in ctx.audit.read() if r["event"] == "shadow"]
    assert len(shadow) == 1 and shadow[0]["qa_destination"] is None
    assert shadow[0]["results"] == [pydicom.dcmread(folder / n, stop_before_pixels=True).SOPInstanceUID
                                    for n in [Path(f).name for f in shadow[0]["files"]]]
    assert not [r for r in ctx.audit.read() if r["event"] == "sent"]
    # a second message for the job does nothing
    assert pipeline.deliver_job("job1", ctx, _no_pacs, lambda f, d: sent.append((f, d))) is None and sent == []


def test_shadow_mode_sends_the_dicom_results_to_the_qa_destination_only(tmp_path, predictor, phantom_dir):
    qa = Destination("QAVIEW", "127.0.0.1", 4343)
    ctx = _ctx(tmp_path, shadow=True, qa_destination=qa)
    _inferred(ctx, predictor, sorted((phantom_dir / "images").glob("*.dcm"))[1])
    sent: list[tuple[list[Path], Destination]] = []
    assert pipeline.deliver_job("job1", ctx, _no_pacs, lambda f, d: sent.append((f, d))) == JobState.DONE
    assert len(sent) == 1 and sent[0][1].ae_title == "QAVIEW"
    assert [pydicom.dcmread(f).Modality for f in sent[0][0]][:3] == ["SR", "OT", "PR"]
    assert all(f.parent == ctx.spool.result_dir("job1") for f in sent[0][0])
    assert ctx.jobs.get("job1").reason == "shadow: results to the QA destination QAVIEW"
    assert [r["qa_destination"] for r in ctx.audit.read() if r["event"] == "shadow"] == ["QAVIEW"]


def test_a_qa_destination_that_refuses_dead_letters_as_a_pacs_would(tmp_path, predictor, phantom_dir):
    ctx = _ctx(tmp_path, shadow=True, qa_destination=Destination("QAVIEW", "127.0.0.1", 4343))
    _inferred(ctx, predictor, sorted((phantom_dir / "images").glob("*.dcm"))[2])

    def refuse(files, dest):
        raise DeliveryFailed("QAVIEW refused: 0xA700")

    assert pipeline.deliver_job("job1", ctx, _no_pacs, refuse) == JobState.DEAD
    assert ctx.spool.dead_letters() == ["job1"]
    assert not [r for r in ctx.audit.read() if r["event"] == "shadow"]


def test_live_mode_still_sends_to_the_pacs(tmp_path, predictor, phantom_dir):
    ctx = _ctx(tmp_path)
    _inferred(ctx, predictor, sorted((phantom_dir / "images").glob("*.dcm"))[0])
    sent: list = []
    pacs = Destination("PACS", "127.0.0.1", 4242)
    assert pipeline.deliver_job("job1", ctx, lambda aet: pacs, lambda f, d: sent.append(d)) == JobState.DONE
    assert sent == [pacs] and ctx.jobs.get("job1").reason is None


def test_settings_of_shadow_mode(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text('[paths]\nspool = "%s"\n[node]\nmode = "shadow"\n[node.qa_destination]\nae_title = "QAVIEW"\n'
                   'host = "10.0.0.9"\nport = 104\n' % (tmp_path / "spool"))
    node = Node(load_settings(cfg))
    assert node.shadow and node.qa_destination().ae_title == "QAVIEW"
    assert node.mode() == {"mode": "shadow", "qa_destination": {"ae_title": "QAVIEW", "host": "10.0.0.9", "port": 104},
                           "sends": "DICOM results to the QA destination only; nothing to the PACS, RIS or FHIR server"}
    ctx = node.context()
    assert ctx.shadow and ctx.qa_destination.ae_title == "QAVIEW"
    live = Node(Settings(paths={"spool": tmp_path / "live"}))
    assert live.mode() == {"mode": "live"} and not live.context().shadow and live.context().qa_destination is None
    with pytest.raises(ConfigError, match="shadow mode only"):
        cfg.write_text('[node]\nmode = "live"\n[node.qa_destination]\nae_title = "QAVIEW"\n')
        load_settings(cfg)
    with pytest.raises(ConfigError, match="DICOM results only"):
        cfg.write_text('[node]\nmode = "shadow"\n[node.qa_destination.ris]\nhost = "ris"\n')
        load_settings(cfg)
    with pytest.raises(ConfigError, match="mode"):
        cfg.write_text('[node]\nmode = "dry-run"\n')
        load_settings(cfg)


def test_the_console_shows_shadow_mode(tmp_path):
    from fastapi.testclient import TestClient

    from tests.console_helpers import console_app, users_toml
    from tests.unit.test_console import _login

    cfg = tmp_path / "node.toml"
    base = f'[paths]\nspool = "{tmp_path / "var"}"\n[console]\nsession_secret = "s"\n' + users_toml()
    cfg.write_text(base + '\n[node]\nmode = "shadow"\n[node.qa_destination]\nae_title = "QAVIEW"\nport = 4343\n')
    client = TestClient(console_app(load_settings(cfg), echo=lambda d: (True, "")))
    _login(client, "viewer")
    assert client.get("/api/today").json()["mode"]["qa_destination"]["ae_title"] == "QAVIEW"
    page = client.get("/").text
    assert 'id="mode"' in page and "Shadow mode" in page and "QAVIEW@127.0.0.1:4343" in page
    cfg.write_text(base)
    client = TestClient(console_app(load_settings(cfg), echo=lambda d: (True, "")))
    _login(client, "viewer")
    assert client.get("/api/today").json()["mode"] == {"mode": "live"} and 'id="mode"' not in client.get("/").text
