"""CXR-sized test images for the benchmarks: phantom radiographs scaled to a detector's matrix.

A real detector image is about 2048 x 2500 pixels at 16 bits (10 MB uncompressed); the phantom
renderer works on a square grid, so a few phantoms are rendered once and resampled to the
requested matrix. Every file gets its own study and SOP Instance UID (the node skips
duplicates), derived from a seed so a rerun writes the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import phantoms

DETECTOR = (2500, 2048)  # rows x columns of a 35 x 43 cm portrait detector at ~0.17 mm


def _resample(stored: np.ndarray, rows: int, cols: int) -> np.ndarray:
    img = Image.fromarray(stored.astype(np.float32), mode="F").resize((cols, rows), Image.Resampling.BILINEAR)
    return np.round(np.asarray(img)).clip(0, np.iinfo(np.uint16).max).astype(np.uint16)


def write_cxr_images(out: Path, n: int, rows: int = DETECTOR[0], cols: int = DETECTOR[1], seed: int = 0,
                     distinct: int = 4, render_size: int = 768) -> list[Path]:
    """Write n frontal chest radiographs (explicit VR little endian, 16 bits allocated).

    ``distinct`` phantoms are rendered and cycled: the pixel content does not change any timing
    the benchmarks measure, the byte count does. Returns the paths in sending order.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cases = phantoms.sample_cases(max(1, min(n, distinct)), seed)
    rendered = []
    for k, case in enumerate(cases):
        stored, meta = phantoms.render(case, seed=seed * 7919 + k, size=render_size)
        rendered.append((case, _resample(stored, rows, cols), meta))
    paths = []
    for i in range(n):
        case, pixels, meta = rendered[i % len(rendered)]
        ds = phantoms.to_dicom(pixels, meta, case, uid_seed=f"bench-{seed}-{rows}x{cols}-{i}")
        path = out / f"cxr-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
