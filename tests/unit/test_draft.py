"""Draft reports: status from findings and tiers, retrieved sentences, normals, OOD, guidelines."""

from __future__ import annotations

import re

import numpy as np
import pytest

from index.draft import (
    DraftConfig,
    Drafter,
    Reporter,
    bootstrap_draft,
    sentences,
)
from index.guidelines import GUIDELINES, for_label
from index.labelers import get_extractor
from index.retrieval import NO_INDEX, CaseIndex, Retriever, Similar
from index.store import new_case
from index.wording import ENGLISH
from models.labels import LABELS
from models.prediction import Finding, Prediction

DIGEST = "cd" * 32
label = get_extractor("lexicon")


def _prediction(calls: dict[str, tuple[float, str]], ood: float = 0.0, d: int = 4) -> Prediction:
    """calls: label -> (probability, tier); threshold 0.5; others confidently absent (0.05, high)."""
    findings = tuple(Finding(k, calls.get(k, (0.05, "high"))[0], 0.5, calls.get(k, (0.05, "high"))[1], 0.01)
                     for k in LABELS)
    return Prediction(findings=findings, ood_score=ood, ood_threshold=1.0, center=np.zeros(d, np.float32),
                      radius=np.full(d, 0.5, np.float32))


def _similar(reports: list[tuple[str, dict]]) -> list[Similar]:
    return [Similar(new_case(r, lab, np.zeros(4), np.full(4, 0.5), "Site A"), 0.9 - 0.1 * i, 0.1 * i, i + 1)
            for i, (r, lab) in enumerate(reports)]


EFFUSION_CASE = ("FINDINGS: Moderate right pleural effusion with a meniscus. The heart is normal in size. "
                 "ECG monitoring electrodes overlie the chest.\nIMPRESSION: Moderate right pleural effusion.",
                 {"Pleural Effusion": 1, "Cardiomegaly": 0, "Support Devices": 1})
CARDIO_CASE = ("FINDINGS: The cardiac silhouette is enlarged. Small bilateral pleural effusions.\n"
               "IMPRESSION: Cardiomegaly.", {"Cardiomegaly": 1, "Pleural Effusion": 1})
NORMAL_CASE = ("FINDINGS: The lungs are clear. No pleural effusion or pneumothorax.\nIMPRESSION: Normal.", {"No Finding": 1})


def test_sentences_keep_decimals_and_numbered_items() -> None:
    assert sentences("A 1.5 cm nodule. No effusion.") == ["A 1.5 cm nodule.", "No effusion."]
    assert sentences("1. Cardiomegaly. 2. Small effusion.") == ["1. Cardiomegaly.", "2. Small effusion."]


def test_confident_findings_take_agreeing_sentences_from_similar_cases() -> None:
    pred = _prediction({"Pleural Effusion": (0.95, "high"), "Cardiomegaly": (0.9, "high")})
    draft = Drafter(label).draft(pred, _similar([EFFUSION_CASE, CARDIO_CASE, NORMAL_CASE]))
    # Effusion: the first agreeing sentence of the most similar case, verbatim.
    assert "Moderate right pleural effusion with a meniscus." in draft.findings
    # Its "heart is normal in size" contradicts the predicted cardiomegaly: not taken.
    assert "normal in size" not in draft.findings
    assert "The cardiac silhouette is enlarged." in draft.findings
    origins = {s.label: s.origin for s in draft.statements if s.status == "present"}
    assert origins["Pleural Effusion"].startswith("case C") and origins["Cardiomegaly"].startswith("case C")
    # Electrodes were in the case but are not predicted: never copied.
    assert "ECG" not in draft.findings
    assert "(high confidence)" in draft.impression and "Cardiomegaly" in draft.impression
    lab = label(draft.report())
    assert lab["Pleural Effusion"] == 1 and lab["Cardiomegaly"] == 1
    assert lab["Pneumothorax"] == 0 and lab["Edema"] == 0 and lab["Fracture"] == 0  # confident negatives stated
    assert lab["Support Devices"] is None


def test_tiers_are_in_the_wording_and_retrieval_moves_only_unsure_calls() -> None:
    calls = {"Pleural Effusion": (0.7, "medium"), "Pneumothorax": (0.55, "low"), "Edema": (0.45, "low"),
             "Cardiomegaly": (0.45, "low"), "Fracture": (0.3, "medium")}
    cfg = DraftConfig(k=3)
    similar = _similar([CARDIO_CASE, CARDIO_CASE, EFFUSION_CASE])  # cardiomegaly in 2 of 3, no pneumothorax
    draft = Drafter(label, cfg).draft(_prediction(calls), similar)
    st = draft.status
    assert st["Pleural Effusion"] == "probable"
    assert "Pneumothorax" not in st  # low-tier positive that no similar case has: dropped
    assert st["Cardiomegaly"] == "possible"  # below threshold, but most similar cases have it
    assert "Edema" not in st and "Fracture" not in st  # unsure negatives without support: not mentioned
    assert "Probable pleural effusion (medium confidence)" in draft.impression
    assert "Possible cardiomegaly (low confidence)" in draft.impression
    lab = label(draft.report())
    assert lab["Pleural Effusion"] == 1 and lab["Cardiomegaly"] == -1 and lab["Pneumothorax"] is None
    # Without retrieval evidence the same prediction keeps the low-tier positive and drops the rest.
    alone = Drafter(label, cfg).draft(_prediction(calls), None)
    assert alone.status.get("Pneumothorax") == "possible" and "Cardiomegaly" not in alone.status
    assert any(NO_INDEX in n.lower() for n in alone.notes) and not alone.similar


def test_a_normal_study_reads_normal() -> None:
    draft = Drafter(label).draft(_prediction({}), _similar([NORMAL_CASE]))
    assert draft.impression == ENGLISH.normal_impression
    assert "The lungs are clear." in draft.findings and "No pleural effusion or pneumothorax." in draft.findings
    lab = label(draft.report())
    assert lab["No Finding"] == 1 and all(lab[k] in (0, None) for k in LABELS if k != "No Finding")
    assert not draft.references


def test_out_of_distribution_line() -> None:
    inside = Drafter(label).draft(_prediction({}, ood=0.5), None)
    outside = Drafter(label).draft(_prediction({}, ood=1.5), None)
    assert "outside the model's experience" not in inside.findings
    assert "outside the model's experience" in outside.findings and "1.50" in outside.findings
    assert label(outside.report()) == label(inside.report())  # the line sets no label


def test_guideline_references_per_finding() -> None:
    pred = _prediction({"Pleural Effusion": (0.95, "high"), "Lung Lesion": (0.9, "high"), "Fracture": (0.9, "high")})
    draft = Drafter(label).draft(pred, [])
    keys = {(r.label, r.guideline.key) for r in draft.references}
    assert ("Pleural Effusion", "bts-pleural-2023") in keys and ("Lung Lesion", "fleischner-2017") in keys
    assert not [r for r in draft.references if r.label == "Fracture"]  # none curated: none invented
    text = draft.text()
    assert "Radiology. 2017;284(1):228-243" in text and "Thorax. 2023;78(Suppl 3):s1-s42" in text
    assert "GUIDELINE REFERENCES" in text


def test_guideline_table_is_well_formed() -> None:
    for g in GUIDELINES.values():
        assert re.search(r"\. (19|20)\d\d;\d+(\(.+?\))?:[es]?\d+-[es]?\d+\.$", g.citation), g.citation
        assert g.doi is None or re.fullmatch(r"10\.\d{4,}/\S+", g.doi), g.doi
    assert for_label("No Finding") == [] and for_label("Pneumothorax")[0].guideline.key == "bts-pleural-2023"


def test_bootstrap_baseline_has_no_tiers_and_no_cases() -> None:
    p = dict.fromkeys(LABELS, 0.05)
    p.update({"Pleural Effusion": 0.8, "Edema": 0.45})
    draft = bootstrap_draft(p, dict.fromkeys(LABELS, 0.5))
    assert draft.status["Pleural Effusion"] == "present" and "Edema" not in draft.status
    assert "confidence" not in draft.impression and not draft.similar and not draft.references
    lab = label(draft.report())
    assert lab["Pleural Effusion"] == 1 and lab["Edema"] is None and lab["Pneumothorax"] == 0


def test_reporter_searches_the_index_and_survives_another_bundle(tmp_path) -> None:
    index = CaseIndex.create(tmp_path / "idx", DIGEST, 4)
    index.add([new_case(r, lab, np.full(4, 0.1 * i), np.full(4, 0.5), "Site A")
               for i, (r, lab) in enumerate([EFFUSION_CASE, CARDIO_CASE, NORMAL_CASE])])
    reporter = Reporter(Retriever(index), Drafter(label))
    pred = _prediction({"Pleural Effusion": (0.95, "high")})
    draft = reporter(pred, DIGEST)
    assert len(draft.similar) == 3 and draft.similar[0].rank == 1
    assert "similarity" in draft.text() and draft.similar[0].case.case_id in draft.text()
    other = reporter(pred, "ef" * 32)
    assert not other.similar and any("another model bundle" in n for n in other.notes)
    assert other.status == Drafter(label).draft(pred, None).status


@pytest.mark.parametrize("extractor", ["lexicon", "grammar"])
def test_template_sentences_read_as_intended(extractor: str) -> None:
    """Every template the drafter writes is labelled as meant by both labelers."""
    from index.draft import TEMPLATES, template_sentence

    lab = get_extractor(extractor)
    for k, t in TEMPLATES.items():
        assert lab(template_sentence(k, "present"))[k] == 1, (k, "present")
        # "Probable X." asserts X for both labelers (as the MeSH indexers read "probable"); "Possible X." hedges
        assert lab(template_sentence(k, "probable"))[k] == 1, (k, "probable")
        assert lab(template_sentence(k, "possible"))[k] == -1, (k, "possible")
        if t.absent:
            assert lab(template_sentence(k, "absent"))[k] == 0, (k, "absent")
