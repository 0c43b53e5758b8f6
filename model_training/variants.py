"""The ablation variants B0-B5 of ../shared/docs/method.md: what each head is and how it is built."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    box: bool = True
    hidden: int = 256
    tta_n: int = 8
    invariance: bool = False
    calibrate: bool = False
    contrastive: bool = False  # image-report InfoNCE on the point embedding (B1)


VARIANTS: dict[str, Variant] = {
    "B0": Variant("B0", "linear probe on the point embedding (no box, no BL-TTA, no calibration)", box=False, hidden=0, tta_n=1),
    "B1": Variant("B1", "Merlin-style: point embedding (one hidden layer), multi-label BCE head plus image-report "
                        "contrastive alignment (symmetric InfoNCE between the embedding and a linear projection of the "
                        "report's TF-IDF vector, used in training only); no box, no BL-TTA, no calibration",
                  box=False, tta_n=1, contrastive=True),
    "B3": Variant("B3", "box head trained with in-box sampling; center only at inference", tta_n=1),
    "B4": Variant("B4", "box head + BL-TTA (N=8)"),
    "B5": Variant("B5", "box head + BL-TTA (N=8) + device-invariant training (pixel shifts and a box "
                        "containment term) + per-label temperature and bias calibration", invariance=True, calibrate=True),
}
