"""The bundle a fresh node uses until a site configures real weights: honest about what it is.

It is the B5 variant (box + BL-TTA + device-invariant training + temperature calibration)
trained on synthetic phantom radiographs the project generates, on the MedSAM2 graph whose
weights are MedSAM2's when a checkpoint is given and a seeded random initialisation otherwise;
the model card and every result say which. Its card carries the figures measured on its own
held-out phantoms: macro-AUROC, elementwise accuracy, Brier, ECE, the AUROC drop at twice the
strongest training shift, OOD AUROC of the radius against phantom lateral and non-chest views, and
per label the operating point (models.operating_points) with test sensitivity, specificity and PPV.
Its card says `validated_on_real_images: false`, so its results state no medium or high tier.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from model_training.data import phantom_dataset
from model_training.train import train_bundle


def build_default_bundle(out: Path, n: int = 400, seed: int = 0, spec: str = "t512", checkpoint: Path | None = None,
                         cache_dir: Path | None = None, render_size: int = 512, now: dt.datetime | None = None,
                         image_size: int | None = None, device: str | None = None, on_progress=None) -> dict:
    """Generate n phantoms (+ n/10 of each OOD kind), train B5 on frozen features, measure, write.

    on_progress: (stage, done, total) as encoder features are computed (worker.model_build)."""
    data = phantom_dataset(n, seed, render_size, n_ood=max(4, n // 10))
    card = {
        "name": "MedSAM2-CXR box-latent (phantom-trained default)",
        "intended_use": ("Integration testing and demonstration of the medsam2-cxr node only. Not for clinical "
                         "use: trained on synthetic phantoms, not validated on patients."),
    }
    written = train_bundle(data, "B5", seed, out, spec=spec, image_size=image_size, checkpoint=checkpoint,
                           cache_dir=cache_dir, split_seed=seed, device=device, now=now, card=card,
                           on_progress=on_progress)
    return written
