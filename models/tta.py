"""BL-TTA: average the classifier over points drawn inside the box.

p = (1/N) sum_n sigmoid(g(c + r * u_n) / T + b), T and b the label's calibration. The u_n are a fixed, scrambled Sobol set made
antithetic (u, -u), so a result is deterministic and the N = 8 estimate has low variance.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.stats import qmc

from models.calibration import calibrated

if TYPE_CHECKING:
    from models.boxhead import BoxHead


def box_samples(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) points in [-1, 1]^dim: n/2 Sobol points and their mirror images."""
    if n < 1:
        raise ValueError(f"BL-TTA needs at least one sample, got n={n}")
    if n == 1:
        return torch.zeros(1, dim)
    half = (n + 1) // 2
    m = max(1, math.ceil(math.log2(half)))
    u = qmc.Sobol(d=dim, scramble=True, seed=seed).random_base2(m)[:half] * 2.0 - 1.0
    u = np.concatenate([u, -u])[:n]
    return torch.as_tensor(u, dtype=torch.float32)


def bl_tta(head: BoxHead, center: torch.Tensor, radius: torch.Tensor, samples: torch.Tensor,
           temperature: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-sample probabilities, shape (B, N, L). Mean over dim 1 is the BL-TTA estimate."""
    z = center[:, None, :] + radius[:, None, :] * samples[None].to(center)
    return torch.sigmoid(calibrated(head.logits(z), temperature, bias))


def linear_limit(weight: torch.Tensor, bias: torch.Tensor, center: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """The N -> infinity limit for a linear classifier and uniform u (probit approximation).

    logit ~ mean w.c + b, variance sum_j w_j^2 r_j^2 / 3; E[sigmoid] ~ sigmoid(mu / sqrt(1 + pi s2 / 8)).
    """
    mu = center @ weight.T + bias
    s2 = (radius**2) @ (weight**2).T / 3.0
    return torch.sigmoid(mu / torch.sqrt(1.0 + math.pi * s2 / 8.0))
