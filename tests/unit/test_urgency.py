"""Urgent studies: the rules, the KOS, the audit, the metric and the flag in the job's prediction
(the KOS under dciodvfy and C-STORE priority HIGH at a real SCP: tests/integration/test_urgency.py)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from dicom_node import codes, metrics
from dicom_node.audit import AuditLog
from dicom_node.encoders.ko import TITLE, encode_ko
from dicom_node.jobstore import JobState, JobStore
from dicom_node.sender import Destination, Priority
from dicom_node.spool import Spool
from dicom_node.uids import ResultUIDs, results_key
from models import operating_points
from models.calibration import tier
from models.labels import LABELS
from models.prediction import NOT_VALIDATED, Finding, ModelIdentity, Prediction
from models.urgency import DEFAULT_RULES, assess, check_rules, urgent_findings
from worker import pipeline
from worker.clock import ManualClock
from worker.errors import ConfigError
from worker.settings import Settings

NOW = dt.datetime(2026, 12, 2, 8, 0, tzinfo=dt.UTC)
MODEL = ModelIdentity(name="medsam2-cxr-boxlatent", version="0.1.0", digest="c4" * 32,
                      manufacturer=codes.MANUFACTURER, synthetic_training=True,
                      training_data="synthetic phantom radiographs", intended_use="tests")


def _prediction(calls: dict[str, tuple[float, str]], ood: bool = False, spread: float = 0.01) -> Prediction:
    """label -> (probability, tier) for the named labels; every other label absent, low."""
    values = {k: calls.get(k, (0.05, "low")) for k in LABELS}
    findings = tuple(Finding(k, p, 0.5, t, spread) for k, (p, t) in values.items())
    saliency = {k: np.pad(np.ones((4, 4)), 6) for k in calls}
    return Prediction(findings=findings, ood_score=2.0 if ood else 0.1, ood_threshold=1.0,
                      center=np.zeros(4), radius=np.ones(4), saliency=saliency)


# ---------------------------------------------------------------- the rules

def test_default_rules_and_the_operating_points_agree() -> None:
    assert dict(DEFAULT_RULES) == {"Pneumothorax": "medium", "Pleural Effusion": "medium"}
    assert operating_points.URGENT_LABELS == tuple(DEFAULT_RULES)  # one list


def test_a_study_is_urgent_only_for_a_present_finding_at_the_rules_tier_in_distribution() -> None:
    assert [f.label for f in urgent_findings(_prediction({"Pneumothorax": (0.9, "medium")}))] == ["Pneumothorax"]
    assert urgent_findings(_prediction({"Pneumothorax": (0.9, "high")})) != []
    assert urgent_findings(_prediction({"Pneumothorax": (0.55, "low")})) == []  # present, low confidence
    assert urgent_findings(_prediction({"Pneumothorax": (0.3, "medium")})) == []  # absent
    assert urgent_findings(_prediction({"Pneumothorax": (0.9, "high")}, ood=True)) == []  # the model does not know it
    assert urgent_findings(_prediction({"Cardiomegaly": (0.95, "high")})) == []  # not a rule
    both = _prediction({"Pneumothorax": (0.7, "medium"), "Pleural Effusion": (0.95, "high")})
    assert [f.label for f in urgent_findings(both)] == ["Pleural Effusion", "Pneumothorax"]  # most probable first
    assert urgent_findings(both, {"Pneumothorax": "high"}) == []
    assert urgent_findings(both, {}) == []  # a site that flags nothing


def test_a_not_validated_tier_counts_at_the_tier_its_margin_and_spread_give() -> None:
    """The phantom-trained bundle's medium and high tiers read "not validated": a pneumothorax
    must still be flagged (missing one costs more), and the flag says its confidence is not validated."""
    stable = _prediction({"Pneumothorax": (0.95, NOT_VALIDATED)}, spread=0.01)
    assert tier(0.95, 0.5, 0.01) == "high"
    urgency = assess(stable)
    assert urgency.is_urgent and not urgency.confidence_validated
    assert urgency.describe() == "Urgent: Pneumothorax 95% (confidence not validated)"
    assert urgency.to_json() == {"is_urgent": True, "findings": ["Pneumothorax"], "confidence_validated": False}
    assert assess(stable, {"Pneumothorax": "high"}).is_urgent
    medium = _prediction({"Pneumothorax": (0.70, NOT_VALIDATED)}, spread=0.1)  # would be medium
    assert tier(0.70, 0.5, 0.1) == "medium"
    assert assess(medium).is_urgent and not assess(medium, {"Pneumothorax": "high"}).is_urgent
    assert assess(_prediction({"Pneumothorax": (0.9, "high")})).confidence_validated


def test_rules_are_checked_in_the_configuration(tmp_path, monkeypatch) -> None:
    assert Settings().urgent.rules == dict(DEFAULT_RULES)
    cfg = tmp_path / "node.toml"
    cfg.write_text('[urgent]\nrules = {"Pneumothorax" = "high", "Consolidation" = "Medium"}\n')
    from worker.settings import load_settings

    assert load_settings(cfg).urgent.rules == {"Pneumothorax": "high", "Consolidation": "medium"}
    for bad, what in (('{"Pneumothorx" = "high"}', "not a finding label"), ('{"Pneumothorax" = "low"}', "medium")):
        cfg.write_text(f"[urgent]\nrules = {bad}\n")
        with pytest.raises(ConfigError, match=what):
            load_settings(cfg)
    monkeypatch.setenv("MEDSAM2_CXR_URGENT__RULES", '{"Pleural Effusion": "high"}')
    assert Settings().urgent.rules == {"Pleural Effusion": "high"}
    with pytest.raises(ValueError, match="No Finding"):
        check_rules({"No Finding": "high"})


# ---------------------------------------------------------------- the KOS

@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from phantoms import generate

    out = tmp_path_factory.mktemp("phantom")
    generate(1, out, seed=8, size=128)
    return next((out / "images").glob("*.dcm"))


def test_kos_of_an_urgent_study_is_valid_and_says_what_the_flag_is_worth(phantom, tmp_path) -> None:
    source = pydicom.dcmread(phantom)
    urgency = assess(_prediction({"Pneumothorax": (0.95, NOT_VALIDATED)}))
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, results_key(MODEL))
    ko = encode_ko(source, urgency, MODEL, uids, NOW)
    again = encode_ko(source, urgency, MODEL, uids, NOW)
    ko.save_as(tmp_path / "ko.dcm", enforce_file_format=True)
    again.save_as(tmp_path / "again.dcm", enforce_file_format=True)
    assert (tmp_path / "ko.dcm").read_bytes() == (tmp_path / "again.dcm").read_bytes()
    assert ko.StudyInstanceUID == source.StudyInstanceUID and ko.SeriesInstanceUID == uids.ko_series
    assert ko.SOPInstanceUID == uids.ko_instance and ko.Modality == "KO"
    title = ko.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == (TITLE.value, "DCM") == ("113000", "DCM")
    evidence = ko.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert evidence.ReferencedSOPInstanceUID == source.SOPInstanceUID
    (text,) = [i.TextValue for i in ko.ContentSequence
               if i.ConceptNameCodeSequence[0].CodeValue == "113012"]  # Key Object Description
    assert text.startswith("Urgent: Pneumothorax 95% (confidence not validated).")
    assert "not for primary diagnosis" in text and "not validated on real radiographs" in text
    with pytest.raises(ValueError, match="not urgent"):
        encode_ko(source, assess(_prediction({})), MODEL, uids, NOW)


# ---------------------------------------------------------------- the pipeline

@pytest.fixture
def ctx(tmp_path):
    spool = Spool(tmp_path / "spool")
    return pipeline.Context(spool=spool, jobs=JobStore(spool.root / "jobs.sqlite"),
                            audit=AuditLog(spool.root / "audit.jsonl"), lease_s=60.0, clock=ManualClock(NOW))


def _inferred(ctx, job_id: str, source: Path, prediction: Prediction) -> None:
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[job_id])  # one per job
    path = ctx.spool.incoming_path(job_id)
    ds.save_as(path, enforce_file_format=True)
    ctx.jobs.add(job_id=job_id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                 study_instance_uid=ds.StudyInstanceUID, calling_aet="MODALITY", path=ctx.spool.relative(path),
                 state=JobState.QUEUED)
    assert ctx.jobs.claim(job_id, JobState.QUEUED, JobState.INFERRING, 60)
    pipeline.save_prediction(ctx.spool, ctx.spool.result_dir(job_id), prediction, MODEL,
                             assess(prediction, ctx.urgent_rules))
    assert ctx.jobs.advance(job_id, JobState.INFERRING, JobState.INFERRED)


def test_an_urgent_study_gets_a_kos_priority_high_and_an_audit_field(ctx, phantom) -> None:
    _inferred(ctx, "urgent", phantom, _prediction({"Pneumothorax": (0.95, NOT_VALIDATED)}))
    _inferred(ctx, "routine", phantom, _prediction({"Cardiomegaly": (0.95, "high")}))
    sent: dict[str, tuple[list[Path], Destination]] = {}
    dest = Destination("PACS", "127.0.0.1", 4242)
    for job in ("urgent", "routine"):
        assert pipeline.deliver_job(job, ctx, lambda aet: dest,
                                    lambda f, d, job=job: sent.setdefault(job, (f, d))) == JobState.DONE
    files, d = sent["urgent"]
    assert [f.name for f in files] == [pipeline.SR_FILE, pipeline.SC_FILE, pipeline.PR_FILE, pipeline.KO_FILE]
    assert d.priority == Priority.HIGH and d == dest  # same destination, sent first
    assert pydicom.dcmread(files[-1]).Modality == "KO"
    files, d = sent["routine"]
    assert [f.name for f in files] == [pipeline.SR_FILE, pipeline.SC_FILE, pipeline.PR_FILE]
    assert d.priority == Priority.MEDIUM
    records = {r["job"]: r for r in ctx.audit.read() if r["event"] == "sent"}
    assert records["urgent"]["urgent"] == ["Pneumothorax"] and records["routine"]["urgent"] == []
    # What the RIS message reads: the flag in the job's prediction.
    body = json.loads((ctx.spool.result_dir("urgent") / pipeline.PREDICTION).read_text())
    assert body["urgency"] == {"is_urgent": True, "findings": ["Pneumothorax"], "confidence_validated": False}
    prediction, _ = pipeline.load_prediction(ctx.spool.result_dir("urgent"))
    assert pipeline.load_urgency(ctx.spool.result_dir("urgent"), prediction).is_urgent


def test_an_urgent_study_goes_to_a_dicomweb_destination_as_it_is(ctx, phantom) -> None:
    """STOW-RS has no priority: the KOS still goes, to the destination as configured."""
    from dicom_node.dicomweb import WebDestination

    _inferred(ctx, "urgent", phantom, _prediction({"Pneumothorax": (0.95, NOT_VALIDATED)}))
    web = WebDestination("http://vna.example/dicom-web", ae_title="VNA")
    sent: list[tuple[list[Path], object]] = []
    assert pipeline.deliver_job("urgent", ctx, lambda aet: web, lambda f, d: sent.append((f, d))) == JobState.DONE
    [(files, d)] = sent
    assert d is web and files[-1].name == pipeline.KO_FILE


def test_the_rules_in_force_at_inference_decide(ctx, phantom) -> None:
    ctx.urgent_rules = {"Pneumothorax": "high"}
    _inferred(ctx, "j", phantom, _prediction({"Pneumothorax": (0.7, "medium")}))
    sent: list[list[Path]] = []
    assert pipeline.deliver_job("j", ctx, lambda aet: Destination("P", "h", 1), lambda f, d: sent.append(f)) \
        == JobState.DONE
    assert pipeline.KO_FILE not in [f.name for f in sent[0]]


def test_urgent_counter() -> None:
    def value() -> float:
        return metrics.PREDICTIONS_URGENT.labels(model=metrics.model_label(MODEL.digest))._value.get()

    before = value()
    metrics.record_prediction(MODEL.digest, _prediction({}), urgent=True)
    metrics.record_prediction(MODEL.digest, _prediction({}), urgent=False)
    assert value() == before + 1
