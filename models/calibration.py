"""Per-label temperature, thresholds and confidence tiers, fitted on the validation split."""

from __future__ import annotations

import numpy as np
import torch

from models.prediction import NOT_VALIDATED, TIERS

_GRID = np.exp(np.linspace(np.log(0.2), np.log(5.0), 61))
# Prior on a label's log temperature: normal around the pooled temperature (one fitted on every
# label's known cells together), sd 0.5 (a factor of 2.7 at two sd). Without it a label with two
# validation positives took the grid's edge (T = 0.2 for Enlarged Cardiomediastinum on phantoms
# of seed 3131: five times sharper, on two images).
LOG_T_PRIOR_SD = 0.5


def _nll(lk: np.ndarray, yk: np.ndarray) -> np.ndarray:
    """Summed BCE of mean_n sigmoid(logit / T) for every T of the grid: (len(_GRID),)."""
    p = np.clip((1 / (1 + np.exp(-lk[None] / _GRID[:, None, None]))).mean(-1), 1e-6, 1 - 1e-6)
    return -(yk * np.log(p) + (1 - yk) * np.log(1 - p)).sum(-1)


def fit_temperature(logits: np.ndarray, y: np.ndarray, prior_sd: float | None = LOG_T_PRIOR_SD) -> np.ndarray:
    """Temperature per label: the MAP of summed BCE of mean_n sigmoid(logit/T) on known labels
    plus a normal prior on log T around the pooled temperature (prior_sd None: no prior, each
    label alone, T = 1 where a label has one class or under 5 known images).

    logits: (B, N, L) per-sample logits; y: (B, L) with nan for unknown. Grid search: robust and
    cheap at 14 labels. The data term is a sum, so a label with many validation images follows
    its own data and a thin one the pooled fit; a label with one class or under 5 known images
    gets the pooled temperature.
    """
    L = logits.shape[-1]
    known_all = ~np.isnan(y)
    pooled = 1.0
    if prior_sd is not None and known_all.any():
        cells = np.concatenate([logits[known_all[:, k], :, k] for k in range(L)])
        ys = np.concatenate([y[known_all[:, k], k] for k in range(L)])
        pooled = float(_GRID[np.argmin(_nll(cells, ys))]) if ys.min() != ys.max() else 1.0
    out = np.full(L, pooled)
    for k in range(L):
        known = known_all[:, k]
        yk = y[known, k]
        if known.sum() < 5 or yk.min() == yk.max():
            continue
        objective = _nll(logits[known, :, k], yk)
        if prior_sd is not None:
            objective = objective + (np.log(_GRID) - np.log(pooled)) ** 2 / (2 * prior_sd**2)
        out[k] = float(_GRID[np.argmin(objective)])
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
