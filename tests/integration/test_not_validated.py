"""Issue 10: a bundle never validated on real images states no medium or high confidence, anywhere.

Real radiographs (pydicom-data's CR chests, the Kermany JPEGs in ../shared/data/real-cxr/) go
through the default bundle's path (model_training.default_bundle, as `up` builds it; the tiny encoder).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from dicom_node import codes
from dicom_node.encoders.sc import _panel_lines, shown_findings
from models.bundle import load_bundle
from models.prediction import NOT_VALIDATED
from models.predictor import Predictor
from models.preprocess import read_image
from tests.conftest import require_peer

REPO = Path(__file__).resolve().parents[2]
# ../shared beside the checkout (or shared/ inside it; SHARED_DIR for a checkout elsewhere)
_SHARED = [Path(p) for p in filter(None, [os.environ.get("SHARED_DIR")])] + [REPO.parent / "shared", REPO / "shared"]
KERMANY = next((d for d in _SHARED if d.is_dir()), _SHARED[-1]) / "data" / "real-cxr" / "kermany"
NOW = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
ALLOWED = {"low", NOT_VALIDATED}


def _real_images() -> list[tuple[str, np.ndarray, pydicom.Dataset | None]]:
    out = []
    for name in ("RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_UNCR.dcm"):
        ds = pydicom.dcmread(get_testdata_file(name))
        out.append((name, read_image(ds), ds))
    jpegs = sorted(KERMANY.glob("*.jpeg"))
    if not jpegs:
        pytest.skip(f"no real JPEG radiographs under {KERMANY}")
    for f in jpegs:
        out.append((f.name, np.asarray(Image.open(f).convert("L"), dtype=np.float32) / 255.0, None))
    return out


@pytest.fixture(scope="module")
def real_predictions(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    images = _real_images()
    preds = Predictor(bundle, device="cpu").predict([img for _, img, _ in images])
    # The same images as a validated bundle whose OOD gate flags nothing would call them: the
    # tiers the rule has to hold back.
    unguarded = dataclasses.replace(bundle, card={**bundle.card, "validated_on_real_images": True,
                                                  "synthetic_training": False}, ood_threshold=float("inf"))
    raw = Predictor(unguarded, device="cpu").predict([img for _, img, _ in images], saliency_top=0)
    return bundle, images, preds, raw


def test_no_medium_or_high_tier_on_real_images_even_where_the_ood_gate_is_open(real_predictions):
    bundle, images, preds, raw = real_predictions
    assert bundle.card["synthetic_training"] and not bundle.validated
    for (name, _, _), pred in zip(images, preds, strict=True):
        assert {f.tier for f in pred.findings} <= ALLOWED, name
        assert {f["tier"] for f in pred.to_json()["findings"]} <= ALLOWED, name
    # Without the rule the same bundle would state medium or high tiers on these images.
    assert {f.tier for p in raw for f in p.findings} & {"high", "medium"}
    # And not only because the OOD gate turned everything low: some images pass it.
    held_back = [p for p, r in zip(preds, raw) if any(f.tier == NOT_VALIDATED for f in p.findings)]
    assert held_back and all(not p.out_of_distribution for p in held_back)


def test_sr_sc_and_text_sr_of_real_images_carry_no_medium_or_high_tier(real_predictions, tiny_bundle):
    from index.draft import Drafter
    from index.labelers import get_extractor
    from worker.pipeline import encode_results

    bundle, images, preds, _ = real_predictions
    model = bundle.identity()
    refused = {codes.TIER_CODES["high"].value, codes.TIER_CODES["medium"].value}
    not_validated = codes.TIER_CODES[NOT_VALIDATED]
    assert not_validated.scheme_designator == codes.PRIVATE_SCHEME
    drafter = Drafter(get_extractor("lexicon"))
    reporter = lambda prediction, digest: drafter.draft(prediction, None)  # noqa: E731  (no index: template sentences)
    for (name, image, ds), pred in zip(images, preds):
        panel = " | ".join(t for t, _ in _panel_lines(pred, model, shown_findings(pred)))
        assert "high confidence" not in panel and "medium confidence" not in panel, name
        if any(f.tier == NOT_VALIDATED for f in pred.top(5)):
            assert "confidence not validated" in panel
        if ds is None:
            continue
        sr, sc, text, *_ = encode_results(ds, image, pred, model, NOW, reporter)  # then the GSPS (, the KOS)
        certainty = [item.ConceptCodeSequence[0] for group in _groups(sr) for item in group.ContentSequence
                     if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == codes.CERTAINTY.value]
        assert len(certainty) == 14 and not {c.CodeValue for c in certainty} & refused, name
        assert {c.CodeValue for c in certainty} <= {codes.TIER_CODES["low"].value, not_validated.value}
        notes = " ".join(_texts(text))
        assert "high confidence" not in notes and "medium confidence" not in notes, name
        if any(f.tier == NOT_VALIDATED for f in pred.findings):
            assert "not validated on real radiographs" in notes


def _groups(sr):
    """The TID 1501 measurement groups of a TID 1500 SR."""
    out = []
    for item in sr.ContentSequence:
        for child in item.get("ContentSequence", []):
            if child.ValueType == "CONTAINER" and child.ConceptNameCodeSequence[0].CodeValue == "125007":
                out.append(child)
    return out


def _texts(ds) -> list[str]:
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out += _texts(item)
    return out


def test_an_sr_with_not_validated_tiers_and_operating_points_passes_dciodvfy(real_predictions, tmp_path):
    from worker.pipeline import encode_results

    binary = require_peer("dciodvfy")
    bundle, images, preds, _ = real_predictions
    # A DICOM source whose prediction has a "not validated" tier; one finding is set to it if none has.
    name, image, ds = next((img for img, p in zip(images, preds) if img[2] is not None
                            and any(f.tier == NOT_VALIDATED for f in p.findings)), images[0])
    pred = preds[[n for n, _, _ in images].index(name)]
    findings = tuple(dataclasses.replace(f, tier=NOT_VALIDATED) if i == 0 else f for i, f in enumerate(pred.findings))
    pred = dataclasses.replace(pred, findings=findings)
    sr, *_ = encode_results(ds, image, pred, bundle.identity(), NOW, None)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    lines = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (lines.stdout + lines.stderr).splitlines() if "Error" in line]
    assert not errors, "\n".join(errors)
