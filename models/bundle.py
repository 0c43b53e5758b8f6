"""A model bundle: encoder checkpoint + head weights + a model card, verified by digest on load.

A worker loads a bundle, never loose weights: the card says what the model is, what it was
trained on and how sure to be of it, and its digest goes into every result's UIDs and SR.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models import encoder as enc
from models import operating_points as op
from models.boxhead import BoxHead
from models.digests import file_digest
from models.labels import LABELS
from models.prediction import ModelIdentity
from models.tta import box_samples

CARD = "model_card.json"
HEAD = "head.safetensors"
ENCODER = "encoder.pt"


class BundleError(ValueError):
    """A bundle that is missing, altered or does not fit this code."""


def card_digest(card: dict) -> str:
    body = {k: v for k, v in card.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_bundle(root: Path, card: dict, encoder: nn.Module, head: BoxHead, encoder_checkpoint: Path | None = None) -> dict:
    """Write weights and card; the card gains file digests and its own digest. Returns the card.

    encoder_checkpoint: an existing MedSAM2 checkpoint to copy instead of the encoder's weights.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if encoder_checkpoint is not None:
        (root / ENCODER).write_bytes(Path(encoder_checkpoint).read_bytes())
        ckpt_digest = file_digest(root / ENCODER)
    else:
        ckpt_digest = enc.save_checkpoint(encoder, root / ENCODER)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(root / HEAD))
    card = dict(card)
    card["labels"] = list(LABELS)
    card["encoder"] = {**card.get("encoder", {}), "checkpoint": ENCODER, "checkpoint_digest": ckpt_digest}
    card["head"] = {**head.config(), "file": HEAD, "digest": file_digest(root / HEAD)}
    card["digest"] = card_digest(card)
    tmp = root / (CARD + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    tmp.replace(root / CARD)
    return card


@dataclass
class Bundle:
    root: Path
    card: dict
    encoder: nn.Module
    head: BoxHead
    temperature: torch.Tensor  # (L,)
    bias: torch.Tensor  # (L,) added to logit / temperature (models.calibration)
    thresholds: np.ndarray  # (L,)
    samples: torch.Tensor  # (N, d) BL-TTA points
    ood_threshold: float
    operating_points: tuple[str, ...] = ()  # (L,) the criterion behind each threshold
    overrides: tuple[tuple[str, str], ...] = ()  # the site's configured operating points, applied

    @property
    def validated(self) -> bool:
        """Whether confidence tiers may be stated: the card says the bundle was validated on real
        images and it was not trained on synthetic data only. A card that does not say: no."""
        c = self.card
        return bool(c.get("validated_on_real_images", False)) and not bool(c.get("synthetic_training", True))

    @property
    def digest(self) -> str:
        return self.card["digest"]

    @property
    def image_size(self) -> int:
        return int(self.card["encoder"]["image_size"])

    def identity(self) -> ModelIdentity:
        c = self.card
        return ModelIdentity(
            name=c["name"], version=c["version"], digest=c["digest"], manufacturer=c.get("manufacturer", "medsam2-cxr"),
            synthetic_training=bool(c["synthetic_training"]), training_data=c["training_data"],
            intended_use=c["intended_use"],
            operating_points=";".join(f"{k}={v}" for k, v in self.overrides),
        )


def read_card(root: Path) -> dict:
    path = Path(root) / CARD
    if not path.exists():
        raise BundleError(f"{path}: no model card; build a bundle with `medsam2-cxr train` or `medsam2-cxr up`")
    card = json.loads(path.read_text())
    if card.get("digest") != card_digest(card):
        raise BundleError(f"{path}: the card's digest does not match its content; the bundle was altered")
    return card


def load_bundle(root: Path, operating_points: Mapping[str, str] | None = None) -> Bundle:
    """Load and verify every file against the card. Raises BundleError on any mismatch.

    operating_points: a site's per-label criteria (label or "*" -> spec, models.operating_points),
    applied from the card's validation ROC points without refitting; BundleError when one cannot be.
    """
    root = Path(root)
    card = read_card(root)
    try:
        thresholds, criteria = op.apply(card, operating_points)
    except ValueError as exc:
        raise BundleError(f"{root / CARD}: {exc}") from exc
    if tuple(card["labels"]) != LABELS:
        raise BundleError(f"{root / CARD}: labels {card['labels']} differ from this code's {list(LABELS)}")
    for key in ("encoder", "head"):
        f = root / card[key]["checkpoint" if key == "encoder" else "file"]
        want = card[key]["checkpoint_digest" if key == "encoder" else "digest"]
        if not f.exists() or file_digest(f) != want:
            raise BundleError(f"{f}: missing or its sha256 differs from the model card; rebuild the bundle")
    encoder = enc.build_encoder(card["encoder"]["spec"])
    enc.load_checkpoint(encoder, root / card["encoder"]["checkpoint"])
    h = card["head"]
    head = BoxHead(h["in_dim"], h["latent_dim"], h["hidden"], box=h["box"])
    head.load_state_dict(load_file(str(root / h["file"])), strict=True)
    head.eval().requires_grad_(False)
    tta = card["tta"]
    return Bundle(
        root=root, card=card, encoder=encoder, head=head,
        temperature=torch.tensor([card["temperatures"][k] for k in LABELS], dtype=torch.float32),
        # a card from before issue 16 has temperatures only: its bias is 0, as it was fitted
        bias=torch.tensor([card.get("biases", {}).get(k, 0.0) for k in LABELS], dtype=torch.float32),
        thresholds=np.array([thresholds[k] for k in LABELS], dtype=np.float64),
        samples=box_samples(tta["n"], h["latent_dim"], tta["seed"]),
        ood_threshold=float(card["ood"]["threshold"]),
        operating_points=tuple(criteria[k] for k in LABELS),
        overrides=tuple(sorted((k, str(op.Criterion.parse(v))) for k, v in (operating_points or {}).items())),
    )
