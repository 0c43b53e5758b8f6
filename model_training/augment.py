"""Pixel-space device shifts for device-invariant training (method (B)).

Works on preprocessed float images in [0, 1], so it applies to any data set, not only phantoms.
Intensity 1 is the strongest shift used in training.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def device_shift(img: np.ndarray, rng: np.random.Generator, intensity: float = 1.0) -> np.ndarray:
    """A random acquisition change: gamma, contrast, blur, resolution, noise, bit depth, collimation."""
    x = img.astype(np.float32, copy=True)
    s = float(intensity)
    x = np.clip(x, 0, 1) ** np.exp(rng.uniform(-0.5, 0.5) * s)  # gamma
    mid = x.mean()
    x = mid + (x - mid) * (1 + rng.uniform(-0.35, 0.35) * s)  # contrast
    sigma = rng.uniform(0, 2.0) * s * max(x.shape) / 512
    if sigma > 0.3:
        x = ndimage.gaussian_filter(x, sigma)
    f = 1 - rng.uniform(0, 0.5) * min(s, 1.8)  # resolution loss
    if f < 0.95:
        small = ndimage.zoom(x, f, order=1)
        x = ndimage.zoom(small, (x.shape[0] / small.shape[0], x.shape[1] / small.shape[1]), order=1)[: img.shape[0], : img.shape[1]]
        if x.shape != img.shape:
            x = np.pad(x, [(0, img.shape[0] - x.shape[0]), (0, img.shape[1] - x.shape[1])], mode="edge")
    x = x + rng.normal(0, 0.03 * s, x.shape).astype(np.float32)  # noise
    levels = 2 ** int(round(12 - 3 * min(s, 2) * rng.uniform(0, 1)))  # bit depth
    x = np.round(np.clip(x, 0, 1) * (levels - 1)) / (levels - 1)
    if rng.uniform() < 0.5 * min(s, 1):  # collimation borders
        h, w = x.shape
        m = (rng.uniform(0, 0.08 * s, 4) * [h, h, w, w]).astype(int)
        x[: m[0]] = x[h - m[1]:] = 1.0 if rng.uniform() < 0.5 else 0.0
        x[:, : m[2]] = x[:, w - m[3]:] = x[0, 0] if m[0] else 0.0
    return np.clip(x, 0, 1).astype(np.float32)
