"""Per-label temperature, thresholds and confidence tiers, fitted on the validation split."""

from __future__ import annotations

import numpy as np
import torch

from models.prediction import NOT_VALIDATED, TIERS

_GRID = np.exp(np.linspace(np.log(0.2), np.log(5.0), 61))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Temperature per label minimising BCE of mean_n sigmoid(logit/T) on known labels.

    logits: (B, N, L) per-sample logits; y: (B, L) with nan for unknown. Grid search: robust and
    cheap at 14 labels, and a label with one class keeps T = 1.
    """
    L = logits.shape[-1]
    out = np.ones(L)
    for k in range(L):
        known = ~np.isnan(y[:, k])
        yk = y[known, k]
        if known.sum() < 5 or yk.min() == yk.max():
            continue
        lk = logits[known, :, k]
        best: tuple[float, float] | None = None
        for t in _GRID:
            p = np.clip((1 / (1 + np.exp(-lk / t))).mean(1), 1e-6, 1 - 1e-6)
            nll = -(yk * np.log(p) + (1 - yk) * np.log(1 - p)).mean()
            if best is None or nll < best[0]:
                best = (nll, t)
        assert best is not None  # _GRID is not empty
        out[k] = best[1]
    return out


def fit_thresholds(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-label decision threshold maximising Youden's J on validation; 0.5 where undefined.

    The node's rule before issue 16, kept for comparison; bundles now use models.operating_points.
    """
    L = p.shape[1]
    out = np.full(L, 0.5)
    for k in range(L):
        known = ~np.isnan(y[:, k])
        yk, pk = y[known, k], p[known, k]
        if known.sum() < 5 or yk.min() == yk.max():
            continue
        cands = np.unique(np.clip(pk, 0.02, 0.98))
        tpr = np.array([(pk[yk == 1] >= t).mean() for t in cands])
        fpr = np.array([(pk[yk == 0] >= t).mean() for t in cands])
        out[k] = float(cands[np.argmax(tpr - fpr)])
    return out


def tier(probability: float, threshold: float, spread: float, validated: bool = True) -> str:
    """high: far from the threshold and stable across BL-TTA samples; low: close or unstable.

    validated: whether the bundle was validated on real images (models.bundle.Bundle.validated).
    A bundle that was not never states medium or high confidence: those become NOT_VALIDATED
    (its own figures, on phantoms, say nothing of a patient's image); low stays low.
    """
    t = _tier(probability, threshold, spread)
    return t if validated or t == TIERS[2] else NOT_VALIDATED


def _tier(probability: float, threshold: float, spread: float) -> str:
    margin = abs(probability - threshold) / max(threshold if probability < threshold else 1 - threshold, 1e-6)
    if margin >= 0.6 and spread < 0.05:
        return TIERS[0]
    if margin >= 0.3 and spread < 0.15:
        return TIERS[1]
    return TIERS[2]


def as_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)
