"""What the model says about one image: the contract between models/, worker/ and dicom_node/.

Plain dataclasses with no torch inside, so encoders and senders can be tested without a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TIERS = ("high", "medium", "low")


@dataclass(frozen=True)
class Finding:
    """One CheXpert label for one image, after BL-TTA and calibration."""

    label: str
    probability: float  # calibrated P(label present)
    threshold: float  # decision threshold from the model card
    tier: str  # "high" | "medium" | "low": how far from the threshold and how stable across TTA samples
    spread: float  # standard deviation of the probability over the N BL-TTA samples

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass(frozen=True)
class Prediction:
    """Findings for one image plus how foreign the image looks to the model."""

    findings: tuple[Finding, ...]
    ood_score: float  # mean log radius of the box: larger = less familiar
    ood_threshold: float  # from the model card (a high percentile of in-distribution scores)
    center: np.ndarray = field(repr=False)  # box center c, shape (d,)
    radius: np.ndarray = field(repr=False)  # box radius r, shape (d,)
    # label -> saliency map in [0, 1], shape (h, w) on the model grid; only for shown findings
    saliency: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def out_of_distribution(self) -> bool:
        return self.ood_score > self.ood_threshold

    def top(self, k: int = 3) -> list[Finding]:
        """The k most probable findings other than "No Finding", most probable first."""
        abnormal = [f for f in self.findings if f.label != "No Finding"]
        return sorted(abnormal, key=lambda f: f.probability, reverse=True)[:k]

    def to_json(self) -> dict:
        return {
            "findings": [
                {
                    "label": f.label,
                    "probability": round(f.probability, 4),
                    "threshold": round(f.threshold, 4),
                    "present": f.present,
                    "tier": f.tier,
                    "spread": round(f.spread, 4),
                }
                for f in self.findings
            ],
            "ood_score": round(self.ood_score, 4),
            "ood_threshold": round(self.ood_threshold, 4),
            "out_of_distribution": self.out_of_distribution,
        }


@dataclass(frozen=True)
class ModelIdentity:
    """What a result must say about the model that made it (from the bundle's model card)."""

    name: str
    version: str
    digest: str  # sha256 of the bundle, hex
    manufacturer: str
    synthetic_training: bool  # True while the bundle was trained on phantoms only
    training_data: str
    intended_use: str

    @property
    def short_digest(self) -> str:
        return self.digest[:12]
