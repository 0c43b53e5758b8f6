"""One image loader for training and the case index: a DICOM, PNG or JPEG file to float32 [0, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from models.preprocess import read_image

DICOM_SUFFIXES = (".dcm", ".dicom")
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def is_dicom(path: Path) -> bool:
    """A Part 10 file (DICM after the 128-byte preamble) or one named .dcm / .dicom."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM" or path.suffix.lower() in DICOM_SUFFIXES


def load_image(path: Path) -> np.ndarray:
    """A DICOM file through the node's reader (models.preprocess.read_image: VOI, MONOCHROME1), or a
    PNG / JPEG as grayscale: 8-bit divided by 255, 16-bit by 65535 (the full range of the file's
    bit depth, so a 16-bit radiograph keeps its 65,536 grey levels instead of being clipped to 8)."""
    path = Path(path)
    if is_dicom(path):
        return read_image(pydicom.dcmread(path))
    with Image.open(path) as im:
        if im.mode in _SIXTEEN_BIT:
            a = np.asarray(im, dtype=np.float32)
            top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        else:
            a = np.asarray(im.convert("L"), dtype=np.float32)
            top = 255.0
    return np.clip(a / top, 0, 1).astype(np.float32)
