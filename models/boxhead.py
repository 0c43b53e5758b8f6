"""The box head: encoder features -> a box in latent space (center c, radius r) -> 14 logits.

An image is a hyperrectangle [c - r, c + r] rather than a point; the classifier g is linear on a
latent point so that BL-TTA has a closed-form limit to test against (../shared/docs/method.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.labels import N_LABELS

RADIUS_EPS = 1e-4


def pool_features(vision_features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 5C): global average plus a 2x2 grid of averages.

    The grid keeps coarse position (a basal effusion and an apical pneumothorax pool differently),
    at a size a linear head can use. Differentiable, so saliency can flow back to the map.
    """
    g = vision_features.mean(dim=(2, 3))
    q = F.adaptive_avg_pool2d(vision_features, 2).flatten(1)
    return torch.cat([g, q], dim=1)


class BoxHead(nn.Module):
    """h -> (c, r); z -> logits. Features are standardised with statistics frozen at training."""

    feat_mean: torch.Tensor  # buffers (register_buffer below)
    feat_std: torch.Tensor

    def __init__(self, in_dim: int, latent_dim: int = 128, hidden: int = 256, n_labels: int = N_LABELS,
                 box: bool = True) -> None:
        super().__init__()
        self.in_dim, self.latent_dim, self.hidden, self.box = in_dim, latent_dim, hidden, box
        self.register_buffer("feat_mean", torch.zeros(in_dim))
        self.register_buffer("feat_std", torch.ones(in_dim))
        self.trunk: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(0.1))  # Identity: linear probe
        self.center = nn.Linear(hidden, latent_dim)
        self.radius = nn.Linear(hidden, latent_dim)
        self.classifier = nn.Linear(latent_dim, n_labels)
        # Start with small boxes: softplus(-3) ~ 0.05.
        nn.init.constant_(self.radius.bias, -3.0)
        nn.init.normal_(self.radius.weight, std=1e-3)

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "latent_dim": self.latent_dim, "hidden": self.hidden, "box": self.box}

    def set_feature_stats(self, feats: torch.Tensor) -> None:
        self.feat_mean.copy_(feats.mean(0))
        self.feat_std.copy_(feats.std(0).clamp_min(1e-6))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.trunk((h - self.feat_mean) / self.feat_std)
        c = self.center(t)
        if not self.box:  # a point embedding (the B0/B1 baselines): zero radius
            return c, torch.zeros_like(c)
        return c, F.softplus(self.radius(t)) + RADIUS_EPS

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(z)


def ood_score(radius: torch.Tensor) -> torch.Tensor:
    """Mean log radius (log-volume / d): how large, i.e. how unsure, the box is."""
    return torch.log(radius.clamp_min(RADIUS_EPS)).mean(dim=-1)
