"""DICOM pixels to a display-ready grayscale image that the model and the secondary capture share.

The same function feeds inference and the saliency overlay, so what the model saw is what the
reader sees. Header checks come before decoding: a hostile or broken file must cost nothing.
Which decoder pydicom tries first for JPEG 2000 is set by dicom_node.config.configure(), not here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut, apply_windowing
from pydicom.uid import UID

# Largest Rows x Columns read_image decodes; the listener refuses larger images before storing
# them (dicom_node.inspect), so what the node accepts, a worker can read.
DEFAULT_MAX_PIXELS = 8192 * 8192
# The robust window used when the file carries neither a VOI LUT nor a window.
_PERCENTILES = (0.5, 99.5)


class ImageError(ValueError):
    """A DICOM image this node refuses to read; the message names file, tag and remedy."""


def _where(ds: pydicom.Dataset) -> str:
    """The file a message is about, never patient identifiers."""
    name = getattr(ds, "filename", None)
    if isinstance(name, str) and name:
        return name
    try:
        sop = ds.get("SOPInstanceUID")
    except Exception:  # noqa: BLE001 - a broken element must not hide the real error
        sop = None
    return f"dataset with SOP Instance UID {sop}" if sop else "in-memory dataset"


def _transfer_syntax(ds: pydicom.Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsuid is None:
        return "unknown transfer syntax (no (0002,0010) Transfer Syntax UID)"
    return f"{UID(tsuid).name} ({tsuid})"


def _check_header(ds: pydicom.Dataset, max_pixels: int) -> None:
    """Refuse what we cannot or should not decode, using header values only."""
    where = _where(ds)
    if "PixelData" not in ds:
        raise ImageError(
            f"{where}: (7FE0,0010) Pixel Data is missing; send an image object, not a "
            "report or presentation state"
        )
    spp = int(ds.get("SamplesPerPixel", 1))
    if spp != 1:
        raise ImageError(
            f"{where}: (0028,0002) Samples per Pixel is {spp}; only grayscale (1) radiographs "
            "are supported, send the original monochrome image"
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageError(
            f"{where}: (0028,0004) Photometric Interpretation is {photometric!r}; only "
            "MONOCHROME1/MONOCHROME2 are supported, send the original monochrome image"
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(
            f"{where}: (0028,0008) Number of Frames is {frames}; only single-frame "
            "radiographs are supported, send one frame per instance"
        )
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if rows is None or cols is None:
        raise ImageError(
            f"{where}: (0028,0010) Rows or (0028,0011) Columns is missing; the file is not "
            "a valid image, ask the sender to resend it"
        )
    if int(rows) * int(cols) > max_pixels:
        raise ImageError(
            f"{where}: (0028,0010) Rows x (0028,0011) Columns = {rows} x {cols} exceeds the "
            f"limit of {max_pixels} pixels; refused before decoding, raise max_pixels only "
            "if such images are expected"
        )


def _output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The value range the VOI stage can produce, so it maps onto [0, 1] without stretching."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        data_max = float(np.max(np.asarray(item.LUTData, dtype=np.float64)))
        return 0.0, max(float(2**bits - 1), data_max)
    # Windowing clamps to [y_min, y_max]: probe with values far outside any window.
    probe = np.array([-1e12, 1e12], dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = apply_windowing(probe, ds, index=0)
    return float(min(lo, hi)), float(max(lo, hi))


def read_image(ds: pydicom.Dataset, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one radiograph to float32 in [0, 1], air dark and bone bright.

    Parameters
    ----------
    ds
        A single-frame monochrome image dataset (with file meta if compressed).
    max_pixels
        Largest Rows * Columns accepted; checked before any decoding.

    Returns
    -------
    np.ndarray
        2D float32 array in [0, 1] at the source resolution.

    Raises
    ------
    ImageError
        Missing pixel data, colour, multi-frame, oversized or undecodable images, and headers
        whose values pydicom or NumPy cannot use (an unknown VR, a text where a number belongs):
        a broken file is refused with this one error type, never a crash of the caller.
    """
    try:
        return _read(ds, max_pixels)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - lazily converted values fail late, with many types
        # The message names the error type only: its text may quote element values.
        raise ImageError(
            f"{_where(ds)}: a header element needed to decode the image has an unusable value or VR "
            f"({type(exc).__name__}); the file is not a valid image, ask the sender to resend it"
        ) from exc


def _read(ds: pydicom.Dataset, max_pixels: int) -> np.ndarray:
    _check_header(ds, max_pixels)
    try:
        stored = ds.pixel_array  # masks to BitsStored and sign-extends
    except Exception as exc:  # decoder plugins raise many types
        raise ImageError(
            f"{_where(ds)}: (7FE0,0010) Pixel Data could not be decoded with transfer syntax "
            f"{_transfer_syntax(ds)}: {exc}; check that pylibjpeg plugins are installed or "
            "ask the sender for an uncompressed or lossless copy"
        ) from exc
    if stored.ndim != 2:
        raise ImageError(
            f"{_where(ds)}: (7FE0,0010) Pixel Data decoded to shape {stored.shape}, expected "
            "a 2D image; send a single-frame grayscale radiograph"
        )

    values = apply_modality_lut(stored, ds).astype(np.float32, copy=False)
    img = _linear_window(values, ds)
    if img is None:
        img = _other_voi(values, ds)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        np.subtract(1.0, img, out=img)
    return img


def _first(value: Any) -> float:
    return float(value[0]) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else float(value)


def _linear_window(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray | None:
    """The first LINEAR or LINEAR_EXACT window (PS3.3 C.11.2.1.2) straight to [0, 1] in float32.

    The same numbers as pydicom's apply_windowing followed by scaling its output range to [0, 1]
    (tests/unit/test_preprocess.py checks it), at a fraction of the cost: pydicom works in float64
    with masks, which was half of decoding a 2500 x 2048 image. None when the file has a VOI LUT
    (it wins), no window, or another VOI LUT Function: pydicom does those."""
    if ("VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0) or not ("WindowCenter" in ds and "WindowWidth" in ds):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    if function == "LINEAR" and width > 1:
        img = (values - np.float32(center - 0.5)) * np.float32(1.0 / (width - 1)) + np.float32(0.5)
    elif function == "LINEAR_EXACT" and width > 0:
        img = (values - np.float32(center)) * np.float32(1.0 / width) + np.float32(0.5)
    else:
        return None
    return np.clip(img, 0.0, 1.0, out=img)


def _other_voi(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """A VOI LUT, a SIGMOID window, or (neither present) a robust percentile window."""
    has_voi = ("VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0) or (
        "WindowCenter" in ds and "WindowWidth" in ds
    )
    if has_voi:
        windowed = apply_voi_lut(values.astype(np.float64), ds, index=0, prefer_lut=True)
        lo, hi = _output_range(ds)
    else:
        windowed = values
        lo, hi = (float(v) for v in np.percentile(values, _PERCENTILES))
    if hi > lo:
        img = (np.asarray(windowed, dtype=np.float32) - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    else:  # flat image: nothing to show, but not an error
        img = np.zeros(values.shape, np.float32)
    return np.clip(img, 0.0, 1.0, out=img)


def resize_for_model(image: np.ndarray, size: int) -> np.ndarray:
    """The encoder's input resize for the GPU worker's decode processes: antialiased bilinear to
    size x size, float32. Pillow's "F" mode gives the numbers of models.predictor.to_input's torch
    resize to within float rounding (tests/unit/test_preprocess.py), and keeps torch (300 MB per
    process) out of those processes; in the model's own process torch's is faster."""
    if image.shape == (size, size):
        return np.asarray(image, dtype=np.float32)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    return np.array(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float image to uint8 for display and the model's uint8 input."""
    return np.round(np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
