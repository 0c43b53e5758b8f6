"""Prediction -> RGB Secondary Capture: the radiograph, a saliency heat map and a text panel.

Most PACS viewers can show an SC today while few render SR measurements, so the SC must stand on
its own: the warnings (not for primary diagnosis, synthetic training, out of distribution) are
burned into the pixels and BurnedInAnnotation says so.
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset

from dicom_node import codes
from dicom_node.encoders.common import equipment_and_dates, finish, series_description, software_version
from dicom_node.encoders.header import clean_header
from dicom_node.encoders.notices import ENGLISH, NOT_FOR_DIAGNOSIS, OOD_NOTICE, SYNTHETIC_NOTICE
from dicom_node.sop import SC_TRANSFER_SYNTAX
from dicom_node.uids import ResultUIDs
from models.operating_points import summary as operating_points_summary
from models.prediction import Finding, ModelIdentity, Prediction
from models.preprocess import to_uint8

SC_SERIES_NUMBER = 9902
MAX_SIDE = 2048
MIN_SIDE = 1024  # smaller images are enlarged so the burned-in text stays legible
PANEL_FINDINGS = 5
HEAT_ALPHA = 0.55  # opacity where saliency is 1
HEAT_FLOOR = 0.2  # saliency below this stays clear, so the anatomy is not tinted everywhere
_COLORMAP = "turbo"

_WHITE = (255, 255, 255)
_YELLOW = (255, 220, 0)
_ORANGE = (255, 150, 40)
_RED = (255, 80, 80)


def _fit_size(image: np.ndarray) -> np.ndarray:
    """Long side into [MIN_SIDE, MAX_SIDE] (PACS-friendly, room for readable text), as uint8.

    The display image is 8-bit anyway, so it is converted first and resized in Pillow's 8-bit
    mode, several times faster than resizing the float image."""
    h, w = image.shape
    gray = to_uint8(image)
    scale = min(1.0, MAX_SIDE / max(h, w))
    if max(h, w) < MIN_SIDE:
        scale = MIN_SIDE / max(h, w)
    if scale == 1.0:
        return gray
    resample = Image.Resampling.LANCZOS if scale < 1.0 else Image.Resampling.BICUBIC
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(gray, mode="L").resize(size, resample), dtype=np.uint8)


def shown_findings(prediction: Prediction) -> list[Finding]:
    """Findings whose saliency is drawn: the present abnormal ones, else the most probable one."""
    abnormal = prediction.top(len(prediction.findings))
    present = [f for f in abnormal if f.present and f.label in prediction.saliency]
    if present:
        return present
    return [f for f in abnormal if f.label in prediction.saliency][:1]


def _blend_table() -> np.ndarray:
    """RGB for every (gray level, saliency level) pair, both 0..255: the heat colour of the
    saliency blended over the gray with an opacity that rises from HEAT_FLOOR to HEAT_ALPHA."""
    level = np.arange(256) / 255.0
    colour = np.round(colormaps[_COLORMAP](level)[:, :3] * 255)  # (256, 3)
    alpha = HEAT_ALPHA * np.clip((level - HEAT_FLOOR) / (1.0 - HEAT_FLOOR), 0.0, 1.0)  # (256,)
    gray = np.arange(256, dtype=np.float64)[:, None, None]
    table = gray * (1.0 - alpha[None, :, None]) + colour[None, :, :] * alpha[None, :, None]
    return np.round(table).astype(np.uint8).reshape(256 * 256, 3)


_BLEND = _blend_table()


def _heat_overlay(gray: np.ndarray, prediction: Prediction, shown: list[Finding]) -> np.ndarray:
    """Blend the max saliency of the shown findings over the uint8 gray image as a heat map.

    The maximum is taken on the model's grid, quantised and upsampled once, and each output
    pixel is one lookup in a 256 x 256 table: milliseconds at 2048 px, where a colour map
    evaluated per pixel in floating point took most of the io step."""
    if not shown:
        return np.repeat(gray[..., None], 3, axis=2)
    h, w = gray.shape
    small = np.max([np.clip(prediction.saliency[f.label], 0.0, 1.0) for f in shown], axis=0)
    level = Image.fromarray(to_uint8(small), mode="L").resize((w, h), Image.Resampling.BICUBIC)
    index = (gray.astype(np.uint16) << 8) | np.asarray(level, dtype=np.uint16)
    return _BLEND.take(index, axis=0)


def _panel_lines(
    prediction: Prediction, model: ModelIdentity, shown: list[Finding]
) -> list[tuple[str, tuple[int, int, int]]]:
    lines: list[tuple[str, tuple[int, int, int]]] = [(NOT_FOR_DIAGNOSIS, _YELLOW)]
    if model.synthetic_training:
        lines.append((SYNTHETIC_NOTICE, _ORANGE))
    if prediction.out_of_distribution:
        lines.append((OOD_NOTICE, _RED))
    lines.append(("", _WHITE))
    for f in prediction.top(PANEL_FINDINGS):
        status = "present" if f.present else "below threshold"
        text = f"{f.label}: {100 * f.probability:.0f}% - {status}, {ENGLISH.tiers[f.tier]}"
        lines.append((text, _WHITE if f.present else (200, 200, 200)))
    if ops := operating_points_summary({f.label: f.operating_point for f in prediction.findings}):
        lines.append((f"Thresholds: {ops}", _WHITE))
    if shown:
        lines.append(("Heat map: " + ", ".join(f.label for f in shown), _WHITE))
    lines.append((f"{model.name} {software_version(model)}", _WHITE))
    return lines


def _fit_font(
    draw: ImageDraw.ImageDraw, lines: list[str], max_width: float, start: int
) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Largest default font (down to 8 px) whose longest line fits the width."""
    size = start
    while True:
        font = ImageFont.load_default(size=size)
        widest = max(draw.textlength(line, font=font) for line in lines)
        if widest <= max_width or size <= 8:
            return font
        size = max(8, int(size * 0.9))


def _draw_panel(rgb: Image.Image, lines: list[tuple[str, tuple[int, int, int]]]) -> None:
    """Text on a dark translucent box in the top-left corner, sized to the image.

    Only the box is composited (the rest of a 2048 px image is left alone)."""
    w, _ = rgb.size
    measure = ImageDraw.Draw(rgb)
    font = _fit_font(measure, [t for t, _ in lines], 0.9 * w, start=max(12, w // 55))
    line_h = int(font.getbbox("Ag")[3] * 1.3) if hasattr(font, "getbbox") else 12
    pad = max(4, line_h // 3)
    widest = max(measure.textlength(t, font=font) for t, _ in lines)
    box = (0, 0, min(rgb.width, int(widest + 2 * pad)), min(rgb.height, int(pad * 2 + line_h * len(lines))))
    overlay = Image.new("RGBA", (box[2], box[3]), (0, 0, 0, 170))
    draw = ImageDraw.Draw(overlay)
    for i, (text, colour) in enumerate(lines):
        draw.text((pad, pad + i * line_h), text, font=font, fill=(*colour, 255))
    region = rgb.crop(box).convert("RGBA")
    rgb.paste(Image.alpha_composite(region, overlay).convert("RGB"), box[:2])


def render(image: np.ndarray, prediction: Prediction, model: ModelIdentity) -> np.ndarray:
    """The SC pixels: uint8 RGB (h, w, 3), long side between MIN_SIDE and MAX_SIDE."""
    gray = _fit_size(image)
    shown = shown_findings(prediction)
    rgb = Image.fromarray(_heat_overlay(gray, prediction, shown), mode="RGB")
    _draw_panel(rgb, _panel_lines(prediction, model, shown))
    return np.asarray(rgb, dtype=np.uint8)


def _orientation(source: Dataset) -> tuple[str, str]:
    """Patient Orientation of the source (unchanged by resizing); a frontal CXR default else."""
    po = source.get("PatientOrientation")
    if po is not None and len(po) == 2 and all(str(v) for v in po):
        return str(po[0]), str(po[1])
    if str(source.get("ViewPosition", "")).upper() == "AP":
        return "R", "F"
    return "L", "F"  # PA: the usual view of the frontal chest radiographs this node accepts


def _laterality(source: Dataset) -> str | None:
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(source.get(keyword, "") or "").upper()
        if value in ("R", "L"):
            return value
    return None


def encode_sc(
    source: Dataset,
    image: np.ndarray,
    prediction: Prediction,
    model: ModelIdentity,
    uids: ResultUIDs,
    now: datetime.datetime,
) -> hd.sc.SCImage:
    """Encode the saliency picture as an RGB SC in the source's study, in the model's SC series.

    Parameters
    ----------
    image
        The read_image() output for `source`: float [0, 1], source resolution.

    Raises
    ------
    ValueError
        `image` is not a 2D array.
    HeaderError
        The source lacks a Type 1 attribute the SC must reference (encoders.header).
    """
    if np.asarray(image).ndim != 2:
        raise ValueError(f"encode_sc expects the 2D read_image() output, got shape {image.shape}")
    header = clean_header(source)
    source = header.dataset
    pixels = render(image, prediction, model)
    laterality = _laterality(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.sc_series,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sc_instance,
        instance_number=1,
        laterality=laterality,
        patient_orientation=_orientation(source),
        series_description=series_description(model, "saliency"),
        transfer_syntax_uid=SC_TRANSFER_SYNTAX,
        **equipment_and_dates(model, now),
    )
    # Laterality is Type 2C: dciodvfy wants it absent for an unpaired body part, which it can only
    # tell from Body Part Examined. This node only receives chest radiographs.
    sc.BodyPartExamined = str(source.get("BodyPartExamined") or "CHEST")
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{NOT_FOR_DIAGNOSIS}. " + (
        f"{SYNTHETIC_NOTICE}." if model.synthetic_training else ""
    )
    sc.DerivationDescription = f"Saliency of {codes.ALGORITHM_NAME} over the source image"
    sc.SourceImageSequence = [_source_reference(source)]
    finish(sc, model, now, header)
    return sc


def _source_reference(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return item
