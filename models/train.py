"""Training the head on frozen-encoder features, calibrating it, and writing a bundle.

Encoder features are computed once per image and cached on disk, keyed by the image's digest and
the encoder checkpoint's digest, so every head variant and seed reuses them.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from models.boxhead import BoxHead, ood_score, pool_features
from models.calibration import fit_temperature, fit_thresholds
from models.labels import LABELS
from models.predictor import to_input
from models.preprocess import read_image
from models.tta import box_samples, bl_tta


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    box: bool = True
    hidden: int = 256
    tta_n: int = 8
    invariance: bool = False
    calibrate: bool = False


VARIANTS: dict[str, Variant] = {
    "B0": Variant("B0", "linear probe on the point embedding (no box, no BL-TTA, no calibration)", box=False, hidden=0, tta_n=1),
    "B3": Variant("B3", "box head trained with in-box sampling; center only at inference", tta_n=1),
    "B4": Variant("B4", "box head + BL-TTA (N=8)"),
    "B5": Variant("B5", "box head + BL-TTA (N=8) + device-invariant training (pixel shifts and a box "
                        "containment term) + per-label temperature calibration", invariance=True, calibrate=True),
}


@dataclass
class FeatureSet:
    x: np.ndarray  # (B, D) pooled encoder features
    y: np.ndarray  # (B, L) 1 / 0, nan = unknown or uncertain
    patients: np.ndarray  # (B,) patient ids, for a patient-level split
    x_shift: np.ndarray | None = None  # (B, D) features of a device-shifted copy, for B5


class FeatureExtractor:
    """Encoder forward in batches with an on-disk cache per (encoder digest, image digest)."""

    def __init__(self, encoder: torch.nn.Module, image_size: int, encoder_digest: str, cache_dir: Path | None,
                 batch_size: int = 8) -> None:
        self.encoder, self.size, self.batch = encoder, image_size, batch_size
        self.cache = Path(cache_dir) / encoder_digest[:16] if cache_dir else None
        if self.cache:
            self.cache.mkdir(parents=True, exist_ok=True)

    def __call__(self, items: Iterable[tuple[str, Callable[[], np.ndarray]]], total: int, desc: str) -> np.ndarray:
        """items: (image digest, loader) pairs; loaders run only on a cache miss."""
        out: list[np.ndarray] = []
        pending: list[tuple[int, str, np.ndarray]] = []

        def flush() -> None:
            x = to_input([img for _, _, img in pending], self.size)
            with torch.no_grad():
                f = pool_features(self.encoder(x)["vision_features"]).numpy()
            for (i, key, _), row in zip(pending, f):
                out[i] = row
                if self.cache:
                    np.save(self.cache / f"{key}.npy", row.astype(np.float16))
            pending.clear()

        for i, (key, load) in enumerate(tqdm(items, total=total, desc=desc, unit="img")):
            hit = self.cache / f"{key}.npy" if self.cache else None
            if hit is not None and hit.exists():
                out.append(np.load(hit).astype(np.float32))
                continue
            out.append(None)  # type: ignore[arg-type]
            pending.append((i, key, load()))
            if len(pending) == self.batch:
                flush()
        if pending:
            flush()
        return np.stack(out).astype(np.float32)


def read_manifest(path: Path) -> list[dict]:
    """Rows of a manifest CSV: path (relative to the manifest), patient_id, the 14 labels, report."""
    path = Path(path)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = [c for c in ("path", "patient_id", *LABELS) if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: not a manifest (empty, or missing columns {missing})")
    return rows


def labels_of(row: dict) -> np.ndarray:
    """1 / 0; uncertain (-1) and blank become nan, i.e. masked in training and metrics."""
    def one(v: str) -> float:
        v = (v or "").strip()
        return float(v) if v in ("0", "1", "0.0", "1.0") else np.nan
    return np.array([one(row[k]) for k in LABELS], dtype=np.float64)


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split_patients(patients: np.ndarray, seed: int, fractions=(0.8, 0.1, 0.1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks (train, val, test), patient-level: one patient's studies never straddle splits."""
    uniq = np.unique(patients)
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    a = int(round(fractions[0] * len(uniq)))
    b = a + int(round(fractions[1] * len(uniq)))
    tr, va = set(uniq[:a]), set(uniq[a:b])
    m_tr = np.array([p in tr for p in patients])
    m_va = np.array([p in va for p in patients])
    return m_tr, m_va, ~(m_tr | m_va)


def _masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(y)
    if logits.dim() == 3:
        known = known[:, None].expand_as(logits)
        y = y[:, None].expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits[known], y[known])


def fit_head(fs: FeatureSet, variant: Variant, seed: int, latent_dim: int = 128, epochs: int = 60,
             batch_size: int = 128, k_samples: int = 4, radius_prior: float = 0.1, radius_weight: float = 0.01,
             containment_weight: float = 1.0) -> BoxHead:
    """Train on (in-box samples of) features; uncertain/unknown labels are masked."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(fs.x)
    y = torch.as_tensor(fs.y, dtype=torch.float32)
    xs = torch.as_tensor(fs.x_shift) if variant.invariance and fs.x_shift is not None else None
    head = BoxHead(x.shape[1], latent_dim, variant.hidden or latent_dim, box=variant.box)
    if variant.hidden == 0:  # linear probe: no nonlinearity between features and logits
        head.trunk = torch.nn.Identity()
        head.center = torch.nn.Linear(x.shape[1], latent_dim)
        head.radius = torch.nn.Linear(x.shape[1], latent_dim)
    head.set_feature_stats(torch.cat([x, xs]) if xs is not None else x)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-3)
    log_prior = float(np.log(radius_prior))
    head.train()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for s in range(0, len(x), batch_size):
            idx = torch.as_tensor(order[s:s + batch_size])
            loss = _box_loss(head, x[idx], y[idx], k_samples, log_prior, radius_weight)
            if xs is not None:
                loss = loss + _box_loss(head, xs[idx], y[idx], k_samples, log_prior, radius_weight)
                c1, r1 = head(x[idx])
                c2, r2 = head(xs[idx])
                # The shifted image's box should contain the original's: z2 <= z1 and Z1 <= Z2.
                contain = F.relu((c2 - r2) - (c1 - r1)) + F.relu((c1 + r1) - (c2 + r2))
                loss = loss + containment_weight * contain.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head.eval().requires_grad_(False)


def _box_loss(head: BoxHead, x: torch.Tensor, y: torch.Tensor, k: int, log_prior: float, weight: float) -> torch.Tensor:
    c, r = head(x)
    if not head.box:
        return _masked_bce(head.logits(c), y)
    u = torch.rand(len(x), k, c.shape[1]) * 2 - 1
    loss = _masked_bce(head.logits(c[:, None] + r[:, None] * u), y)
    return loss + weight * ((torch.log(r) - log_prior) ** 2).mean()


@dataclass
class Scores:
    logits_n: np.ndarray  # (B, N, L) per-sample logits before temperature
    ood: np.ndarray  # (B,)

    def probabilities(self, temperature: np.ndarray) -> np.ndarray:
        return (1 / (1 + np.exp(-self.logits_n / temperature))).mean(1)


def score(head: BoxHead, x: np.ndarray, n: int, seed: int = 0) -> Scores:
    samples = box_samples(n, head.latent_dim, seed)
    with torch.no_grad():
        c, r = head(torch.as_tensor(x))
        z = c[:, None] + r[:, None] * samples[None]
        logits = head.logits(z).numpy()
    return Scores(logits_n=logits, ood=ood_score(r).numpy())


def macro_auroc(y: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Mean AUROC over labels with both classes among known values; and how many were scored."""
    aucs = []
    for k in range(y.shape[1]):
        known = ~np.isnan(y[:, k])
        if known.sum() and len(np.unique(y[known, k])) == 2:
            aucs.append(roc_auc_score(y[known, k], p[known, k]))
    return (float(np.mean(aucs)) if aucs else float("nan")), len(aucs)


def calibrate(head: BoxHead, variant: Variant, val: FeatureSet, ood_percentile: float = 99.0) -> dict:
    """Temperatures, thresholds, OOD threshold and validation figures for the model card."""
    sc = score(head, val.x, variant.tta_n)
    temperature = fit_temperature(sc.logits_n, val.y) if variant.calibrate else np.ones(len(LABELS))
    p = sc.probabilities(temperature)
    thresholds = fit_thresholds(p, val.y)
    auroc, scored = macro_auroc(val.y, p)
    known = ~np.isnan(val.y)
    acc = float(((p >= thresholds) == (val.y == 1))[known].mean())
    brier = float(np.nanmean(np.where(known, (p - np.nan_to_num(val.y)) ** 2, np.nan), axis=0).mean())
    return {
        "temperatures": dict(zip(LABELS, map(float, temperature))),
        "thresholds": dict(zip(LABELS, map(float, thresholds))),
        "ood": {"score": "mean log radius of the box", "threshold": float(np.percentile(sc.ood, ood_percentile)),
                "percentile_of_validation": ood_percentile},
        "tta": {"n": variant.tta_n, "sampler": "scrambled Sobol, antithetic pairs", "seed": 0},
        "validation": {"n_images": int(len(val.x)), "macro_auroc": auroc, "labels_scored": scored,
                       "elementwise_accuracy": acc, "brier": brier},
        "variant": variant.name,
        "variant_description": variant.description,
        "variant_config": asdict(variant),
    }


def dicom_loader(path: Path) -> tuple[str, Callable[[], np.ndarray]]:
    data = Path(path).read_bytes()
    return image_digest(data), lambda: read_image(pydicom.dcmread(path))
