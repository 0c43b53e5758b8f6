"""Open-i loader: the real report archive, views from the real metadata CSV, MeSH labels, the split,
image files made here with the collection's names, and the manifest that training reads."""

from __future__ import annotations

import csv
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from imagedata.manifest import TRAINING_COLUMNS, read_rows
from model_training import openi
from model_training.split import split_patients
from models.labels import LABELS

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "openi"
TGZ = DATA / "openi-reports-dev.tgz"
CSV = DATA / "nlmcxr_dicom_metadata.csv.gz"
pytestmark = pytest.mark.skipif(not (TGZ.exists() and CSV.exists()), reason="Open-i files not present")


@pytest.fixture(scope="module")
def reports() -> list[openi.OpenIReport]:
    return openi.read_reports(TGZ)


@pytest.fixture(scope="module")
def views() -> dict[str, str]:
    return openi.read_views(CSV)


def test_reads_all_real_reports_with_sections(reports):
    assert len(reports) == 2637
    assert len({r.id for r in reports}) == 2637
    assert [int(r.id) for r in reports] == sorted(int(r.id) for r in reports)
    r1 = reports[0]
    assert r1.id == "1" and r1.patient_id == "openi-1"
    assert r1.indication == "Positive TB test" and r1.comparison == "None."
    assert r1.findings.startswith("The cardiac silhouette and mediastinum size are within normal limits.")
    assert r1.impression == "Normal chest x-XXXX."
    assert r1.mesh_major == ("normal",)
    assert r1.images == ("CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001")
    assert r1.text == f"FINDINGS: {r1.findings}\nIMPRESSION: {r1.impression}"
    with_impression = sum(bool(r.impression) for r in reports) / len(reports)
    with_findings = sum(bool(r.findings) for r in reports) / len(reports)
    assert with_impression > 0.99 and 0.8 < with_findings < 0.95  # FINDINGS is empty in about 13%
    assert sum("XXXX" in r.text for r in reports) > 500  # de-identification tokens kept verbatim


def test_folder_and_archive_give_the_same_reports(tmp_path, reports):
    with tarfile.open(TGZ) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(".xml")][:40]
        tf.extractall(tmp_path, members=members, filter="data")
    from_folder = openi.read_reports(tmp_path)
    by_id = {r.id: r for r in reports}
    assert len(from_folder) == 40
    assert all(r == by_id[r.id] for r in from_folder)


def test_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "3.xml").write_text("<eCitation><title>no id</title></eCitation>")
    with pytest.raises(ValueError, match="3.xml.*IUXRId"):
        openi.read_reports(bad)
    (bad / "3.xml").write_text("<eCitation")
    with pytest.raises(ValueError, match="3.xml: not an XML"):
        openi.read_reports(bad)
    with pytest.raises(FileNotFoundError, match="nothere"):
        openi.read_reports(tmp_path / "nothere.tgz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no ecgen-radiology"):
        openi.read_reports(empty)


def test_views_from_metadata_csv(views, reports):
    assert len(views) == 7469
    counts = {v: sum(1 for x in views.values() if x == v) for v in ("frontal", "lateral", "unknown")}
    assert counts == {"frontal": 3593 + 423, "lateral": 717 + 119 + 29 + 2, "unknown": 2586}
    assert openi.canonical_image_id("CXR1_1_IM-0001-3001") == "CXR1_IM-0001-3001"
    assert openi.canonical_image_id("CXR10_IM-0002-1001") == "CXR10_IM-0002-1001"
    r1 = reports[0]
    assert openi.frontal_image(r1, views) == "CXR1_1_IM-0001-3001"  # both of report 1's images are PA
    lateral_first = [r for r in reports if len(r.images) == 2 and
                     [views.get(openi.canonical_image_id(i)) for i in r.images] == ["lateral", "frontal"]]
    assert len(lateral_first) > 20
    assert all(openi.frontal_image(r, views) == r.images[1] for r in lateral_first)
    chosen = [openi.frontal_image(r, views) for r in reports]
    fallback = [openi.frontal_image(r, views, unknown="first") for r in reports]
    assert sum(c is not None for c in chosen) == 1719
    assert sum(c is not None for c in fallback) > 2500
    assert all(a == b for a, b in zip(chosen, fallback) if a is not None)
    with pytest.raises(ValueError, match="unknown="):
        openi.frontal_image(r1, views, unknown="guess")


def test_images_missing_from_the_csv_are_unknown():
    r = openi.OpenIReport("9", "", "", "x", "y", (), (), ("CXR9_IM-1-1001", "CXR9_IM-1-2001"))
    views = {"CXR9_IM-1-2001": "lateral"}
    assert openi.frontal_image(r, views) is None
    assert openi.frontal_image(r, views, unknown="first") == "CXR9_IM-1-1001"


def _rep(*tags: str) -> openi.OpenIReport:
    return openi.OpenIReport("5", "", "", "f", "i", tuple(tags), (), ())


@pytest.mark.parametrize("tags,positive", [
    (("normal",), {"No Finding"}),
    (("Cardiomegaly/mild", "Pleural Effusion/right/small"), {"Cardiomegaly", "Pleural Effusion"}),
    (("Cardiac Shadow/enlarged/mild",), {"Cardiomegaly"}),
    (("Cardiac Shadow/borderline",), {"No Finding"}),
    (("Pulmonary Atelectasis/base/left",), {"Atelectasis", "Lung Opacity"}),
    (("Opacity/lung/base/left",), {"Lung Opacity"}),
    (("Density/ribs/left/anterior",), {"No Finding"}),
    (("Airspace Disease/lung/base",), {"Lung Opacity"}),
    (("Nodule/lung/right",), {"Lung Lesion", "Lung Opacity"}),
    (("Calcified Granuloma/lung/upper lobe/right", "Granulomatous Disease"), {"No Finding"}),
    (("Pulmonary Congestion/mild",), {"Edema", "Lung Opacity"}),
    (("Costophrenic Angle/left/blunted",), {"Pleural Effusion"}),
    (("Thickening/pleura/apex/bilateral",), {"Pleural Other"}),
    (("Thickening/bronchi",), {"No Finding"}),
    (("Fractures, Bone/ribs/left/healed",), {"Fracture"}),
    (("Hydropneumothorax",), {"Pneumothorax", "Pleural Effusion"}),
    (("Catheters, Indwelling/right",), {"Support Devices", "No Finding"}),
    (("Mediastinum/prominent",), {"Enlarged Cardiomediastinum"}),
])
def test_mesh_mapping(tags, positive):
    got = openi.mesh_labels(_rep(*tags))
    assert set(got) == set(LABELS)
    assert {k for k, v in got.items() if v == 1} == positive
    assert set(got.values()) <= {0, 1}


def test_no_indexing_gives_no_labels(reports):
    assert openi.mesh_labels(_rep("No Indexing")) is None
    assert openi.mesh_labels(_rep()) is None
    labelled = [openi.mesh_labels(r) for r in reports]
    assert 2500 < sum(x is not None for x in labelled) < 2637
    prevalence = {k: sum(x[k] for x in labelled if x) for k in LABELS}
    assert prevalence["No Finding"] > 1500 and prevalence["Cardiomegaly"] > 200 and prevalence["Pleural Effusion"] > 100


def test_split_is_patient_level_deterministic_and_80_10_10(reports):
    a, b, c = openi.split_of(reports, 0), openi.split_of(reports, 0), openi.split_of(reports, 1)
    assert a == b and a != c
    n = {s: sum(v == s for v in a.values()) for s in ("train", "val", "test")}
    assert abs(n["train"] / len(reports) - 0.8) < 0.01 and abs(n["val"] / len(reports) - 0.1) < 0.01
    ids = np.array([r.patient_id for r in reports])
    tr, va, te = split_patients(ids, 0)
    assert [a[r.id] for r in reports] == ["train" if x else ("val" if y else "test") for x, y in zip(tr, va)]


def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_images_resolved_and_manifest_read_by_training(tmp_path, reports, views):
    """Images named as the NLM releases name them, in nested folders; the manifest round-trips."""
    subset = [r for r in reports if openi.frontal_image(r, views)][:24]
    img_dir = tmp_path / "images"
    (img_dir / "png").mkdir(parents=True)
    (img_dir / "dcm" / "deep").mkdir(parents=True)
    rng = np.random.default_rng(0)
    made = {}
    for i, r in enumerate(subset[:20]):  # the last 4 have no file: counted, not exported
        fid = openi.canonical_image_id(openi.frontal_image(r, views))
        num, rest = fid[3:].split("_", 1)
        if i % 2:
            p = img_dir / "dcm" / "deep" / f"{num}_{rest}.dcm"  # as the CSV's filename column
            _write_dicom(p, rng.integers(0, 4096, (48, 40)))
        else:
            p = img_dir / "png" / f"{fid}.png"  # NLM PNG release
            Image.fromarray(rng.integers(0, 255, (48, 40), dtype=np.uint8)).save(p)
        made[r.id] = p
    for r in subset[:4]:  # a lateral image beside the frontal one must not be picked
        lat = next((i for i in r.images if views.get(openi.canonical_image_id(i)) == "lateral"), None)
        if lat:
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(img_dir / "png" / f"{openi.canonical_image_id(lat)}.png")

    index = openi.ImageIndex(img_dir)
    assert index.find(openi.frontal_image(subset[0], views)) == made[subset[0].id]
    out = tmp_path / "man" / "manifest.csv"
    summary = openi.export_manifest(subset, img_dir, views, out, seed=3)
    assert (summary.rows, summary.no_file, summary.no_frontal) == (20, 4, 0)

    rows = read_rows(out, require=TRAINING_COLUMNS)
    assert [row["patient_id"] for row in rows] == [f"openi-{r.id}" for r in subset[:20]]
    for row, r in zip(rows, subset):
        assert (out.parent / row["path"]).resolve() == made[r.id].resolve()
        mesh = openi.mesh_labels(r)
        assert [row[k] for k in LABELS] == ([str(mesh[k]) for k in LABELS] if mesh else [""] * 14)
        assert row["report"] == r.text and row["split"] == openi.split_of(subset, 3)[r.id]

    from model_training.data import training_items

    items = training_items(out)
    img = items[1].load()
    assert img.shape == (48, 40) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert items[0].load().shape == (48, 40)


def test_manifest_with_labeler_labels(tmp_path, reports, views):
    from index.labelers import get_extractor

    subset = [r for r in reports if openi.frontal_image(r, views)][:6]
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    for r in subset:
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(img_dir / f"{openi.frontal_image(r, views)}.png")
    out = tmp_path / "m.csv"
    fn = get_extractor("lexicon")
    openi.export_manifest(subset, img_dir, views, out, labeler=fn)
    with out.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row, r in zip(rows, subset):
        want = fn(r.text)
        assert [row[k] for k in LABELS] == ["" if want[k] is None else str(want[k]) for k in LABELS]
