"""Batch prediction: images -> encoder -> box -> BL-TTA -> calibration -> tiers, OOD, saliency.

Takes a batch of preprocessed images (float [0, 1], any size) and returns one Prediction each.
The device is chosen when the Predictor is built, which a worker does lazily after any fork.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models import encoder as enc
from models.boxhead import ood_score, pool_features
from models.bundle import Bundle
from models.calibration import calibrated, tier
from models.labels import LABELS
from models.prediction import Finding, Prediction
from models.saliency import grad_cam
from models.tta import bl_tta

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
NO_FINDING = LABELS.index("No Finding")


def to_input(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """MedSAM2 preprocessing: gray [0,1] -> resize to size x size -> 3 channels -> ImageNet norm.

    Images already at size x size are not resized: a GPU worker's decode processes resize with
    models.preprocess.resize_for_model (Pillow, no torch in those processes), which gives this
    torch resize's numbers to within float rounding (tests/unit/test_preprocess.py)."""
    batch = []
    for img in images:
        t = torch.as_tensor(np.ascontiguousarray(img), dtype=torch.float32)[None, None]
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        batch.append(t)
    x = torch.cat(batch).clamp(0, 1).expand(-1, 3, -1, -1)
    return (x - _MEAN) / _STD


class Predictor:
    def __init__(self, bundle: Bundle, device: str | None = None) -> None:
        self.bundle = bundle
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = enc.place(bundle.encoder, self.device)
        self.precision = enc.resolve_precision("auto", self.device)
        self.head = bundle.head.to(self.device)
        self.samples = bundle.samples.to(self.device)
        self.temperature = bundle.temperature.to(self.device)
        self.bias = bundle.bias.to(self.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder forward (models.encoder.forward, as for training and the index); vision_features
        (B, C, h, w) in float32."""
        return enc.forward(self.encoder, x, self.device, self.precision)

    def predict(self, images: Sequence[np.ndarray], saliency_top: int = 3) -> list[Prediction]:
        """Findings, box, OOD score and saliency for a batch of decoded images (any size, or
        already resized by resize_for_model)."""
        if not images:
            return []
        x = to_input(images, self.bundle.image_size)
        vf = self.encode(x).requires_grad_(True)
        with torch.enable_grad():
            c, r = self.head(pool_features(vf))
            probs_n = bl_tta(self.head, c, r, self.samples, self.temperature, self.bias)  # (B, N, L)
            p = probs_n.mean(1).detach().cpu().numpy()
            spread = probs_n.std(1, unbiased=False).detach().cpu().numpy()
            thr = self.bundle.thresholds
            targets = [self._shown(p[b], thr, saliency_top) for b in range(len(images))]
            center_logits = calibrated(self.head.logits(c), self.temperature, self.bias)
            maps = grad_cam(vf, center_logits, targets) if saliency_top > 0 else [{} for _ in images]
        scores = ood_score(r).detach().cpu().numpy()
        ops = self.bundle.operating_points or ("",) * len(LABELS)
        out = []
        for b in range(len(images)):
            # Outside the model's experience no finding is stated with more than low confidence.
            # A bundle not validated on real images states no medium or high tier (calibration.tier).
            foreign = bool(scores[b] > self.bundle.ood_threshold)
            findings = tuple(
                Finding(label=LABELS[k], probability=float(p[b, k]), threshold=float(thr[k]),
                        tier="low" if foreign else tier(float(p[b, k]), float(thr[k]), float(spread[b, k]),
                                                        validated=self.bundle.validated),
                        spread=float(spread[b, k]), operating_point=ops[k])
                for k in range(len(LABELS))
            )
            out.append(Prediction(
                findings=findings, ood_score=float(scores[b]), ood_threshold=self.bundle.ood_threshold,
                center=c[b].detach().cpu().numpy(), radius=r[b].detach().cpu().numpy(),
                saliency={LABELS[k]: m.cpu().numpy() for k, m in maps[b].items()},
            ))
        return out

    @staticmethod
    def _shown(p: np.ndarray, thr: np.ndarray, top: int) -> list[int]:
        """Findings a reader sees on the SC: those present, most probable first, else the top one."""
        order = [k for k in np.argsort(-p) if k != NO_FINDING]
        present = [k for k in order if p[k] >= thr[k]]
        return (present or order[:1])[:top]
