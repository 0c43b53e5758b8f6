"""SR and SC encoders: content, deterministic UIDs (dciodvfy and dsrdump: tests/integration/test_encoders_dicom_tools.py)."""

from __future__ import annotations

import dataclasses
import datetime
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_node import codes
from dicom_node.encoders.notices import SYNTHETIC_NOTICE
from dicom_node.encoders.sc import encode_sc
from dicom_node.encoders.sr import encode_sr
from dicom_node.uids import ResultUIDs, derive_uid
from models.labels import LABELS
from models.prediction import Finding, ModelIdentity, Prediction
from models.preprocess import read_image
from tests.header_corpus import base

NOW = datetime.datetime(2025, 3, 4, 5, 6, 7)
DIGEST = "3f" * 32


def _blob(cy: float, cx: float, sigma: float = 3.0, n: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n]
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


def _prediction(ood: bool = True) -> Prediction:
    probs = [0.1, 0.2, 0.35, 0.81, 0.72, 0.05, 0.4, 0.3, 0.2, 0.03, 0.64, 0.1, 0.05, 0.93]
    tiers = ("high", "medium", "low")
    findings = tuple(
        Finding(label, p, 0.5, tiers[i % 3], 0.02 + 0.01 * i)
        for i, (label, p) in enumerate(zip(LABELS, probs, strict=True))
    )
    saliency = {
        "Lung Opacity": _blob(12, 9),
        "Lung Lesion": _blob(20, 22),
        "Pleural Effusion": _blob(27, 6),
        "Support Devices": _blob(8, 16, 2),
    }
    return Prediction(
        findings=findings,
        ood_score=1.4 if ood else 0.2,
        ood_threshold=1.0,
        center=np.zeros(16, dtype=np.float32),
        radius=np.full(16, 0.1, dtype=np.float32),
        saliency=saliency,
    )


def _model(digest: str = DIGEST, synthetic: bool = True) -> ModelIdentity:
    return ModelIdentity(
        name="medsam2-cxr-boxlatent",
        version="0.1.0",
        digest=digest,
        manufacturer=codes.MANUFACTURER,
        synthetic_training=synthetic,
        training_data="synthetic phantom radiographs" if synthetic else "CheXpert",
        intended_use="research and engineering tests",
    )


def _real_cr() -> Dataset:
    path = get_testdata_file("RG1_UNCI.dcm")
    if path is None:
        pytest.skip("RG1_UNCI.dcm not available: install the test extras (pydicom-data)")
    return pydicom.dcmread(path)


def _synthetic_dx() -> Dataset:
    """A small, complete DX For Presentation image with imager pixel spacing and orientation, new UIDs."""
    ds = base()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    return ds


SOURCES = {"cr": _real_cr, "dx": _synthetic_dx}


def encode_both(name: str, out: Path) -> dict:
    """SR and SC of the source ``name`` (a key of SOURCES), saved under ``out``; what the tests inspect."""
    source = SOURCES[name]()
    model = _model()
    prediction = _prediction()
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, model.digest)
    sr = encode_sr(source, prediction, model, uids, NOW)
    sc = encode_sc(source, read_image(source), prediction, model, uids, NOW)
    sr_path, sc_path = out / "sr.dcm", out / "sc.dcm"
    sr.save_as(sr_path, enforce_file_format=True)
    sc.save_as(sc_path, enforce_file_format=True)
    return {"source": source, "model": model, "prediction": prediction, "uids": uids,
            "sr": sr, "sc": sc, "sr_path": sr_path, "sc_path": sc_path}


@pytest.fixture(scope="module", params=sorted(SOURCES))
def encoded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Encode SR and SC once per source; the tests below inspect the saved files."""
    return encode_both(request.param, tmp_path_factory.mktemp(request.param))


def test_sr_content(encoded: dict) -> None:
    sr, source, uids = encoded["sr"], encoded["source"], encoded["uids"]
    assert sr.SOPInstanceUID == uids.sr_instance
    assert sr.SeriesInstanceUID == uids.sr_series
    assert sr.InstanceNumber == 1
    for kw in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "AccessionNumber"):
        assert sr.get(kw) == source.get(kw), kw
    assert str(sr.ContentDate) == NOW.strftime("%Y%m%d")
    assert str(sr.SeriesDate) == NOW.strftime("%Y%m%d")
    assert "not for" in sr.SeriesDescription
    equipment = [
        item for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert len(equipment) == 1
    assert equipment[0].PurposeOfReferenceCodeSequence[0].CodingSchemeDesignator == "99IHE"
    assert encoded["model"].short_digest in equipment[0].SoftwareVersions
    assert equipment[0].DeviceUID
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99MSCXR"
    # 14 label groups + 1 out-of-distribution group
    parsed = pydicom.dcmread(encoded["sr_path"])
    root = parsed.ContentSequence
    imaging = next(i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    assert len(imaging.ContentSequence) == len(LABELS) + 1
    texts = [
        i.TextValue for i in next(
            i for i in root if i.ConceptNameCodeSequence[0].CodeValue == "C0034375"
        ).ContentSequence
    ]
    assert any(SYNTHETIC_NOTICE in t for t in texts)
    assert any("outside the model's experience" in t for t in texts)


def test_sr_says_nothing_synthetic_for_a_clinical_model() -> None:
    source = _synthetic_dx()
    model = _model(synthetic=False)
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, model.digest)
    sr = encode_sr(source, _prediction(ood=False), model, uids, NOW)
    assert "synthetic" not in str(sr).lower()


def test_sc_content(encoded: dict) -> None:
    sc, source, uids = encoded["sc"], encoded["source"], encoded["uids"]
    assert sc.SOPInstanceUID == uids.sc_instance
    assert sc.SeriesInstanceUID == uids.sc_series
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientID == source.PatientID
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.BitsAllocated == 8 and sc.SamplesPerPixel == 3
    assert sc.BurnedInAnnotation == "YES"
    assert max(sc.Rows, sc.Columns) <= 2048
    pixels = pydicom.dcmread(encoded["sc_path"]).pixel_array
    assert pixels.shape == (sc.Rows, sc.Columns, 3)
    # The heat map adds colour: some pixels are far from gray.
    spread = pixels.max(axis=2).astype(int) - pixels.min(axis=2).astype(int)
    assert (spread > 60).mean() > 0.01


def test_encoding_is_deterministic(encoded: dict) -> None:
    source, model, prediction, uids = (encoded[k] for k in ("source", "model", "prediction", "uids"))
    again = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, model.digest)
    assert again == uids
    sr2 = encode_sr(source, prediction, model, again, NOW)
    assert sr2.SOPInstanceUID == encoded["sr"].SOPInstanceUID
    # No hidden clock or random UID anywhere: the whole file is reproducible.
    buf = io.BytesIO()
    sr2.save_as(buf, enforce_file_format=True)
    assert buf.getvalue() == encoded["sr_path"].read_bytes()


def test_uids_change_with_any_input() -> None:
    base = ResultUIDs.for_source("1.2.3", "1.2.3.4", DIGEST)
    other_bundle = ResultUIDs.for_source("1.2.3", "1.2.3.4", "00" * 32)
    other_image = ResultUIDs.for_source("1.2.3", "1.2.3.5", DIGEST)
    all_uids = [*vars(base).values()]
    assert len(set(all_uids)) == len(all_uids) == 10  # sr, sc, text, pr, ko: series and instance each
    assert not set(all_uids) & set(vars(other_bundle).values())
    # Same study and model: shared series, new instances.
    assert other_image.sr_series == base.sr_series and other_image.sc_series == base.sc_series
    assert other_image.sr_instance != base.sr_instance
    for uid in all_uids:
        assert uid.startswith("2.25.") and len(uid) <= 64
        assert pydicom.uid.UID(uid).is_valid
    assert derive_uid("ab", "c") != derive_uid("a", "bc")


def test_heat_overlay_blends_by_table() -> None:
    """Where no finding is salient the radiograph stays gray; at a saliency peak the pixel is
    the colour map's top colour blended at HEAT_ALPHA; only shown findings are drawn."""
    from matplotlib import colormaps

    from dicom_node.encoders import sc

    pred = _prediction()
    shown = [f for f in pred.findings if f.label == "Lung Lesion"]
    gray = np.full((320, 320), 100, np.uint8)
    out = sc._heat_overlay(gray, pred, shown)
    assert out.shape == (320, 320, 3) and out.dtype == np.uint8
    assert (out[0, 0] == 100).all() and (out[319, 319] == 100).all()  # far from the blob at (20, 22)
    top = np.array(colormaps[sc._COLORMAP](1.0)[:3]) * 255
    want = np.round(100 * (1 - sc.HEAT_ALPHA) + np.round(top) * sc.HEAT_ALPHA)
    assert np.abs(out[205, 225].astype(int) - want).max() <= 3  # the blob's centre (20, 22), upsampled x10
    # Lung Opacity's blob (12, 9) is not shown: nothing drawn there.
    assert (out[120, 90] == 100).all()
    assert (sc._heat_overlay(gray, pred, []) == 100).all()


def test_result_uids_follow_the_site_operating_points() -> None:
    """One derivation: for_model is for_source over results_key, which changes with the site's operating points."""
    from dicom_node.uids import results_key

    own, site = _model(), dataclasses.replace(_model(), operating_points="Pleural Effusion=sensitivity:0.90")
    assert results_key(own) == own.digest
    assert ResultUIDs.for_model("1.2.3", "1.2.3.4", own) == ResultUIDs.for_source("1.2.3", "1.2.3.4", own.digest)
    assert ResultUIDs.for_model("1.2.3", "1.2.3.4", site) == ResultUIDs.for_source("1.2.3", "1.2.3.4", results_key(site))
    assert ResultUIDs.for_model("1.2.3", "1.2.3.4", site).sr_instance != ResultUIDs.for_model("1.2.3", "1.2.3.4", own).sr_instance


def test_every_result_of_a_japanese_study_keeps_its_character_set(tmp_path: Path) -> None:
    """A Japanese PACS's ``\\ISO 2022 IR 87`` (empty first value: the default repertoire) and its
    three-group name reach every object: SR, SC, GSPS and, for an urgent study, the KOS."""
    from models.urgency import assess
    from worker.pipeline import encode_results

    source = _synthetic_dx()
    source.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    source.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    source.save_as(tmp_path / "src.dcm", enforce_file_format=True)
    source = pydicom.dcmread(tmp_path / "src.dcm")  # as the node reads it from the spool
    urgent = dataclasses.replace(_prediction(ood=False), findings=tuple(
        dataclasses.replace(f, probability=0.95, tier="high") if f.label == "Pneumothorax" else f
        for f in _prediction(ood=False).findings))
    urgency = assess(urgent)
    assert urgency.is_urgent
    results = encode_results(source, read_image(source), urgent, _model(), NOW, None, "en", urgency)
    assert [r.Modality for r in results] == ["SR", "OT", "PR", "KO"]
    for r in results:
        r.save_as(tmp_path / "r.dcm", enforce_file_format=True)
        back = pydicom.dcmread(tmp_path / "r.dcm")
        assert back.SpecificCharacterSet == ["", "ISO 2022 IR 87"], back.Modality
        assert str(back.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう", back.Modality
