"""Prediction -> Grayscale Softcopy Presentation State: outlines a reader can switch off.

The SC burns the saliency into a copy of the image; a presentation state leaves the original
image untouched and tells the viewer what to draw over it, so the reader can toggle it. It holds:

- per shown finding (encoders.sc.shown_findings), the outlines of its saliency region (the
  contours of `Prediction.saliency[label]` at OUTLINE_LEVEL of its maximum, on the model grid,
  scaled to the source's pixel coordinates) as POLYLINE graphic objects on layer LAYER_OUTLINES,
  and a text object naming the finding, its probability and its tier on LAYER_LABELS, in a box on
  the line above or below its region, inside the image and clear of the notices (`label_box`);
- the notices ("AI result, not for primary diagnosis", phantom training, out of distribution,
  confidence not validated) as text in display coordinates on LAYER_NOTICE;
- the same outlines once more as an overlay plane (group 6000) that the presentation state
  activates on LAYER_OVERLAY: many viewers draw overlays more reliably than graphic annotations.

The source's pixel pipeline is kept: its rescale, its first window (or a window over the stored
values when it has none) and, for MONOCHROME1, an INVERSE presentation LUT, so the image looks as
it does without the presentation state.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable

import contourpy
import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import pack_bits
from pydicom.valuerep import DA, TM

from dicom_node import codes
from dicom_node.encoders.common import equipment_and_dates, finish, series_description
from dicom_node.encoders.header import clean_header
from dicom_node.encoders.notices import ENGLISH
from dicom_node.encoders.sc import shown_findings
from dicom_node.uids import ResultUIDs
from models.prediction import NOT_VALIDATED, Finding, ModelIdentity, Prediction

PR_SERIES_NUMBER = 9904
CONTENT_LABEL = "AI_FINDINGS"
LAYER_OUTLINES = "AI_OUTLINES"
LAYER_LABELS = "AI_LABELS"
LAYER_NOTICE = "AI_NOTICE"
LAYER_OVERLAY = "AI_OVERLAY"
OVERLAY_GROUP = 0x6000
OUTLINE_LEVEL = 0.5  # a region is where the saliency reaches half its maximum
MIN_POINTS = 4  # shorter contours (a lone grid cell) are noise, not a region
SMOOTH_GRID = 128  # the map is upsampled to about this many cells across before contouring
MAX_POINTS = 200  # per outline, after thinning: enough for a smooth curve, small for a viewer
# Where the labels go, as fractions of the image: one line of text each, as wide as a label needs
# at a viewer's usual font, never in the notice band at the top (NOTICE_LINE per notice line, in
# display units, which for the whole image displayed are these fractions too).
LABEL_WIDTH, LABEL_HEIGHT = 0.45, 0.035
NOTICE_TOP, NOTICE_LINE = 0.01, 0.04
# CIELab display colours of the layers (PS3.3 C.10.7.1.1): yellow outlines, white text.
_YELLOW_LAB = (97.1, -21.6, 94.5)
_WHITE_LAB = (100.0, 0.0, 0.0)
_NOTICE_LAB = (83.0, 3.0, 80.0)


def outlines(saliency: np.ndarray, rows: int, columns: int, level: float = OUTLINE_LEVEL) -> list[np.ndarray]:
    """Closed contours of `saliency` at `level` of its maximum, as (N, 2) arrays of (column, row)
    in the source's PIXEL units (PS3.3 C.10.5.1.2: 0,0 is the top left corner of the top left pixel).

    The map covers the whole image (the model input is the image resized, models.preprocess), so
    grid cell (i, j) has its centre at ((j + 0.5) * columns / w, (i + 0.5) * rows / h). The grid is
    padded with zeros first, so a region touching the border still gives a closed outline.
    """
    sal = np.nan_to_num(np.asarray(saliency, dtype=np.float64), nan=0.0)
    if sal.ndim != 2 or sal.size == 0:
        raise ValueError(f"saliency must be a 2D map on the model grid, got shape {sal.shape}")
    peak = float(sal.max())
    if peak <= 0.0:
        return []
    h, w = sal.shape
    k = max(1, SMOOTH_GRID // max(h, w))  # bicubic upsampling first: a round outline, not the grid's polygon
    if k > 1:
        sal = np.asarray(Image.fromarray((sal / peak).astype(np.float32), mode="F")
                         .resize((w * k, h * k), Image.Resampling.BICUBIC), dtype=np.float64)
        h, w, peak = h * k, w * k, float(sal.max())
    padded = np.pad(sal / peak, 1)
    lines = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate).lines(level)
    out = []
    sx, sy = columns / w, rows / h
    for raw in lines:
        line = np.asarray(raw, dtype=np.float64)
        if len(line) < MIN_POINTS:
            continue
        xy = np.empty_like(line)
        xy[:, 0] = np.clip((line[:, 0] - 1 + 0.5) * sx, 0.0, columns)
        xy[:, 1] = np.clip((line[:, 1] - 1 + 0.5) * sy, 0.0, rows)
        if len(xy) > MAX_POINTS:
            xy = xy[np.unique(np.r_[np.linspace(0, len(xy) - 1, MAX_POINTS).round().astype(int), len(xy) - 1])]
        xy = np.round(xy, 1)
        if not np.array_equal(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        out.append(xy)
    return out


def line_width(rows: int, columns: int) -> int:
    """Overlay outline width in source pixels: about 2 screen pixels when the image fits ~1000 px."""
    return max(1, round(max(rows, columns) / 500))


def overlay_bitmap(contours: Iterable[np.ndarray], rows: int, columns: int) -> np.ndarray:
    """The outlines rasterised at the source's size: a (rows, columns) bool array."""
    canvas = Image.new("1", (columns, rows), 0)
    draw = ImageDraw.Draw(canvas)
    width = line_width(rows, columns)
    for xy in contours:
        draw.line([tuple(p) for p in xy.tolist()], fill=1, width=width, joint="curve")
    return np.asarray(canvas, dtype=bool)


def label_text(finding: Finding) -> str:
    """What the reader sees beside an outline: finding, probability, tier (and status when it is
    the most probable finding shown although below its threshold)."""
    status = "" if finding.present else ", below threshold"
    return f"{finding.label}: {100 * finding.probability:.0f}% ({ENGLISH.tiers[finding.tier]}{status})"


def warnings(prediction: Prediction, model: ModelIdentity) -> list[str]:
    """The notices drawn on the image, most important first (the SR carries the full list)."""
    lines = [ENGLISH.not_for_diagnosis]
    if model.synthetic_training:
        lines.append(ENGLISH.synthetic_notice)
    if prediction.out_of_distribution:
        lines.append(ENGLISH.ood_notice)
    if any(f.tier == NOT_VALIDATED for f in prediction.findings):
        lines.append(ENGLISH.not_validated_notice)
    return lines


def _float(value: object) -> float | None:
    """The first value of a DS/IS attribute as a finite float, or None (absent, empty, invalid)."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _modality_lut(source: Dataset) -> hd.ModalityLUTTransformation | None:
    slope, intercept = _float(source.get("RescaleSlope")), _float(source.get("RescaleIntercept"))
    if slope is None or intercept is None or slope == 0.0:
        return None
    return hd.ModalityLUTTransformation(rescale_intercept=intercept, rescale_slope=slope,
                                        rescale_type=hd.RescaleTypeValues.US)


def _voi_lut(source: Dataset, modality: hd.ModalityLUTTransformation | None) -> hd.pr.SoftcopyVOILUTTransformation:
    """The source's first window; without a usable one, the 0.5-99.5 percentiles of its values."""
    center, width = _float(source.get("WindowCenter")), _float(source.get("WindowWidth"))
    function = str(source.get("VOILUTFunction", "") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if center is None or width is None or width <= 1.0:
        values = source.pixel_array.astype(np.float64)
        if modality is not None:
            values = values * float(modality.RescaleSlope) + float(modality.RescaleIntercept)
        lo, hi = np.percentile(values, [0.5, 99.5])
        center, width, function = float((lo + hi) / 2), float(max(hi - lo, 2.0)), "LINEAR"
    return hd.pr.SoftcopyVOILUTTransformation(window_center=round(center, 3), window_width=round(width, 3),
                                              voi_lut_function=function)


def _reference(header: Dataset, source: Dataset, rows: int, columns: int) -> Dataset:
    """What highdicom reads from the referenced image: the cleaned identity plus the pixel geometry."""
    ref = Dataset()
    for elem in header:
        ref.add(elem)
    ref.Rows, ref.Columns = rows, columns
    ref.SamplesPerPixel = 1
    ref.PhotometricInterpretation = str(source.get("PhotometricInterpretation", "MONOCHROME2"))
    return ref


def _add_overlay(ps: Dataset, bitmap: np.ndarray, labels: list[str]) -> None:
    """Overlay Plane (PS3.3 C.9.2) in group 6000 of the presentation state, shown on LAYER_OVERLAY."""
    rows, columns = bitmap.shape
    g = OVERLAY_GROUP
    ps.add_new((g, 0x0010), "US", rows)
    ps.add_new((g, 0x0011), "US", columns)
    ps.add_new((g, 0x0022), "LO", "AI saliency outlines")  # Overlay Description
    ps.add_new((g, 0x0040), "CS", "G")  # graphics
    ps.add_new((g, 0x0045), "LO", "AUTOMATED")  # Overlay Subtype (C.9.2.1.3)
    ps.add_new((g, 0x0050), "SS", [1, 1])  # origin: the overlay covers the image exactly
    ps.add_new((g, 0x0100), "US", 1)
    ps.add_new((g, 0x0102), "US", 0)
    ps.add_new((g, 0x1001), "CS", LAYER_OVERLAY)  # Overlay Activation Layer
    ps.add_new((g, 0x1500), "LO", ("AI: " + ", ".join(labels))[:64] if labels else "AI outlines")  # Overlay Label
    ps.add_new((g, 0x3000), "OW", pack_bits(bitmap.astype(np.uint8).ravel(), pad=True))


Box = tuple[float, float, float, float]  # (left, top, right, bottom) in source pixels


def label_box(region: Box | None, rows: int, columns: int, notices: int, taken: list[Box]) -> tuple[Box, bool]:
    """Where a finding's label goes: a one-line box in the image, just above its region (below it
    when above would reach into the notice band), left-aligned with the region, or right-aligned
    with it where a left-aligned label would run off the image; moved down past the labels already
    placed (``taken``). A finding without a region (a flat map) starts under the notices.
    Returns the box and whether the text is right-justified."""
    width, height = LABEL_WIDTH * columns, LABEL_HEIGHT * rows
    band = rows * (NOTICE_TOP + NOTICE_LINE * notices)
    if region is None:
        left, top, right, bottom = columns * 0.02, band, columns * 0.02, band
    else:
        left, top, right, bottom = region
    y0 = top - height if top - height >= band else min(bottom, rows - height)
    right_justified = left + width > columns
    x0 = max(0.0, min(right, columns) - width) if right_justified else max(0.0, left)

    def clashes(y: float) -> bool:
        return any(x0 < b[2] and b[0] < x0 + width and y < b[3] and b[1] < y + height for b in taken)

    while clashes(y0) and y0 + 2 * height <= rows:
        y0 += height
    y0 = max(y0, 0.0)
    return (x0, y0, x0 + width, y0 + height), right_justified


def encode_pr(
    source: Dataset,
    image: np.ndarray,
    prediction: Prediction,
    model: ModelIdentity,
    uids: ResultUIDs,
    now: datetime.datetime,
) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The GSPS for one source image, in its study, in the model's presentation state series.

    Parameters
    ----------
    image
        The read_image() output for `source`: only its shape is used (the source's rows, columns).

    Raises
    ------
    ValueError
        `image` is not 2D, or the source has more than one sample per pixel.
    HeaderError
        The source lacks a Type 1 attribute the presentation state must reference (encoders.header).
    """
    shape = np.shape(image)
    if len(shape) != 2:
        raise ValueError(f"encode_pr expects the 2D read_image() output, got shape {shape}")
    if int(source.get("SamplesPerPixel", 1) or 1) != 1:
        raise ValueError("a grayscale presentation state needs a single-sample source image "
                         f"(0028,0002) SamplesPerPixel = {source.SamplesPerPixel}")
    rows, columns = int(shape[0]), int(shape[1])
    header = clean_header(source)
    ref = _reference(header.dataset, source, rows, columns)

    shown = shown_findings(prediction)
    layers = {name: hd.pr.GraphicLayer(name, order=i + 1, description=desc, display_color=hd.color.CIELabColor(*lab))
              for i, (name, desc, lab) in enumerate((
                  (LAYER_OVERLAY, "AI saliency outlines as an overlay", _YELLOW_LAB),
                  (LAYER_OUTLINES, "AI saliency outlines of the shown findings", _YELLOW_LAB),
                  (LAYER_LABELS, "AI finding, probability and confidence tier", _WHITE_LAB),
                  (LAYER_NOTICE, ENGLISH.not_for_diagnosis, _NOTICE_LAB)))}
    notices = warnings(prediction, model)
    graphics: list[hd.pr.GraphicObject] = []
    texts: list[hd.pr.TextObject] = []
    boxes: list[Box] = []
    every_contour: list[np.ndarray] = []
    for finding in shown:
        contours = outlines(prediction.saliency[finding.label], rows, columns)
        every_contour += contours
        graphics += [hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE, xy, hd.pr.AnnotationUnitsValues.PIXEL)
                     for xy in contours]
        region = None
        if contours:  # the label goes with the finding's largest region
            xy = max(contours, key=len)
            region = (float(xy[:, 0].min()), float(xy[:, 1].min()), float(xy[:, 0].max()), float(xy[:, 1].max()))
        box, right_justified = label_box(region, rows, columns, len(notices), boxes)
        boxes.append(box)
        texts.append(hd.pr.TextObject(
            label_text(finding), hd.pr.AnnotationUnitsValues.PIXEL, bounding_box=box,
            text_justification=(hd.pr.TextJustificationValues.RIGHT if right_justified
                                else hd.pr.TextJustificationValues.LEFT)))
    notice_objects = [hd.pr.TextObject(line, hd.pr.AnnotationUnitsValues.DISPLAY,
                                       bounding_box=(0.01, NOTICE_TOP + NOTICE_LINE * i, 0.99,
                                                     NOTICE_TOP + NOTICE_LINE * (i + 1)),
                                       text_justification=hd.pr.TextJustificationValues.LEFT)
                      for i, line in enumerate(notices)]
    annotations = [hd.pr.GraphicAnnotation([ref], layers[LAYER_NOTICE], text_objects=notice_objects)]
    if graphics:
        annotations.append(hd.pr.GraphicAnnotation([ref], layers[LAYER_OUTLINES], graphic_objects=graphics))
    if texts:
        annotations.append(hd.pr.GraphicAnnotation([ref], layers[LAYER_LABELS], text_objects=texts))

    modality = _modality_lut(source)
    inverse = ref.PhotometricInterpretation == "MONOCHROME1"  # PS3.4 N.2.x: GSPS ignores the photometric
    kw = equipment_and_dates(model, now)
    ps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[ref],
        series_instance_uid=uids.pr_series,
        series_number=PR_SERIES_NUMBER,
        sop_instance_uid=uids.pr_instance,
        instance_number=1,
        manufacturer=kw["manufacturer"],
        manufacturer_model_name=kw["manufacturer_model_name"],
        software_versions=kw["software_versions"],
        device_serial_number=model.short_digest,
        content_label=CONTENT_LABEL,
        content_description=f"{codes.ALGORITHM_NAME}: {ENGLISH.not_for_diagnosis}"[:64],
        graphic_annotations=annotations,
        graphic_layers=list(layers.values()),
        modality_lut_transformation=modality,
        voi_lut_transformations=[_voi_lut(source, modality)],
        presentation_lut_transformation=hd.PresentationLUTTransformation(
            presentation_lut_shape=(hd.PresentationLUTShapeValues.INVERSE if inverse
                                    else hd.PresentationLUTShapeValues.IDENTITY)),
    )
    ps.SeriesDescription = series_description(model, "outlines")
    # Laterality is Type 2C in General Series: dciodvfy wants it absent for an unpaired body part,
    # which it tells from Body Part Examined (as for the SC). This node receives chest radiographs.
    ps.BodyPartExamined = str(header.dataset.get("BodyPartExamined") or "CHEST")
    ps.PresentationCreationDate, ps.PresentationCreationTime = DA(now.date()), TM(now.time())
    _add_overlay(ps, overlay_bitmap(every_contour, rows, columns), [f.label for f in shown])
    finish(ps, model, now, header)
    return ps
