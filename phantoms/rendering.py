"""Rendering a case through a device: transmitted intensity, blur, noise, processing, collimation,
burned-in markers, matrix and bit depth; returns stored pixel values and their metadata."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from phantoms.anatomy import _resize
from phantoms.cases import PhantomCase
from phantoms.devices import _device
from phantoms.seeds import rng as _rng
from phantoms.views import attenuation


def _text_mask(text: str, height: int) -> np.ndarray:
    font = ImageFont.load_default()
    l, t, r_, b = font.getbbox(text)
    im = Image.new("L", (int(max(1, r_ - l + 2)), int(max(1, b - t + 2))), 0)  # the bitmap font's box: integers
    ImageDraw.Draw(im).text((1 - l, 1 - t), text, fill=255, font=font)
    k = max(1, height // im.size[1])
    return np.kron(np.asarray(im) > 127, np.ones((k, k), bool))


def _paste(img: np.ndarray, mask: np.ndarray, y: int, x: int, value: float):
    h, w = mask.shape
    H, W = img.shape
    y = max(0, min(H - h, y))
    x = max(0, min(W - w, x))
    sub = img[y:y + h, x:x + w]
    sub[mask[: sub.shape[0], : sub.shape[1]]] = value



def render(case: PhantomCase, seed: int, shift: float = 0.0, size: int = 1024,
           devices=None, mu: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Stored pixel values (uint16 within BitsStored) and their metadata.

    mu: `attenuation(case, size)` when the caller already has it (shifted copies of one case
    share it; it is most of the cost).
    """
    dev = _device(case.device, devices).shifted(shift)
    mu = attenuation(case, size) if mu is None else mu
    r = _rng("render", seed, case.study_id)
    sc = size / 1024
    I = np.exp(-mu)
    if dev.blur > 0:
        I = ndimage.gaussian_filter(I, dev.blur * sc, truncate=3.0)
    if dev.resolution < 1.0:
        lo = max(16, int(round(size * dev.resolution)))
        I = _resize(_resize(I, lo, Image.Resampling.BOX), size, Image.Resampling.BILINEAR)
    noise = r.standard_normal(I.shape, dtype=np.float32)
    noise2 = r.standard_normal(I.shape, dtype=np.float32)
    I = I + dev.quantum_noise * np.sqrt(np.clip(I, 0, None)) * noise * 0.35 + dev.electronic_noise * noise2
    L = -np.log(np.clip(I, 2e-3, None))
    sub = L[::8, ::8]
    lo_v, hi_v = np.percentile(sub, (0.5, 99.7))
    v = (L - lo_v) / max(hi_v - lo_v, 1e-6)
    v = np.clip(0.5 + dev.contrast * (v - 0.5), 0, 1) ** dev.gamma
    # collimation
    c = dev.collimation
    if c > 0:
        rc = _rng("collim", case.study_id)
        edges = [int(size * c * rc.uniform(0.6, 1.4)) for _ in range(4)]
        val = 0.02 if dev.collimation_value == "dark" else 0.97
        v[: edges[0]] = val
        v[size - edges[1]:] = val
        v[:, : edges[2]] = val
        v[:, size - edges[3]:] = val
    # burned-in marker and text
    if dev.marker and case.kind == "chest":
        m = _text_mask(dev.marker, int(48 * sc))
        box = np.ones((m.shape[0] + 8, m.shape[1] + 8), bool)
        xpos = int(size * 0.08) if dev.marker == "R" else int(size * 0.86)
        if case.view == "lateral":
            xpos = int(size * 0.08)
        _paste(v, box, int(size * 0.1), xpos, 1.0)
        _paste(v, np.pad(m, 4), int(size * 0.1), xpos, 0.0)
    if dev.text:
        m = _text_mask(dev.text, int(24 * sc))
        _paste(v, m, int(size * 0.92), int(size * 0.06), 1.0)
    n = max(64, int(round(size * dev.matrix_scale)))
    v = _resize(v, n, Image.Resampling.BILINEAR)
    maxv = (1 << dev.bits_stored) - 1
    stored = np.round(np.clip(v, 0, 1) * maxv).astype(np.uint16)
    if dev.photometric == "MONOCHROME1":
        stored = (maxv - stored).astype(np.uint16)
    spacing = dev.fov_mm / n
    meta = {"bits_stored": dev.bits_stored, "photometric": dev.photometric,
            "pixel_spacing": (round(spacing, 4), round(spacing, 4)), "device": dev.name,
            "modality": dev.modality, "shift": float(shift), "burned_in": bool(dev.marker or dev.text),
            "view_position": ("LL" if case.view == "lateral" else ("AP" if case.kind == "nonchest" and case.nonchest_part == "PELVIS" else ("PA" if case.kind == "nonchest" else dev.view_position))),
            "window_center": maxv / 2.0, "window_width": float(maxv)}
    return stored, meta

