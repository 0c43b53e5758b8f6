"""Per-label temperature and bias (Platt scaling), thresholds and confidence tiers, fitted on the validation split."""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from models.prediction import NOT_VALIDATED, TIERS

_GRID = np.exp(np.linspace(np.log(0.2), np.log(5.0), 61))
# Prior on a label's log temperature: normal around the pooled temperature (one fitted on every
# label's known cells together), sd 0.5 (a factor of 2.7 at two sd). Without it a label with two
# validation positives took the grid's edge (T = 0.2 for Enlarged Cardiomediastinum on phantoms
# of seed 3131: five times sharper, on two images).
LOG_T_PRIOR_SD = 0.5
# Prior on a label's bias (added to logit / T): normal around 0, sd 1. Temperature alone cannot
# move a decision (sign(logit / T) is sign(logit)), so a head whose logits are shifted on held-out
# images (it saw its training images' labels) calls findings present too often or too rarely at
# p >= 0.5 however well T fits. The bias corrects that (Platt scaling). Tuned on phantoms of seeds
# 101-505: +0.003 elementwise accuracy of B5, Brier 0.0699 -> 0.0690, ECE 0.0267 -> 0.0234, the
# same AUROC. The grid's step (0.1) is a probability step of at most 0.025.
BIAS_PRIOR_SD = 1.0
_BIAS_GRID = np.linspace(-3.0, 3.0, 61)


def _nll(lk: np.ndarray, yk: np.ndarray, bias: float = 0.0) -> np.ndarray:
    """Summed BCE of mean_n sigmoid(logit / T + bias) for every T of the grid: (len(_GRID),)."""
    p = np.clip((1 / (1 + np.exp(-(lk[None] / _GRID[:, None, None] + bias)))).mean(-1), 1e-6, 1 - 1e-6)
    return -(yk * np.log(p) + (1 - yk) * np.log(1 - p)).sum(-1)


def fit_calibration(logits: np.ndarray, y: np.ndarray, prior_sd: float | None = LOG_T_PRIOR_SD,
                    bias_sd: float = BIAS_PRIOR_SD) -> tuple[np.ndarray, np.ndarray]:
    """Temperature and bias per label, p = mean_n sigmoid(logit_n / T + b): the MAP of summed BCE on
    known labels plus a normal prior on log T around the pooled temperature (prior_sd None: no
    prior, each label alone) and one on b around 0 (bias_sd 0: no bias, temperature only).

    logits: (B, N, L) per-sample logits; y: (B, L) with nan for unknown. Returns (T, b), each (L,).
    Grid search: robust and cheap at 14 labels. The data term is a sum, so a label with many
    validation images follows its own data and a thin one the priors; a label with one class or
    under 5 known images gets the pooled temperature (T = 1 without the prior) and b = 0. The
    pooled temperature is fitted with b = 0 over every label's known cells together.
    """
    L = logits.shape[-1]
    known_all = ~np.isnan(y)
    pooled = 1.0
    if prior_sd is not None and known_all.any():
        cells = np.concatenate([logits[known_all[:, k], :, k] for k in range(L)])
        ys = np.concatenate([y[known_all[:, k], k] for k in range(L)])
        pooled = float(_GRID[np.argmin(_nll(cells, ys))]) if ys.min() != ys.max() else 1.0
    temperature, bias = np.full(L, pooled), np.zeros(L)
    biases = _BIAS_GRID if bias_sd > 0 else np.zeros(1)
    for k in range(L):
        known = known_all[:, k]
        yk = y[known, k]
        if known.sum() < 5 or yk.min() == yk.max():
            continue
        objective = np.stack([_nll(logits[known, :, k], yk, b) for b in biases], axis=1)  # (T grid, b grid)
        if prior_sd is not None:
            objective += ((np.log(_GRID) - np.log(pooled)) ** 2 / (2 * prior_sd**2))[:, None]
        if bias_sd > 0:
            objective += (biases**2 / (2 * bias_sd**2))[None, :]
        i, j = np.unravel_index(np.argmin(objective), objective.shape)
        temperature[k], bias[k] = float(_GRID[i]), float(biases[j])
    return temperature, bias


Array = TypeVar("Array", np.ndarray, torch.Tensor)


def calibrated(logits: Array, temperature: Array, bias: Array) -> Array:
    """logit / T + b: the one place the calibration meets a logit (numpy arrays or torch tensors)."""
    return logits / temperature + bias


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
