"""The discrepancy function (ris.second_read), the report readers (ris.report_in) and the report
store (ris.reportstore), without sockets."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import REGISTRY

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from models.labels import LABELS
from models.prediction import Finding, Prediction
from ris import report_in
from ris.intake import SecondReader
from ris.reportstore import ReportStore
from ris.second_read import MODEL_POSITIVE, REPORT_POSITIVE, discrepancies, label_report


def _pred(called: dict[str, tuple[str, float]], ood: bool = False) -> Prediction:
    findings = tuple(Finding(label, called.get(label, ("low", 0.1))[1], 0.5, called.get(label, ("low", 0.1))[0], 0.0)
                     for label in LABELS)
    return Prediction(findings, 2.0 if ood else 0.0, 1.0, np.zeros(2), np.ones(2))


def test_a_confident_finding_the_report_is_silent_or_negative_on_is_a_discrepancy():
    pred = _pred({"Pleural Effusion": ("high", 0.9), "Cardiomegaly": ("medium", 0.7), "Edema": ("low", 0.55),
                  "Pneumothorax": ("high", 0.95), "No Finding": ("high", 0.9)})
    report = label_report("FINDINGS: The heart is enlarged. No pneumothorax.")
    found = {d.label: d for d in discrepancies(pred, report)}
    assert set(found) == {"Pleural Effusion", "Pneumothorax"}  # not the low edema, not "No Finding"
    assert found["Pneumothorax"].report == "negative" and found["Pleural Effusion"].report == "silent"
    assert found["Pneumothorax"].direction == MODEL_POSITIVE
    assert discrepancies(_pred({"Pleural Effusion": ("high", 0.9)}, ood=True), report) == []


def test_a_hedge_is_a_mention_and_not_validated_tiers_count_only_when_configured():
    pred = _pred({"Pleural Effusion": ("not validated", 0.9)})
    hedge = label_report("IMPRESSION: Possible small left pleural effusion.")
    assert discrepancies(_pred({"Pleural Effusion": ("high", 0.9)}), hedge) == []
    silent = label_report("IMPRESSION: No acute disease.")
    assert discrepancies(pred, silent) == []
    assert [d.label for d in discrepancies(pred, silent, tiers=("not validated",))] == ["Pleural Effusion"]
    with pytest.raises(ValueError, match="tiers"):
        discrepancies(pred, silent, tiers=("certain",))


def test_the_other_way_round_needs_both_labelers_and_the_setting():
    report = label_report("FINDINGS: Right lower lobe consolidation. Heart size normal.")
    assert report.positive("Consolidation")
    pred = _pred({})
    assert discrepancies(pred, report) == []
    found = {d.label: d.direction for d in discrepancies(pred, report, also_report_positive=True)}
    assert found["Consolidation"] == REPORT_POSITIVE and "Cardiomegaly" not in found


def test_both_labelers_and_their_agreement_are_kept():
    labels = label_report("FINDINGS: No pleural effusion. Mild cardiomegaly.")
    assert set(labels.agree) == set(LABELS)
    assert labels.agreement == sum(labels.agree.values()) / 14


def _oru(*segs: str) -> bytes:
    return ("\r".join(["MSH|^~\\&|RIS|H|NODE|H|20261202||ORU^R01|C1|P|2.5.1|||AL|NE||8859/1", *segs]) + "\r").encode(
        "latin-1")


def test_an_oru_is_read_with_its_charset_escapes_sections_and_orders():
    msgs = report_in.from_oru(report_in.parse_message(report_in.decode(_oru(
        "|".join(["OBR", "1", "", "F1", "x"] + [""] * 13 + ["ACC\\T\\1"] + [""] * 6 + ["F"]),
        "OBX|1|ST|110180^Study Instance UID^DCM||1.2.3||||||F",
        "OBX|2|TX|59776-5^Findings^LN||Pleural effusion \\T\\ edema, état stable.||||||F",
        "|".join(["OBR", "2", "", "F2", "x"] + [""] * 20 + ["P"]),
        "ZDS|1.2.4^RIS^Application^DICOM",
        "OBX|1|FT|19005-8^Impressions^LN||Normal.||||||P"))))
    assert [(m.message_id, m.study_instance_uid, m.accession, m.status, m.final) for m in msgs] == [
        ("C1/1", "1.2.3", "ACC&1", "F", True), ("C1/2", "1.2.4", "F2", "P", False)]
    assert msgs[0].text == "FINDINGS:\nPleural effusion & edema, état stable."
    assert msgs[1].text == "IMPRESSION:\nNormal."


@pytest.mark.parametrize("raw, code, why", [
    (b"MSH|^~\\&|RIS|H|N|H|1||ORU^R01|C|P|2.5.1||||||KOI8\rOBR|1\r", "103", "MSH-18"),
    (_oru("OBX|1|TX|x||text"), "100", "before any OBR"),
    (_oru(), "101", "no OBR"),
])
def test_a_message_that_is_no_report_names_why(raw, code, why):
    with pytest.raises(report_in.ReportUnreadable, match=why) as err:
        report_in.from_oru(report_in.parse_message(report_in.decode(raw)))
    assert err.value.code == code


def test_a_report_is_compared_once_and_counted(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite")
    jobs.add(job_id="j1", sop_instance_uid="1.9.1", sop_class_uid="x", study_instance_uid="1.9", calling_aet="A",
             path="p", state=JobState.INFERRED)
    jobs.add(job_id="j2", sop_instance_uid="1.9.2", sop_class_uid="x", study_instance_uid="1.9", calling_aet="A",
             path="p", state=JobState.SKIPPED)
    pred = _pred({"Atelectasis": ("medium", 0.8)})
    reader = SecondReader(ReportStore(tmp_path / "reports.sqlite"), jobs, AuditLog(tmp_path / "audit.jsonl"), b"k",
                          load_prediction=lambda job: pred)
    before = REGISTRY.get_sample_value("medsam2_discrepancies_total", {"label": "Atelectasis"}) or 0.0
    stored, found = reader.receive(report_in.IncomingReport("hl7", "m", "1.9", "A1", "F", "Heart normal."))
    assert [(d.label, d.job_id) for d in found] == [("Atelectasis", "j1")]  # the skipped job is not compared
    assert reader.receive(report_in.IncomingReport("hl7", "m", "1.9", "A1", "F", "Heart normal."))[1] == []
    assert reader.job_inferred(jobs.get("j1")) == []
    assert REGISTRY.get_sample_value("medsam2_discrepancies_total", {"label": "Atelectasis"}) == before + 1
    assert stored.accession_hash and stored.accession_hash != "A1"
