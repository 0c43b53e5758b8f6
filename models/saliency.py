"""Grad-CAM on the last encoder level for a finding's logit.

The head sits on pooled features, so the gradient only runs through the head and the pooling,
never back through the encoder: saliency costs microseconds per finding, and is computed only for
the findings a reader is shown.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grad_cam(vision_features: torch.Tensor, logits: torch.Tensor, targets: list[list[int]]) -> list[dict[int, torch.Tensor]]:
    """vision_features (B, C, h, w) with requires_grad; logits (B, L) computed from them.

    Returns per image {label index: map (h, w) in [0, 1]}.
    """
    out: list[dict[int, torch.Tensor]] = []
    for b, labels in enumerate(targets):
        maps: dict[int, torch.Tensor] = {}
        for k in labels:
            (g,) = torch.autograd.grad(logits[b, k], vision_features, retain_graph=True)
            w = g[b].mean(dim=(1, 2))
            cam = F.relu((w[:, None, None] * vision_features[b].detach()).sum(0))
            # Min-max, not /max: a map that is high everywhere says nothing about where to look.
            lo, hi = cam.min(), cam.max()
            maps[k] = (cam - lo) / (hi - lo) if hi > lo else torch.zeros_like(cam)
        out.append(maps)
    return out
