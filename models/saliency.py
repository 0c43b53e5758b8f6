"""Grad-CAM on the last encoder level for a finding's logit.

The head sits on pooled features, so the gradient only runs through the head and the pooling,
never back through the encoder: saliency costs microseconds per finding, and is computed only for
the findings a reader is shown.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F


def grad_cam(vision_features: torch.Tensor, logits: torch.Tensor, targets: list[list[int]]) -> list[dict[int, torch.Tensor]]:
    """vision_features (B, C, h, w) with requires_grad; logits (B, L) computed from them.

    Returns per image {label index: map (h, w) in [0, 1]}.
    """
    # Images do not interact in the head, so the j-th shown finding of every image can share one
    # backward pass: len(targets[b]) passes in all instead of one per (image, finding).
    out: list[dict[int, torch.Tensor]] = [{} for _ in targets]
    for j in range(max((len(t) for t in targets), default=0)):
        rows = [b for b, t in enumerate(targets) if len(t) > j]
        (g,) = torch.autograd.grad(cast(torch.Tensor, sum(logits[b, targets[b][j]] for b in rows)), vision_features, retain_graph=True)
        for b in rows:
            w = g[b].mean(dim=(1, 2))
            cam = F.relu((w[:, None, None] * vision_features[b].detach()).sum(0))
            # Min-max, not /max: a map that is high everywhere says nothing about where to look.
            lo, hi = cam.min(), cam.max()
            out[b][targets[b][j]] = (cam - lo) / (hi - lo) if hi > lo else torch.zeros_like(cam)
    return out
