"""The draft report in DICOM: Basic Text SR and the TID 1500 SR, valid (dciodvfy), in the pipeline."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.encoders.notices import ENGLISH as ENGLISH_NOTICES
from dicom_node.encoders.sr import encode_sr
from dicom_node.encoders.text import TEXT_SERIES_NUMBER, BasicTextSR, encode_text_sr
from dicom_node.uids import ResultUIDs
from index.draft import Drafter, Reporter, reference_line
from index.labelers import get_extractor
from index.retrieval import CaseIndex, Retriever
from index.store import new_case
from tests.conftest import require_peer
from tests.unit.test_encoders import _model, _prediction, _real_cr, _synthetic_dx

NOW = dt.datetime(2025, 3, 4, 5, 6, 7)
SOURCES = {"cr": _real_cr, "dx": _synthetic_dx}


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """A draft with similar cases, guideline references and an OOD line."""
    model = _model()
    index = CaseIndex.create(tmp_path_factory.mktemp("idx") / "idx", model.digest, 16)
    reports = [
        ("FINDINGS: Small right pleural effusion with a meniscus. Patchy lung opacity.\nIMPRESSION: Small effusion.",
         {"Pleural Effusion": 1, "Lung Opacity": 1}),
        ("FINDINGS: Central venous catheter with tip in the superior vena cava. The lungs are clear.\nIMPRESSION: Line.",
         {"Support Devices": 1}),
    ]
    index.add([new_case(r, lab, np.full(16, 0.05 * i), np.full(16, 0.1), "Site A") for i, (r, lab) in enumerate(reports)])
    return Reporter(Retriever(index), Drafter(get_extractor("lexicon")))(_prediction(ood=True), model.digest)


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run([require_peer("dciodvfy"), str(path)], capture_output=True, timeout=60)
    lines = (proc.stdout + proc.stderr).decode("latin-1").splitlines()
    return [line for line in lines if "Error" in line]


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_text_sr_is_valid_and_carries_the_draft(kind: str, draft, tmp_path) -> None:
    source, model = SOURCES[kind](), _model()
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, model.digest)
    ds = encode_text_sr(source, _prediction(ood=True), model, draft, uids, NOW)
    path = tmp_path / "text.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert not _dciodvfy_errors(path)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    assert back.SOPInstanceUID == uids.text_instance and back.SeriesInstanceUID == uids.text_series
    assert back.SeriesNumber == TEXT_SERIES_NUMBER and back.Modality == "SR"
    assert back.StudyInstanceUID == source.StudyInstanceUID and back.PatientID == source.PatientID
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    assert back.PerformedProcedureCodeSequence[0].CodeValue == "399208008"
    texts = [t for t in _texts(back)]
    assert draft.findings in texts and draft.impression in texts
    assert any(draft.similar[0].case.case_id in t and "similarity" in t for t in texts)
    # verbatim, accents too ("Müller NL"): the result's character set holds them (encoders.header)
    assert all(reference_line(i, r) in texts for i, r in enumerate(draft.references, 1))
    assert any(ENGLISH_NOTICES.draft_notice in t for t in texts) and any("outside the model's experience" in t for t in texts)
    # deterministic: the same inputs give the same bytes
    again = io.BytesIO()
    encode_text_sr(source, _prediction(ood=True), model, draft, uids, NOW).save_as(again, enforce_file_format=True)
    assert again.getvalue() == path.read_bytes()


def _texts(ds: Dataset) -> list[str]:
    out = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            out.append(item.TextValue)
        out += _texts(item)
    return out


def test_dsrdump_renders_the_sections(draft, tmp_path) -> None:
    binary = require_peer("dsrdump")
    source, model = _synthetic_dx(), _model()
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, model.digest)
    encode_text_sr(source, _prediction(), model, draft, uids, NOW).save_as(tmp_path / "t.dcm", enforce_file_format=True)
    dump = subprocess.run([binary, str(tmp_path / "t.dcm")], capture_output=True, text=True, timeout=60).stdout
    for heading in ("Basic Text SR", "Findings", "Impressions", "Guideline references", "Similar prior cases"):
        assert heading in dump, heading


def test_basic_text_sr_refuses_numeric_content() -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    root = hd.sr.ContainerContentItem(name=codes.LN.DiagnosticImagingReport, template_id="2000")
    root.ContentSequence = hd.sr.ContentSequence([hd.sr.NumContentItem(
        name=codes.DCM.Probability, value=0.5, unit=codes.UCUM.NoUnits,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)])
    with pytest.raises(ValueError, match="NUM is not allowed"):
        BasicTextSR([_synthetic_dx()], root, "1.2.3", 1, "1.2.3.4", 1)


def test_tid1500_sr_with_and_without_the_draft(draft, tmp_path) -> None:
    source, model = _synthetic_dx(), _model()
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, model.digest)
    with_draft = encode_sr(source, _prediction(), model, uids, NOW, draft=draft)
    with_draft.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    assert not _dciodvfy_errors(tmp_path / "a.dcm")
    texts = _texts(pydicom.dcmread(tmp_path / "a.dcm"))
    assert draft.findings in texts and draft.impression in texts
    assert sum("similarity" in t for t in texts) == len(draft.similar) == 2
    assert any(t.startswith("[1] ") for t in texts)  # guideline references
    without = _texts(encode_sr(source, _prediction(), model, uids, NOW))
    assert "No similar cases index configured." in without and draft.findings not in without


# ---------------------------------------------------------------- in the pipeline

def test_pipeline_sends_the_text_sr_when_an_index_is_configured(tmp_path, tiny_bundle, phantom_dir) -> None:
    from dicom_node.audit import AuditLog
    from dicom_node.jobstore import JobState, JobStore
    from dicom_node.sender import Destination
    from dicom_node.spool import Spool
    from index.build import build_index, manifest_items
    from index.draft import open_reporter
    from models.bundle import load_bundle
    from models.predictor import Predictor
    from worker import pipeline
    from worker.clock import ManualClock

    bundle = load_bundle(tiny_bundle)
    build_index(tmp_path / "idx", bundle, manifest_items(phantom_dir), progress=False)
    predictor = Predictor(bundle, device="cpu")
    src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    sent: dict[str, list[Path]] = {}
    for name, reporter in (("with", open_reporter(tmp_path / "idx")), ("without", None)):
        spool = Spool(tmp_path / name)
        ctx = pipeline.Context(spool=spool, jobs=JobStore(tmp_path / name / "jobs.sqlite"),
                               audit=AuditLog(tmp_path / name / "audit.jsonl"),
                               clock=ManualClock(dt.datetime(2026, 1, 2, tzinfo=dt.UTC)), reporter=reporter)
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        spool.write_atomic(spool.incoming_path("j1"), src.read_bytes())
        ctx.jobs.add(job_id="j1", sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                     study_instance_uid=ds.StudyInstanceUID, calling_aet="MOD",
                     path=spool.relative(spool.incoming_path("j1")), state=JobState.QUEUED)
        assert pipeline.infer_jobs(["j1"], ctx, predictor, lambda j: None) == ["j1"]
        dest = Destination("PACS", "127.0.0.1", 4242)
        assert pipeline.deliver_job("j1", ctx, lambda aet, dest=dest: dest, lambda f, d, name=name: sent.setdefault(name, list(f))) == JobState.DONE
    classes = [pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID.name for f in sent["with"]]
    assert classes[:4] == ["Comprehensive 3D SR Storage", "Secondary Capture Image Storage", "Basic Text SR Storage",
                           "Grayscale Softcopy Presentation State Storage"]  # and a KOS when urgent
    assert len(sent["without"]) == len(sent["with"]) - 1
    text = pydicom.dcmread(sent["with"][2])
    assert text.StudyInstanceUID == pydicom.dcmread(src, stop_before_pixels=True).StudyInstanceUID
    assert any("similarity" in t for t in _texts(text))  # the index's cases are cited
    assert not _dciodvfy_errors(sent["with"][2]) and not _dciodvfy_errors(sent["with"][0])
    assert "No similar cases index configured." in _texts(pydicom.dcmread(sent["without"][0]))
