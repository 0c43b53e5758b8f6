"""What the model says about one image: the contract between models/, worker/ and dicom_node/.

Plain dataclasses with no torch inside, so encoders and senders can be tested without a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

TIERS = ("high", "medium", "low")
# The tier of every finding that would be medium or high from a bundle not validated on real
# images (a phantom-trained one): its confidence cannot be stated (models.calibration.tier).
NOT_VALIDATED = "not validated"
ALL_TIERS = (*TIERS, NOT_VALIDATED)


@dataclass(frozen=True)
class Finding:
    """One CheXpert label for one image, after BL-TTA and calibration."""

    label: str
    probability: float  # calibrated P(label present)
    threshold: float  # decision threshold from the model card
    tier: str  # ALL_TIERS: how far from the threshold and how stable across TTA samples, or "not validated"
    spread: float  # standard deviation of the probability over the N BL-TTA samples
    operating_point: str = ""  # the criterion that chose the threshold (models.operating_points spec)

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
                    "operating_point": f.operating_point,
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

    @classmethod
    def from_json(cls, data: Mapping, center: np.ndarray | None = None, radius: np.ndarray | None = None,
                  saliency: Mapping[str, np.ndarray] | None = None) -> Prediction:
        """The reverse of :meth:`to_json` ("present" and "out_of_distribution" follow from the values).

        to_json leaves out the box and the saliency maps: pass them, or keep the box in ``data``
        under "center" and "radius" (as the spool's prediction.json does, worker.pipeline).

        Raises
        ------
        KeyError
            ``data`` lacks a field to_json writes, or the box.
        """
        findings = tuple(Finding(label=f["label"], probability=f["probability"], threshold=f["threshold"],
                                 tier=f["tier"], spread=f["spread"], operating_point=f.get("operating_point", ""))
                         for f in data["findings"])
        return cls(findings=findings, ood_score=data["ood_score"], ood_threshold=data["ood_threshold"],
                   center=np.array(data["center"] if center is None else center),
                   radius=np.array(data["radius"] if radius is None else radius),
                   saliency=dict(saliency or {}))


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
    # The site's configured operating points ("label=spec;..."), "" when the bundle's own apply.
    operating_points: str = ""

    @property
    def short_digest(self) -> str:
        return self.digest[:12]
