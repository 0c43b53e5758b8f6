"""The two report labelers: tricky phrases, sections, XXXX, phantom reports, real Open-i reports, CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from index.labelers import Extractor, get_extractor, grammar, lexicon
from index.labelers.common import PATHOLOGIES, normalise, report_body, sections, sentences
from models.labels import LABELS
from phantoms import manifest_label_value, sample_cases

# ../shared/data beside the checkout (the shared Open-i development reports)
OPENI = Path(__file__).resolve().parents[3] / "shared" / "data" / "openi" / "openi-reports-dev.tgz"
BOTH = [lexicon.label_report, grammar.label_report]
IDS = ["lexicon", "grammar"]

# (report text, {label: expected value}); labels not listed are not checked.
CASES = [
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("Heart size is normal.", {"Cardiomegaly": 0}),
    ("The heart is normal in size.", {"Cardiomegaly": 0}),
    ("The heart is not enlarged.", {"Cardiomegaly": 0}),
    ("Normal heart size and mediastinal contours.", {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0}),
    ("The heart is enlarged.", {"Cardiomegaly": 1, "No Finding": None}),
    ("Borderline heart size.", {"Cardiomegaly": 1}),  # a grade, as MeSH tags it (Cardiomegaly/borderline)
    ("The heart is borderline enlarged.", {"Cardiomegaly": 1}),
    ("Heart size upper limits of normal.", {"Cardiomegaly": -1}),
    ("Probable right lower lobe pneumonia.", {"Pneumonia": 1}),
    ("Possible right lower lobe pneumonia.", {"Pneumonia": -1}),
    ("Cannot exclude small left effusion.", {"Pleural Effusion": -1}),
    ("Small left effusion cannot be excluded.", {"Pleural Effusion": -1}),
    ("Linear opacity at the left base may represent atelectasis.", {"Atelectasis": -1, "Lung Opacity": 1}),
    ("The lungs are free of focal airspace disease.", {"Lung Opacity": 0}),
    ("Negative for pneumothorax.", {"Pneumothorax": 0}),
    ("The lungs are clear without evidence of infiltrate.", {"Lung Opacity": 0, "Consolidation": 0}),
    ("There is no focal air space opacity to suggest a pneumonia.", {"Pneumonia": 0, "Lung Opacity": 0}),
    ("Patchy right lower lobe opacity suggestive of pneumonia.", {"Pneumonia": -1, "Lung Opacity": 1}),
    ("No focal consolidation, suspicious pulmonary opacity, pleural effusion, or pneumothorax.",
     {"Consolidation": 0, "Lung Opacity": 0, "Pleural Effusion": 0, "Pneumothorax": 0}),
    ("No large pleural effusion.", {"Pleural Effusion": 0}),
    ("Possible small right pleural effusion, without focal consolidation or pneumothorax.",
     {"Pleural Effusion": -1, "Consolidation": 0, "Pneumothorax": 0}),
    ("Streaky right lower lobe infiltrate versus atelectasis.", {"Atelectasis": -1, "Lung Opacity": -1}),
    ("Blunting of the right costophrenic angle; cannot exclude small effusion.", {"Pleural Effusion": -1}),
    ("Mild blunting of the right costophrenic XXXX.", {"Pleural Effusion": 1}),
    ("The costophrenic XXXX are sharp.", {"Pleural Effusion": 0}),
    ("There are no XXXX of a pleural effusion.", {"Pleural Effusion": 0}),
    ("XXXX sternotomy XXXX are intact.", {"Support Devices": None}),  # post-surgical, not a device
    ("Right IJ central venous catheter with tip in the SVC.", {"Support Devices": 1}),
    ("Residuals of prior granulomatous infection.", {"Pneumonia": None, "No Finding": 1}),
    ("Opacity compatible with pneumonia in the appropriate clinical setting.", {"Pneumonia": -1}),
    ("Left catheter fracture at the clavicle.", {"Fracture": None, "Support Devices": 1}),
    ("Fissural thickening.", {"Pleural Other": 1}),
    ("Right upper lobe cavity.", {"Lung Lesion": 1}),
    ("Chronic appearing bibasilar pleural abnormality.", {"Pleural Other": 1, "Pleural Effusion": None}),
    ("Moderate right pleural effusion with air-fluid level.", {"Pneumothorax": 1, "Pleural Effusion": 1}),
    ("Nodular densities projecting over the ribs are consistent with nipple shadows.", {"Lung Lesion": 0}),
    ("Atypical infection is another consideration.", {"Pneumonia": -1}),
    ("No pericardial effusion.", {"Pleural Effusion": None}),
    ("Calcified granuloma in the right upper lobe.", {"Lung Lesion": None, "No Finding": 1}),
    ("Pneumothorax is not seen.", {"Pneumothorax": 0}),
    ("The effusion has resolved.", {"Pleural Effusion": 0}),
    ("No change in the left lower lobe atelectasis.", {"Atelectasis": 1}),
    ("Healed right rib fractures. No acute osseous abnormality.", {"Fracture": 1}),
    ("Osseous structures are intact.", {"Fracture": 0}),
    ("Right lower lobe consolidation.", {"Consolidation": 1, "Lung Opacity": 1, "No Finding": None}),
    ("Endotracheal tube with tip above the carina. Lungs are clear.",
     {"Support Devices": 1, "No Finding": 1, "Lung Opacity": 0}),
    ("Pulmonary vascular congestion.", {"Edema": 1}),
    ("No acute cardiopulmonary abnormality.", {"No Finding": 1, "Cardiomegaly": None, "Lung Opacity": None}),
]


@pytest.mark.parametrize("fn", BOTH, ids=IDS)
@pytest.mark.parametrize("text,expected", CASES, ids=[c[0][:40] for c in CASES])
def test_tricky_phrases(fn, text, expected):
    out = fn(text)
    assert {k: out[k] for k in expected} == expected


@pytest.mark.parametrize("fn", BOTH, ids=IDS)
def test_output_format(fn):
    out = fn("FINDINGS: Mild cardiomegaly. Possible small effusion.\nIMPRESSION: No pneumothorax.")
    assert list(out) == list(LABELS)
    assert all(v in (1, 0, -1, None) for v in out.values())
    assert fn("") == {**dict.fromkeys(LABELS, None), "No Finding": 1}


@pytest.mark.parametrize("fn", BOTH, ids=IDS)
def test_sections_indication_and_comparison_are_ignored(fn):
    text = ("COMPARISON: Prior study with pleural effusion.\nINDICATION: Rule out pneumonia, pneumothorax.\n"
            "FINDINGS: The lungs are clear.\nIMPRESSION: Normal chest.")
    out = fn(text)
    assert out["Pneumonia"] == 0 and out["Pleural Effusion"] is None and out["Pneumothorax"] is None
    assert out["No Finding"] == 1


def test_section_splitting():
    text = "INDICATION: cough\nFINDINGS: Clear lungs. 1.5 cm nodule.\nIMPRESSION: 1. Nodule. 2. No effusion."
    assert sections(text) == [("INDICATION", "cough"), ("FINDINGS", "Clear lungs. 1.5 cm nodule."),
                              ("IMPRESSION", "1. Nodule. 2. No effusion.")]
    assert sections("Findings: clear.\nimpression: ok") == [("FINDINGS", "clear."), ("IMPRESSION", "ok")]
    body = report_body(text)
    assert "cough" not in body
    assert sentences(normalise(body)) == ["clear lungs", "1.5 cm nodule", "nodule", "no effusion"]
    assert normalise("Normal chest x-XXXX.") == "normal chest x-xxxx."


def test_get_extractor_rejects_unknown_names():
    assert get_extractor("grammar") is grammar.label_report
    assert get_extractor(Extractor.LEXICON) is lexicon.label_report
    with pytest.raises(ValueError, match="lexicon"):
        get_extractor("negbio")


def _chexpert_no_finding(case) -> int:
    return int(not any(case.labels[k] for k in PATHOLOGIES))


@pytest.fixture(scope="module")
def phantom_cases():
    return sample_cases(400, seed=7) + sample_cases(100, seed=8, view="lateral")


def _phantom_scores(fn, cases):
    """Micro F1 (uncertain = positive) and strict agreement on cells positive in either."""
    tp = fp = fn_ = exact = cells = 0
    per = {k: [0, 0, 0] for k in LABELS}
    for c in cases:
        out = fn(c.report)
        for k in LABELS:
            y = _chexpert_no_finding(c) if k == "No Finding" else manifest_label_value(c, k)
            p = out[k]
            yb, pb = y in (1, -1), p in (1, -1)
            per[k][0] += yb and pb
            per[k][1] += pb and not yb
            per[k][2] += yb and not pb
            if yb or pb:
                cells += 1
                exact += y == p
    tp, fp, fn_ = (sum(v[i] for v in per.values()) for i in range(3))
    f1 = {k: 2 * v[0] / (2 * v[0] + v[1] + v[2]) for k, v in per.items() if v[0] + v[2] >= 5}
    return 2 * tp / (2 * tp + fp + fn_), exact / cells, f1


@pytest.mark.parametrize("fn", BOTH, ids=IDS)
def test_phantom_reports_are_read_correctly(fn, phantom_cases):
    """The drafter's label-F1 relies on this: phantom reports read back to their labels.

    No Finding is compared with the CheXpert rule applied to the phantom's labels (the phantom
    generator also clears No Finding for a report with only support devices).
    """
    micro, strict, per_label = _phantom_scores(fn, phantom_cases)
    assert micro > 0.97, micro
    assert strict > 0.95, strict  # uncertain read as uncertain, positive as positive
    assert min(per_label.values()) > 0.9, per_label
    assert len(per_label) == 14


def test_extractors_agree_on_phantoms_but_are_different_code(phantom_cases):
    a = [lexicon.label_report(c.report) for c in phantom_cases]
    b = [grammar.label_report(c.report) for c in phantom_cases]
    code = {1: 1, 0: 0, -1: 2, None: 3}
    xa = np.array([[code[r[k]] for k in LABELS] for r in a]).ravel()
    xb = np.array([[code[r[k]] for k in LABELS] for r in b]).ravel()
    assert cohen_kappa_score(xa, xb) > 0.9
    assert lexicon.label_report is not grammar.label_report


@pytest.mark.parametrize("fn", BOTH, ids=IDS)
def test_thousands_of_reports_per_second_order(fn, phantom_cases):
    texts = [c.report for c in phantom_cases] * 2  # 1,000 reports
    t0 = time.perf_counter()
    for t in texts:
        fn(t)
    rate = len(texts) / (time.perf_counter() - t0)
    assert rate > 300, f"{rate:.0f} reports/s"  # loose: the shared 2-core machine; unloaded it is >2,000/s


@pytest.fixture(scope="module")
def openi_reports():
    if not OPENI.exists():
        message = f"{OPENI} not present (the shared Open-i development reports, ../shared/data/README.md)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)  # a CI run must not go green by skipping the real-report checks
        pytest.skip(message)
    from model_training.openi import read_reports

    return read_reports(OPENI)


def test_real_openi_reports_against_mesh_and_each_other(openi_reports):
    from index.label_eval import evaluate

    m = evaluate(openi_reports[:800], repeats=1)
    assert m["agreement"]["kappa_4class"] > 0.8
    for e in ("lexicon", "grammar"):
        s = m["extractors"][e]["vs_mesh_u_ones"]
        assert s["micro"]["f1"] > 0.85, (e, s["micro"])
        for k in ("Cardiomegaly", "Pleural Effusion", "Lung Opacity", "Atelectasis"):
            assert s["per_label"][k]["f1"] > 0.75, (e, k, s["per_label"][k])


# The labeler the node uses for second reads (the discrepancy flag of issue 15): lexicon, the default
# of index.labelers.label_report and of the `label` command.
SECOND_READ_LABELER = "lexicon"


@pytest.fixture(scope="module")
def openi_metrics(openi_reports):
    from index.label_eval import evaluate

    return evaluate(openi_reports, extractors=(SECOND_READ_LABELER,), repeats=1)


def test_second_read_labeler_reaches_f1_per_pathology_on_all_open_i_reports(openi_metrics):
    """F1 >= 0.90 against MeSH (index.label_eval: uncertain as negative) for every label with enough
    cases (>= 20 MeSH positives) on all tagged development reports, not only overall."""
    from index.label_eval import F1_TARGET, MIN_POSITIVES

    m = openi_metrics
    assert m["data"]["reports_with_mesh_labels"] > 2500
    held = m["held_labels"]
    assert all(m["mesh_positives"][k] >= MIN_POSITIVES for k in held)
    assert {"Pneumonia", "Lung Lesion", "Pneumothorax"} <= set(held)  # the weakest ones of issue 15
    assert "Enlarged Cardiomediastinum" not in held  # 17 MeSH positives: reported, not held
    per = m["extractors"][SECOND_READ_LABELER]["vs_mesh"]["per_label"]
    low = {k: round(per[k]["f1"], 4) for k in held if per[k]["f1"] < F1_TARGET}
    assert low == {}, f"{SECOND_READ_LABELER}: F1 below {F1_TARGET} against MeSH"
    assert m["extractors"][SECOND_READ_LABELER]["shortfalls"] == {}


def test_cli_label_prints_one_json_per_report_in_order(tmp_path, openi_reports):
    import tarfile

    from typer.testing import CliRunner

    from worker.cli import app

    first, second = openi_reports[0].id, openi_reports[1].id
    with tarfile.open(OPENI) as tf:
        tf.extractall(tmp_path, members=[m for m in tf.getmembers()
                                         if m.name.endswith((f"/{first}.xml", f"/{second}.xml"))], filter="data")
    x1, x2 = next(tmp_path.rglob(f"{first}.xml")), next(tmp_path.rglob(f"{second}.xml"))
    txt = tmp_path / "r.txt"
    txt.write_text("FINDINGS: Cardiomegaly with small bilateral effusions.\n")
    res = CliRunner().invoke(app, ["label", "--text", "No pneumothorax.", "--file", str(x2), str(txt), str(x1),
                                   "--extractor", "grammar"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(line) for line in res.output.splitlines()]
    by_id = {r.id: r for r in openi_reports}
    assert lines == [grammar.label_report("No pneumothorax."), grammar.label_report(by_id[second].text),
                     grammar.label_report(txt.read_text()), grammar.label_report(by_id[first].text)]
    assert lines[2]["Cardiomegaly"] == 1 and lines[2]["Pleural Effusion"] == 1
    assert list(lines[0]) == list(LABELS)
    bad = CliRunner().invoke(app, ["label", "--text", "x", "--extractor", "negbio"])
    assert bad.exit_code != 0


def test_cli_label_eval_writes_metrics(tmp_path, openi_reports):
    import tarfile

    from typer.testing import CliRunner

    from worker.cli import app

    src = tmp_path / "src"
    with tarfile.open(OPENI) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(".xml")][:150]
        tf.extractall(src, members=members, filter="data")
    res = CliRunner().invoke(app, ["label-eval", "--openi", str(src), "--out", str(tmp_path / "out"), "--repeats", "1"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["data"]["reports"] == 150
    assert set(m["extractors"]) == {"lexicon", "grammar"}
    assert 0 < m["agreement"]["kappa_4class"] <= 1
    assert m["extractors"]["lexicon"]["throughput"]["reports_per_second"] > 0
    assert "| Cardiomegaly |" in (tmp_path / "out" / "table.md").read_text()
