"""Phantom generator: determinism, prevalence, label/report consistency, DICOM output."""

from __future__ import annotations

import csv
import dataclasses
import re

import numpy as np
import pydicom
import pytest

from models.labels import LABELS
from phantoms import DEVICES, PhantomCase, cardiothoracic_ratio, generate, render, sample_cases, to_dicom

SIZE = 256  # small renders keep the suite fast

TERMS = {
    "Pleural Effusion": ["effusion"],
    "Pneumothorax": ["pneumothorax"],
    "Cardiomegaly": ["cardiomegaly", "heart is enlarged", "cardiac silhouette is enlarged", "enlarged cardiac"],
    "Edema": ["edema"],
    "Consolidation": ["consolidation"],
    "Pneumonia": ["pneumonia"],
    "Atelectasis": ["atelectasis", "collapse"],
    "Lung Lesion": ["nodule", "mass"],
    "Fracture": ["fracture"],
    "Pleural Other": ["pleural thickening", "pleural plaque"],
    "Enlarged Cardiomediastinum": ["mediastinum is widened", "widened mediastinum", "widened upper mediastinal"],
    "Support Devices": ["tube", "catheter", "pacemaker", "electrodes"],
}
HEDGE = re.compile(r"may represent|cannot exclude|cannot be excluded|possible|questionable")
NEG = re.compile(r"\bno\b|without|free of|negative for|\bnormal\b|\bclear\b|unremarkable|sharp")


@pytest.fixture(scope="module")
def cases() -> list[PhantomCase]:
    return sample_cases(2000, seed=11)


def test_devices_and_labels_shape(cases):
    assert len(DEVICES) >= 4 and len({d.name for d in DEVICES}) == len(DEVICES)
    assert {d.bits_stored for d in DEVICES} >= {10, 12, 14, 15}
    assert {d.photometric for d in DEVICES} == {"MONOCHROME1", "MONOCHROME2"}
    for c in cases[:50]:
        assert list(c.labels) == list(LABELS)
        assert set(c.labels.values()) <= {0, 1}
        assert c.uncertain <= {k for k, v in c.labels.items() if v}


def test_prevalence(cases):
    target = {"No Finding": .30, "Support Devices": .20, "Lung Opacity": .25, "Pleural Effusion": .15,
              "Cardiomegaly": .12, "Atelectasis": .12, "Edema": .08, "Consolidation": .06,
              "Pneumonia": .05, "Pneumothorax": .06, "Lung Lesion": .05, "Fracture": .04,
              "Enlarged Cardiomediastinum": .05, "Pleural Other": .03}
    for k, t in target.items():
        p = np.mean([c.labels[k] for c in cases])
        tol = 0.10 if k == "Lung Opacity" else max(0.03, 0.35 * t)  # union of 5 findings
        assert abs(p - t) <= tol, (k, p, t)
    # co-occurrence: edema goes with cardiomegaly far more often than the base rate
    ed = [c for c in cases if c.labels["Edema"]]
    assert np.mean([c.labels["Cardiomegaly"] for c in ed]) > 0.3


def test_no_finding_exclusive_and_lung_opacity(cases):
    for c in cases:
        others = any(v for k, v in c.labels.items() if k != "No Finding")
        assert c.labels["No Finding"] == int(not others)
        paren = any(c.labels[k] for k in ("Consolidation", "Pneumonia", "Edema", "Atelectasis", "Lung Lesion"))
        assert c.labels["Lung Opacity"] == int(paren)


def test_patients_have_1_to_3_studies(cases):
    per: dict[str, list[PhantomCase]] = {}
    for c in cases:
        per.setdefault(c.patient_id, []).append(c)
    assert max(len(v) for v in per.values()) <= 3
    assert any(len(v) > 1 for v in per.values())
    for v in per.values():
        assert len({c.anatomy_seed for c in v}) == 1
        assert [c.study_index for c in v] == list(range(len(v)))
    assert len({c.study_id for c in cases}) == len(cases)


def _sentences(report: str):
    return [s.strip().lower() for s in re.split(r"(?<=[.;:])\s+|\n", report) if s.strip()]


def test_reports_consistent_with_labels(cases):
    for c in cases:
        assert "FINDINGS:" in c.report and "IMPRESSION:" in c.report
        hedged_mentions: set[str] = set()
        mentioned: set[str] = set()
        for s in _sentences(c.report):
            for lab, terms in TERMS.items():
                if not any(t in s for t in terms):
                    continue
                if HEDGE.search(s):
                    assert c.labels[lab] == 1, (lab, s, c.report)
                    hedged_mentions.add(lab)
                elif NEG.search(s):
                    assert c.labels[lab] == 0, (lab, s, c.report)
                else:
                    assert c.labels[lab] == 1, (lab, s, c.report)
                    mentioned.add(lab)
        for lab in TERMS:
            if c.labels[lab]:
                assert lab in mentioned | hedged_mentions, (lab, c.report)
        for lab in c.uncertain:
            assert lab in hedged_mentions, (lab, c.report)
        if c.labels["No Finding"]:
            assert re.search(r"normal|clear|no acute", c.report.lower())


def test_sampling_deterministic():
    a = sample_cases(30, seed=5)
    b = sample_cases(30, seed=5)
    assert [(c.study_id, c.labels, c.report, c.device) for c in a] == \
           [(c.study_id, c.labels, c.report, c.device) for c in b]
    assert [c.report for c in sample_cases(30, seed=6)] != [c.report for c in a]


def test_render_deterministic(cases):
    c = cases[3]
    p1, m1 = render(c, seed=7, size=SIZE)
    p2, m2 = render(c, seed=7, size=SIZE)
    assert p1.dtype == np.uint16 and p1.tobytes() == p2.tobytes() and m1 == m2
    assert p1.max() <= (1 << m1["bits_stored"]) - 1


def test_cardiothoracic_ratio(cases):
    cm = [c for c in cases if c.labels["Cardiomegaly"]][:4]
    nl = [c for c in cases if not c.labels["Cardiomegaly"]][:4]
    for c in cm:
        assert cardiothoracic_ratio(c, size=256) > 0.5
    for c in nl:
        assert cardiothoracic_ratio(c, size=256) < 0.5


def _norm(px, meta):
    v = px.astype(np.float64) / ((1 << meta["bits_stored"]) - 1)
    return 1 - v if meta["photometric"] == "MONOCHROME1" else v


def test_shift_monotone(cases):
    for dev in DEVICES[:3]:
        c = dataclasses.replace(cases[0], device=dev.name)
        base = _norm(*render(c, seed=1, shift=0.0, size=SIZE))
        d1 = np.abs(_norm(*render(c, seed=1, shift=1.0, size=SIZE)) - base).mean()
        d2 = np.abs(_norm(*render(c, seed=1, shift=2.0, size=SIZE)) - base).mean()
        assert 0 < d1 < d2, (dev.name, d1, d2)
    assert DEVICES[0].shifted(0) == DEVICES[0]
    assert DEVICES[0].shifted(2) == DEVICES[0].shifted(2)


def test_generate_writes_readable_dicoms(tmp_path):
    man = generate(6, tmp_path / "set", seed=3, size=SIZE)
    rows = list(csv.DictReader(man.open()))
    assert len(rows) == 6
    assert list(rows[0])[:7] == ["path", "patient_id", "study_id", "device", "shift", "view", "kind"]
    assert list(rows[0])[7:21] == list(LABELS) and list(rows[0])[-1] == "report"
    for row in rows:
        ds = pydicom.dcmread(man.parent / row["path"])
        px = ds.pixel_array
        assert px.shape == (ds.Rows, ds.Columns) and px.max() < 2 ** ds.BitsStored
        assert ds.PatientID == row["patient_id"] and str(ds.PatientName) == f"PHANTOM^{row['patient_id']}"
        assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition in ("PA", "AP")
        assert ds.Modality in ("DX", "CR") and ds.Manufacturer.startswith("Phantom Devices ")
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        for k in LABELS:
            assert row[k] in ("1", "0", "-1")
        rep = (man.parent / "reports" / f"{row['study_id']}.txt").read_text().strip()
        assert rep == row["report"]
    # deterministic UIDs and pixels
    man2 = generate(6, tmp_path / "set2", seed=3, size=SIZE)
    for r1, r2 in zip(rows, csv.DictReader(man2.open())):
        a = pydicom.dcmread(man.parent / r1["path"])
        b = pydicom.dcmread(man2.parent / r2["path"])
        assert a.SOPInstanceUID == b.SOPInstanceUID and a.StudyDate == b.StudyDate
        assert a.PixelData == b.PixelData


def test_lateral_and_nonchest(tmp_path):
    lat = sample_cases(2, seed=4, view="lateral")[0]
    px, meta = render(lat, seed=1, size=SIZE)
    ds = to_dicom(px, meta, lat, uid_seed="x")
    assert ds.ViewPosition == "LL" and ds.BodyPartExamined == "CHEST"
    nc = sample_cases(4, seed=4, kind="nonchest")
    for c in nc:
        px, meta = render(c, seed=1, size=SIZE)
        ds = to_dicom(px, meta, c, uid_seed="x")
        assert ds.BodyPartExamined in ("HAND", "PELVIS") and ds.BodyPartExamined != "CHEST"
        assert sum(c.labels.values()) == 0
    man = generate(2, tmp_path / "lat", seed=2, view="lateral", size=SIZE)
    row = next(csv.DictReader(man.open()))
    assert pydicom.dcmread(man.parent / row["path"]).ViewPosition == "LL"
