"""The GSPS overlay (dicom_node/encoders/pr.py): valid (dciodvfy), and read as a viewer reads it (DCMTK dcmp2pgm -v -p)."""

from __future__ import annotations

import datetime
import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_node import codes
from dicom_node.encoders import pr
from dicom_node.encoders.sc import shown_findings
from dicom_node.uids import ResultUIDs, results_key
from models.labels import LABELS
from models.prediction import NOT_VALIDATED, Finding, ModelIdentity, Prediction
from models.preprocess import read_image
from tests.conftest import require_peer

NOW = datetime.datetime(2026, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)
MODEL = ModelIdentity(name="medsam2-cxr-boxlatent", version="0.1.0", digest="ab" * 32,
                      manufacturer=codes.MANUFACTURER, synthetic_training=True,
                      training_data="synthetic phantom radiographs", intended_use="tests")


def _blob(cy: float, cx: float, sigma: float = 2.5, n: int = 32) -> np.ndarray:
    y, x = np.mgrid[0:n, 0:n]
    return np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma**2))


def _prediction(ood: bool = False) -> Prediction:
    """Two present findings with saliency (one touching the grid's border), one absent."""
    probs = dict.fromkeys(LABELS, 0.05)
    probs.update({"Pneumothorax": 0.91, "Pleural Effusion": 0.77, "Cardiomegaly": 0.3})
    tiers = {"Pneumothorax": NOT_VALIDATED, "Pleural Effusion": "medium"}
    findings = tuple(Finding(k, probs[k], 0.5, tiers.get(k, "low"), 0.02) for k in LABELS)
    saliency = {"Pneumothorax": _blob(6, 8), "Pleural Effusion": _blob(29, 30, 3.0), "Cardiomegaly": _blob(18, 16)}
    return Prediction(findings=findings, ood_score=1.5 if ood else 0.1, ood_threshold=1.0,
                      center=np.zeros(4), radius=np.ones(4), saliency=saliency)


def _source() -> Dataset:
    path = get_testdata_file("RG1_UNCI.dcm")  # a real MONOCHROME1 CR chest, 1955 x 1841
    if path is None:
        pytest.skip("RG1_UNCI.dcm not available: install the test extras (pydicom-data)")
    return pydicom.dcmread(path)


def _encode(source: Dataset, prediction: Prediction) -> pydicom.Dataset:
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, results_key(MODEL))
    return pr.encode_pr(source, read_image(source), prediction, MODEL, uids, NOW)


def _need(*tools: str) -> None:
    for tool in tools:
        require_peer(tool)


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([require_peer("dciodvfy"), str(path)], capture_output=True, text=True, check=False)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def dcmp2pgm(ps: Path, image: Path, workdir: Path) -> tuple[str, np.ndarray, dict[str, np.ndarray]]:
    """What DCMTK's viewer pipeline makes of a presentation state: its verbose dump (layers, text
    and graphic objects), the rendered image, and each activated overlay it wrote as a bitmap."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = subprocess.run([require_peer("dcmp2pgm"), "-v", "-p", str(ps), str(image), "out.pgm"], cwd=workdir,
                         capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    dump = re.sub(r"(?m)^[A-Z]: ", "", out.stdout + out.stderr)  # DCMTK's log level prefix
    overlays = {name: np.asarray(Image.open(workdir / name)) > 0
                for name in re.findall(r'filename="(ovl_\d+\.pgm)" - written', dump)}
    return dump, np.asarray(Image.open(workdir / "out.pgm")), overlays


def text_objects(dump: str) -> list[dict]:
    """The text objects dcmp2pgm listed: text, and the anchor point or bounding box it read, each in
    source pixels (a display-unit box scaled by the displayed area, here the whole image)."""
    area = re.search(r"displayed area TLHC=(\d+)\\(\d+) BRHC=(\d+)\\(\d+)", dump)
    width, height = int(area[3]) - int(area[1]) + 1, int(area[4]) - int(area[2]) + 1
    found = []
    for text, anchor, box in re.findall(r'text \d+: "(.*)"\n\s*anchor point: (.*)\n\s*bounding box: (.*)', dump):
        item: dict = {"text": text, "anchor": None, "box": None}
        if a := re.match(r"([\d.]+)\\([\d.]+)", anchor):
            item["anchor"] = (float(a[1]), float(a[2]))
        if b := re.match(r"TLHC=([\d.]+)\\([\d.]+) BRHC=([\d.]+)\\([\d.]+) units=(\w+) justification=(\w+)", box):
            x0, y0, x1, y1 = (float(v) for v in b.groups()[:4])
            if b[5] == "display":
                x0, x1, y0, y1 = x0 * width, x1 * width, y0 * height, y1 * height
            item["box"], item["justification"] = (x0, y0, x1, y1), b[6]
        found.append(item)
    return found


def render_png(dump: str, rendered: np.ndarray, overlays: dict[str, np.ndarray], path: Path,
               long_side: int = 1024) -> list[dict]:
    """One picture of what dcmp2pgm read: its rendering, its overlay bitmaps in yellow and the text
    objects it listed in their boxes (dcmp2pgm itself draws neither into its PGM)."""
    rgb = np.repeat(rendered[..., None], 3, axis=2).astype(np.uint8)
    for bitmap in overlays.values():
        rgb[bitmap] = (255, 220, 0)
    img = Image.fromarray(rgb)
    scale = long_side / max(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    draw = ImageDraw.Draw(img)
    texts = text_objects(dump)
    for t in texts:
        if t["box"]:
            x0, y0, x1, y1 = (v * scale for v in t["box"])
            size = max(8, round((y1 - y0) * 0.8))  # the box's height, or less where the text is wider than it
            size = min(size, max(8, int(size * (x1 - x0) / draw.textlength(t["text"], font=ImageFont.load_default(size=size)))))
            font = ImageFont.load_default(size=size)
            w = draw.textlength(t["text"], font=font)
            x = x1 - w if t["justification"] == "right" else x0
            draw.text((x, y0), t["text"], font=font, fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
        else:
            font = ImageFont.load_default(size=max(12, long_side // 45))
            draw.text((t["anchor"][0] * scale, t["anchor"][1] * scale - font.size * 1.2), t["text"], font=font,
                      fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    img.save(path)
    return texts


def _segment_distance(points: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Distance of each point (column, row) to the polyline xy."""
    a, b = xy[:-1], xy[1:]
    d = b - a
    t = np.clip(((points[:, None, :] - a[None]) * d[None]).sum(-1) / np.maximum((d * d).sum(-1), 1e-9), 0, 1)
    nearest = a[None] + t[..., None] * d[None]
    return np.sqrt(((points[:, None, :] - nearest) ** 2).sum(-1)).min(1)


def test_outlines_scale_from_the_grid_to_source_pixels() -> None:
    """A blob centred on grid cell (i, j) gives a closed outline around the source pixel of that
    cell's centre, also when it touches the border of the grid."""
    rows, columns = 1000, 800
    (inner,) = pr.outlines(_blob(10, 20), rows, columns)
    assert np.array_equal(inner[0], inner[-1])
    centre = inner.mean(0)
    assert np.allclose(centre, [(20 + 0.5) * columns / 32, (10 + 0.5) * rows / 32], atol=columns / 64)
    (edge,) = pr.outlines(_blob(0, 0), rows, columns)
    assert np.array_equal(edge[0], edge[-1]) and edge.min() >= 0
    assert pr.outlines(np.zeros((32, 32)), rows, columns) == []


def test_label_boxes_stay_in_the_image_clear_of_the_notices_and_of_each_other() -> None:
    rows, columns, notices = 1000, 800, 3
    band = rows * (pr.NOTICE_TOP + pr.NOTICE_LINE * notices)
    height = pr.LABEL_HEIGHT * rows
    # room above the region: the label sits on its top edge, left-aligned with it
    box, right = pr.label_box((100, 500, 300, 700), rows, columns, notices, [])
    assert box[3] == 500 and box[0] == 100 and not right
    # a region in the notice band's reach: below it
    box, _ = pr.label_box((100, band, 300, 400), rows, columns, notices, [])
    assert box[1] == 400
    # at the right edge: right-justified, ending where the region ends, inside the image
    box, right = pr.label_box((700, 500, 790, 600), rows, columns, notices, [])
    assert right and box[2] == 790 and box[0] >= 0
    # at the bottom right corner with nothing above free: still inside the image
    box, _ = pr.label_box((700, 0, 800, 1000), rows, columns, notices, [])
    assert box[3] <= rows and box[2] <= columns
    # the same place twice: the second moves down a line
    first, _ = pr.label_box((100, 500, 300, 700), rows, columns, notices, [])
    second, _ = pr.label_box((120, 500, 300, 700), rows, columns, notices, [first])
    assert second[1] >= first[3] and second[1] - first[1] == height
    # no region: under the notices
    box, _ = pr.label_box(None, rows, columns, notices, [])
    assert box[1] >= band


def test_gsps_is_valid_and_dcmtk_reads_every_shown_finding(tmp_path) -> None:
    _need("dciodvfy", "dcmp2pgm")
    source = _source()
    prediction = _prediction(ood=True)
    ps = _encode(source, prediction)
    image_path, ps_path = tmp_path / "image.dcm", tmp_path / "pr.dcm"
    source.save_as(image_path, enforce_file_format=True)
    ps.save_as(ps_path, enforce_file_format=True)
    assert dciodvfy_errors(ps_path) == []

    # Same study, own series, the source referenced and its pixels left where they are.
    assert ps.StudyInstanceUID == source.StudyInstanceUID and ps.SeriesInstanceUID != source.SeriesInstanceUID
    assert ps.Modality == "PR" and "PixelData" not in ps
    ref = ps.ReferencedSeriesSequence[0].ReferencedImageSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ps.PresentationLUTShape == "INVERSE"  # the source is MONOCHROME1: it must look as it does without us

    dump, rendered, overlays = dcmp2pgm(ps_path, image_path, tmp_path / "dcmp2pgm")
    assert rendered.shape == (source.Rows, source.Columns)
    shown = shown_findings(prediction)
    assert [f.label for f in shown] == ["Pneumothorax", "Pleural Effusion"]
    layers = dict(re.findall(r"Graphic Layer #\d+ \[(\w+)\]\n(.*?)(?=Graphic Layer #|\Z)", dump, re.DOTALL))
    assert set(layers) == {pr.LAYER_OVERLAY, pr.LAYER_OUTLINES, pr.LAYER_LABELS, pr.LAYER_NOTICE}
    for f in shown:
        assert f'"{pr.label_text(f)}"' in layers[pr.LAYER_LABELS]
    assert '"Pneumothorax: 91% (confidence not validated)"' in layers[pr.LAYER_LABELS]
    assert '"Pleural Effusion: 77% (medium confidence)"' in layers[pr.LAYER_LABELS]
    assert "Cardiomegaly" not in layers[pr.LAYER_LABELS]  # absent: not outlined
    assert '"AI result, not for primary diagnosis"' in layers[pr.LAYER_NOTICE]
    assert "outside the model's experience" in layers[pr.LAYER_NOTICE]
    polylines = re.findall(r"points=(\d+) type=polyline .*\n\s+coordinates: (.*)", layers[pr.LAYER_OUTLINES])
    assert len(polylines) == len(shown)  # one region each here
    contours = [np.array([[float(v) for v in p.split("\\")] for p in coords.strip(", ").split(", ")])
                for _, coords in polylines]

    # The overlay: activated on its own layer, written by dcmp2pgm, and holding the outline pixels.
    assert "Number of activated overlays: 1" in layers[pr.LAYER_OVERLAY]
    (bitmap,) = overlays.values()
    assert bitmap.shape == (source.Rows, source.Columns)
    on = np.argwhere(bitmap)[:, ::-1] + 0.5  # (column, row) of each pixel's centre
    assert len(on) > 0
    near = np.min([_segment_distance(on, xy) for xy in contours], axis=0)
    width = pr.line_width(source.Rows, source.Columns)
    assert near.max() <= width  # every overlay pixel lies on an outline
    for xy in contours:  # and every outline is drawn: each vertex has overlay pixels next to it
        vertices = np.floor(xy).astype(int)
        hit = [bitmap[max(0, r - width):r + width + 1, max(0, c - width):c + width + 1].any()
               for c, r in np.clip(vertices, 0, [source.Columns - 1, source.Rows - 1])]
        assert all(hit)
    # Away from the outlines (the centre of the pneumothorax region) the overlay is clear.
    cx, cy = contours[0].mean(0).astype(int)
    assert not bitmap[cy - 5:cy + 5, cx - 5:cx + 5].any()
    drawn = render_png(dump, rendered, overlays, tmp_path / "render.png")
    assert len(drawn) == len(shown) + len(pr.warnings(prediction, MODEL))

    # Each label as dcmp2pgm read it: a box inside the image, clear of the notices and of the other
    # labels, on the line just above or below its own outline and overlapping it horizontally.
    labels = [t for t in drawn if t["text"] in {pr.label_text(f) for f in shown}]
    notices = [t for t in drawn if t not in labels]
    assert len(labels) == len(shown) and all(t["box"] and not t["anchor"] for t in drawn)

    def overlap(a, b) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for i, (t, xy) in enumerate(zip(labels, contours, strict=True)):
        x0, y0, x1, y1 = t["box"]
        assert 0 <= x0 < x1 <= source.Columns and 0 <= y0 < y1 <= source.Rows, t
        assert not any(overlap(t["box"], n["box"]) for n in notices), (t, notices)
        assert not any(overlap(t["box"], o["box"]) for o in labels[i + 1:]), labels
        left, top, right, bottom = xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max()
        assert abs(y1 - top) < 1 or abs(y0 - bottom) < 1, (t, (left, top, right, bottom))
        assert x0 < right and left < x1, (t, (left, top, right, bottom))


def test_gsps_is_deterministic_and_keeps_identity(tmp_path) -> None:
    """Same inputs, same bytes (deterministic UIDs, `now` for every date); the character set and
    identity come from the source through encoders.header like the other results."""
    source = _source()
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientName = "Müller^Jürgen"
    source.StudyDescription = "Thorax p.a."
    a, b = _encode(source, _prediction()), _encode(source, _prediction())
    for ds, name in ((a, "a.dcm"), (b, "b.dcm")):
        ds.save_as(tmp_path / name, enforce_file_format=True)
    assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()
    assert a.SpecificCharacterSet == "ISO_IR 100" and str(a.PatientName) == "Müller^Jürgen"
    assert a.StudyDescription == "Thorax p.a." and str(a.PresentationCreationDate) == "20260304"
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, results_key(MODEL))
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (uids.pr_instance, uids.pr_series)
    assert len({uids.pr_instance, uids.sr_instance, uids.sc_instance, uids.ko_instance}) == 4


def test_gsps_of_a_phantom_without_window_is_valid(tmp_path) -> None:
    """A MONOCHROME2 source with no window and no rescale gets a window over its stored values."""
    _need("dciodvfy")
    from phantoms import generate

    generate(1, tmp_path / "ph", seed=21, size=256)
    source = pydicom.dcmread(next((tmp_path / "ph" / "images").glob("*.dcm")))
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "RescaleType"):
        if keyword in source:
            delattr(source, keyword)
    ps = _encode(source, _prediction())
    ps.save_as(tmp_path / "pr.dcm", enforce_file_format=True)
    assert dciodvfy_errors(tmp_path / "pr.dcm") == []
    voi = ps.SoftcopyVOILUTSequence[0]
    assert float(voi.WindowWidth) > 1
    assert ps.PresentationLUTShape == ("INVERSE" if source.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY")
