"""Training the head on frozen-encoder features, calibrating it, and writing a bundle.

Encoder features are computed once per image and cached on disk (models.features), keyed by the
image's digest and the encoder checkpoint's digest, so every head variant and seed reuses them.
Scoring and the test figures are in model_training.measure, the patient-level split in model_training.split.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model_training import metrics
from model_training.measure import measure, probabilities, public, score
from model_training.variants import VARIANTS, Variant
from models import drift, operating_points
from models.boxhead import BoxHead
from models.calibration import BIAS_PRIOR_SD, LOG_T_PRIOR_SD, fit_calibration
from models.digests import bytes_digest
from models.features import FeatureExtractor
from models.labels import LABELS

KL_WEIGHT = 0.01  # weight of the mean per-dimension box KL; see uniform_box_kl
# B5: weight of the shifted copies' own box loss against the originals' 1. At 1 the head spent as
# much of its fit on shifted images as on the unshifted ones it is read on, and lost elementwise
# accuracy to B3 (issue 16). Tuned on phantoms of seeds 101-505 (5 head seeds each): 0.5 gives
# accuracy +0.001, the same macro-AUROC at shift 0 and 1; 0 loses a third of the robustness.
SHIFTED_WEIGHT = 0.5
# Thresholds are fitted on the validation split plus the training split's out-of-fold scores from
# this many patient-level folds (out_of_fold): a rate target needs positives, and 80 validation
# images of 800 phantoms hold 10-15 effusions, on which B5's sensitivity-0.9 point reached 0.49 on
# test (seeds 101-505; 0.23 on the unseen 5557, 6263, 9091). On the pooled images: 0.78 and 0.65.
# The calibration stays on validation alone: fitted on the out-of-fold heads' logits (heads that saw
# four fifths of the data, less sure than the bundle's) it cost B5 accuracy on 7 of those 8 seeds.
THRESHOLD_FOLDS = 5


@dataclass
class FeatureSet:
    x: np.ndarray  # (B, D) pooled encoder features
    y: np.ndarray  # (B, L) 1 / 0, nan = unknown or uncertain
    patients: np.ndarray  # (B,) patient ids, for a patient-level split
    x_shift: np.ndarray | None = None  # (B, D) features of a device-shifted copy, for B5; nan rows = no pair
    text: np.ndarray | None = None  # (B, V) report vectors, for B1's contrastive term
    report_ids: np.ndarray | None = None  # (B,) equal ids = identical reports (not negatives for each other)

    def subset(self, rows: np.ndarray) -> FeatureSet:
        """The rows a boolean mask selects, in every field."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[rows]
        return FeatureSet(self.x[rows], self.y[rows], self.patients[rows], pick(self.x_shift), pick(self.text),
                          pick(self.report_ids))


def _masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    known = ~torch.isnan(y)
    if logits.dim() == 3:
        known = known[:, None].expand_as(logits)
        y = y[:, None].expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits[known], y[known])


def fit_head(fs: FeatureSet, variant: Variant, seed: int, latent_dim: int = 128, epochs: int = 60,
             batch_size: int = 128, k_samples: int = 4, radius_prior: float = 0.1, radius_weight: float = 0.01,
             containment_weight: float = 1.0, contrastive_weight: float = 0.5, contrastive_tau: float = 0.1,
             regulariser: str = "kl", kl_weight: float = KL_WEIGHT, shifted_weight: float = SHIFTED_WEIGHT) -> BoxHead:
    """Train on (in-box samples of) features; uncertain/unknown labels are masked.

    B5 (variant.invariance): rows of fs.x_shift that are not nan are shifted copies; they add
    their own box loss (times shifted_weight) and a term asking the shifted box to contain the
    original's. B1
    (variant.contrastive): a linear projection of fs.text is aligned with the point embedding by
    symmetric InfoNCE; the projection is used in training only and not kept in the head.
    Box regulariser: "kl" (default), kl_weight x the mean per-dimension KL of the box to N(0, 1)
    (see uniform_box_kl); "log_prior", the earlier radius_weight x (log r - log radius_prior)^2,
    which leaves the latent scale free and the box negligible (kept for comparison).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.as_tensor(fs.x)
    y = torch.as_tensor(fs.y, dtype=torch.float32)
    xs = paired = None
    if variant.invariance and fs.x_shift is not None:
        paired = torch.as_tensor(~np.isnan(fs.x_shift).any(axis=1))
        xs = torch.nan_to_num(torch.as_tensor(fs.x_shift))
    head = BoxHead(x.shape[1], latent_dim, variant.hidden or latent_dim, box=variant.box)
    if variant.hidden == 0:  # linear probe: no nonlinearity between features and logits
        head.trunk = torch.nn.Identity()
        head.center = torch.nn.Linear(x.shape[1], latent_dim)
        head.radius = torch.nn.Linear(x.shape[1], latent_dim)
    head.set_feature_stats(torch.cat([x, xs[paired]]) if xs is not None else x)
    params = list(head.parameters())
    text_proj = None
    if variant.contrastive:
        if fs.text is None or fs.report_ids is None or not np.any(fs.text):
            raise ValueError(f"{variant.name} aligns images with reports, but the training set has no report text")
        t_all = torch.as_tensor(fs.text, dtype=torch.float32)
        rid_all = torch.as_tensor(fs.report_ids)
        text_proj = torch.nn.Linear(t_all.shape[1], latent_dim)
        params += list(text_proj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-3)
    if regulariser not in ("kl", "log_prior"):
        raise ValueError(f"regulariser must be 'kl' or 'log_prior', got {regulariser!r}")
    reg = ((lambda c, r: kl_weight * uniform_box_kl(c, r).mean()) if regulariser == "kl" else
           (lambda c, r, lp=float(np.log(radius_prior)): radius_weight * ((torch.log(r) - lp) ** 2).mean()))
    head.train()
    with _single_thread():
        for _ in range(epochs):
            order = rng.permutation(len(x))
            for s in range(0, len(x), batch_size):
                idx = torch.as_tensor(order[s:s + batch_size])
                c, r = head(x[idx])
                loss = _box_loss_cr(head, c, r, y[idx], k_samples, reg)
                if xs is not None and paired is not None and (pm := paired[idx]).any():
                    pi = idx[pm]
                    c2, r2 = head(xs[pi])
                    loss = loss + shifted_weight * _box_loss_cr(head, c2, r2, y[pi], k_samples, reg)
                    c1, r1 = c[pm], r[pm]
                    # The shifted image's box should contain the original's: z2 <= z1 and Z1 <= Z2.
                    contain = F.relu((c2 - r2) - (c1 - r1)) + F.relu((c1 + r1) - (c2 + r2))
                    loss = loss + containment_weight * contain.mean()
                if text_proj is not None and len(idx) > 1:
                    loss = loss + contrastive_weight * _info_nce(c, text_proj(t_all[idx]), rid_all[idx], contrastive_tau)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return head.eval().requires_grad_(False)


@contextlib.contextmanager
def _single_thread():
    """Heads are small: one thread is faster than two fighting over a shared, busy CPU (10-30x here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _info_nce(img: torch.Tensor, txt: torch.Tensor, report_ids: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE; images whose reports are identical are positives, not negatives, of each other."""
    logits = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T / tau
    same = (report_ids[:, None] == report_ids[None, :]).float()
    target = same / same.sum(1, keepdim=True)  # symmetric, so it serves both directions
    return 0.5 * (-(target * F.log_softmax(logits, 1)).sum(1).mean() - (target * F.log_softmax(logits.T, 1)).sum(1).mean())


def uniform_box_kl(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """KL(U[c - r, c + r] || N(0, I)) per dimension, in closed form.

    -log(2r) + log(2 pi) / 2 + (c^2 + r^2 / 3) / 2. The -log(2r) part is the box's log-volume;
    the c^2 part fixes the latent scale, without which a free scale makes any fixed radius
    negligible (the box then changes no logit and BL-TTA and the radius OOD score mean nothing).
    """
    return -torch.log(2 * r) + 0.5 * math.log(2 * math.pi) + 0.5 * (c**2 + r**2 / 3)


def _box_loss_cr(head: BoxHead, c: torch.Tensor, r: torch.Tensor, y: torch.Tensor, k: int, reg: Callable) -> torch.Tensor:
    """Masked BCE over k uniform in-box samples, plus the box regulariser (without it r -> 0)."""
    if not head.box:
        return _masked_bce(head.logits(c), y)
    u = torch.rand(len(c), k, c.shape[1]) * 2 - 1
    return _masked_bce(head.logits(c[:, None] + r[:, None] * u), y) + reg(c, r)


def macro_auroc(y: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Mean AUROC over labels with both classes among known values; and how many were scored."""
    return metrics.macro_auroc(y, p)


def out_of_fold(train: FeatureSet, variant: Variant, seed: int, epochs: int = 60,
                folds: int = THRESHOLD_FOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample logits (B, N, L) of every training image from a head that never saw its patient, and the labels.

    Patients are dealt into `folds` folds at random (seeded); each fold is scored by a head fitted
    the same way on the other folds. They stand in for what the bundle's head gives images it did
    not train on, so thresholds can be fitted on about nine times the validation split's images.
    """
    patients = np.unique(train.patients)
    rng = np.random.default_rng([seed, 31])
    fold_of = dict(zip(rng.permutation(patients), np.arange(len(patients)) % folds))
    fold = np.array([fold_of[p] for p in train.patients])
    logits = np.empty((len(train.x), variant.tta_n, len(LABELS)), np.float32)
    for k in range(folds):
        held = fold == k
        if not held.any():
            continue
        head = fit_head(train.subset(~held), variant, seed, epochs=epochs)
        logits[held] = score(head, train.x[held], variant.tta_n).logits_n
    return logits, train.y


def calibrate(head: BoxHead, variant: Variant, val: FeatureSet, ood_percentile: float = 99.0,
              criteria: dict[str, str] | None = None,
              held_out: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Temperatures and biases, operating points, OOD threshold and validation figures for the model card.

    Calibration (variant.calibrate), on the validation split: per label a temperature with a prior
    around the pooled one and a bias with a prior around 0 (models.calibration.fit_calibration);
    otherwise T = 1, b = 0. Thresholds are chosen after it, on the calibrated probabilities of the
    validation split and of `held_out` (out_of_fold: per-sample logits and labels) when given, by
    each label's criterion (models.operating_points: calibrated p >= 0.5; sensitivity >= 0.90 for
    the urgent findings where those images can carry it; `criteria` overrides per label).
    """
    sc = score(head, val.x, variant.tta_n)
    temperature, bias = (fit_calibration(sc.logits_n, val.y) if variant.calibrate
                         else (np.ones(len(LABELS)), np.zeros(len(LABELS))))
    p = sc.probabilities(temperature, bias)
    fit_p, fit_y = p, val.y
    fitted_on = "validation split, calibrated probabilities"
    if held_out is not None:
        fit_p = np.concatenate([p, probabilities(held_out[0], temperature, bias)])
        fit_y = np.concatenate([val.y, held_out[1]])
        fitted_on = (f"validation split and the training split's {THRESHOLD_FOLDS}-fold out-of-fold scores, "
                     "calibrated probabilities")
    ops = operating_points.fit(fit_p, fit_y, criteria, fitted_on=fitted_on)
    thresholds = np.array([ops["thresholds"][k] for k in LABELS])
    auroc, scored = macro_auroc(val.y, p)
    ood = {"score": "mean log radius of the box", "threshold": float(np.percentile(sc.ood, ood_percentile)),
           "percentile_of_validation": ood_percentile}
    if not variant.box:
        ood["note"] = "no box (point embedding): the radius is zero and the score is constant, so it flags nothing"
    with torch.no_grad():
        radius = head(torch.as_tensor(val.x))[1].mean(1).numpy()
    # the range a site's daily figures are held against (models.drift; the console and the alert rules)
    drift_range = drift.reference(p >= thresholds, sc.ood > ood["threshold"], radius)
    return {
        "temperatures": dict(zip(LABELS, map(float, temperature))),
        "biases": dict(zip(LABELS, map(float, bias))),
        "thresholds": dict(zip(LABELS, map(float, thresholds))),
        "operating_points": ops["operating_points"],
        "ood": ood,
        "tta": {"n": variant.tta_n, "sampler": "scrambled Sobol, antithetic pairs", "seed": 0},
        "validation": {"n_images": int(len(val.x)), "macro_auroc": auroc, "labels_scored": scored,
                       "elementwise_accuracy": metrics.elementwise_accuracy(val.y, p, thresholds),
                       "brier": metrics.brier(val.y, p)},
        "drift": drift_range,
        "variant": variant.name,
        "variant_description": variant.description,
        "variant_config": asdict(variant),
    }


def text_features(train_reports: Sequence[str], max_features: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """TF-IDF (words and bigrams, so "no effusion" differs from "effusion") of the training reports.

    Returns the dense matrix and report ids (equal for identical reports after whitespace and
    case normalisation). Fitted on training reports only.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    norm = [" ".join(r.lower().split()) for r in train_reports]
    if not any(norm):
        return np.zeros((len(norm), 1), np.float32), np.arange(len(norm))
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, max_features=max_features, sublinear_tf=True)
    try:
        m = vec.fit_transform(norm).toarray().astype(np.float32)
    except ValueError:  # too few reports for min_df=2
        m = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(norm).toarray().astype(np.float32)
    _, ids = np.unique(np.array(norm, dtype=object), return_inverse=True)
    return m, ids


def load_encoder(spec: str, checkpoint: Path | None = None) -> tuple[torch.nn.Module, str, str]:
    """(encoder, digest that keys the feature cache, how its weights were obtained, for the card)."""
    from models import encoder as enc

    encoder = enc.build_encoder(spec, seed=0)
    if checkpoint is not None:
        digest = enc.load_checkpoint(encoder, checkpoint)
        return encoder, digest, f"MedSAM2 checkpoint {Path(checkpoint).name} (sha256 {digest})"
    digest = bytes_digest(b"".join(v.numpy().tobytes() for v in enc.encoder_state(encoder).values()))
    return encoder, digest, ("seeded random initialisation (seed 0): the MedSAM2 checkpoint was not available, so "
                             "features are random projections, not MedSAM2's pretrained representation")


def train_bundle(dataset, variant_name: str, seed: int, out: Path, spec: str = "t512", image_size: int | None = None,
                 checkpoint: Path | None = None, cache_dir: Path | None = None, split_seed: int = 0,
                 device: str | None = None, epochs: int = 60, now=None, card: dict | None = None,
                 precision: str = "auto", on_progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Split by patient, extract (cached) features, train one variant, calibrate, measure, write a bundle.

    dataset: a model_training.data.Dataset. The card states how the variant was built and its measured
    test figures (macro-AUROC, elementwise accuracy, Brier, ECE, AUROC at shift 2 and the drop,
    OOD AUROC against the dataset's OOD sets). `card` entries override the defaults (name, ...).
    """
    import datetime as dt

    from model_training import data as data_mod
    from models.bundle import write_bundle
    from models.encoder import SPECS

    if variant_name not in VARIANTS:
        raise ValueError(f"unknown variant {variant_name!r}; choose one of {sorted(VARIANTS)}")
    variant = VARIANTS[variant_name]
    size = int(image_size or SPECS[spec].image_size)
    encoder, digest, weights = load_encoder(spec, checkpoint)
    extract = FeatureExtractor(encoder, size, digest, cache_dir, device=device, precision=precision,
                               on_progress=on_progress)
    items = dataset.items
    y, patients = dataset.labels(), dataset.patients()
    tr, va, te = dataset.split_masks(split_seed)

    def feats(sel, desc, shift_of=None):
        chosen = [it for it, m in zip(items, sel) if m]
        if shift_of is not None:
            chosen = [shift_of(i, it) for i, it in enumerate(chosen)]
        return extract(((it.key, it.load) for it in chosen), len(chosen), desc)

    x_tr, x_va, x_te = feats(tr, "train features"), feats(va, "validation features"), feats(te, "test features")
    x_sh = None
    if variant.invariance:
        lo, hi = data_mod.TRAIN_SHIFT_RANGE
        x_sh = feats(tr, "shifted train features",
                     lambda i, it: it.shifted(float(np.random.default_rng([split_seed, i, 7]).uniform(lo, hi)), salt=i + 1))
    text = rid = None
    if variant.contrastive:
        text, rid = text_features([it.report for it, m in zip(items, tr) if m])
    train = FeatureSet(x_tr, y[tr], patients[tr], x_sh, text, rid)
    head = fit_head(train, variant, seed, epochs=epochs)
    cal = calibrate(head, variant, FeatureSet(x_va, y[va], patients[va]),
                    held_out=out_of_fold(train, variant, seed, epochs=epochs))
    x_te2 = feats(te, "test features at shift 2", lambda i, it: it.shifted(2.0))
    ood = {name: extract(((it.key, it.load) for it in o.items), len(o.items), f"OOD {name} features")
           for name, o in dataset.ood.items() if o.items}
    ood["device_shift_2x"] = x_te2
    figures = public(measure(head, variant, cal, y[te], x_te, {2.0: x_te2}, ood, tta_ns=(1, 8, 64)))
    figures["ood_sets"] = {**{name: o.description for name, o in dataset.ood.items()},
                           "device_shift_2x": "the test images at device-shift intensity 2"}
    synthetic = bool(getattr(dataset, "synthetic", False))
    body = {
        "name": f"MedSAM2-CXR box-latent {variant.name}",
        "version": "0.1.0",
        "manufacturer": "medsam2-cxr",
        "created": (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
        "synthetic_training": synthetic,
        # Confidence tiers are stated only by a bundle validated on real images (models.calibration.tier):
        # a held-out test split of real radiographs counts; phantoms do not.
        "validated_on_real_images": not synthetic,
        "validation_data": (f"held-out test split of {dataset.description}" if not synthetic else
                            "none: measured on synthetic phantoms only, never on real radiographs"),
        "training_data": (f"{dataset.description}; patient-level split (seed {split_seed}): {int(tr.sum())} train, "
                          f"{int(va.sum())} validation, {int(te.sum())} test images"),
        "intended_use": ("Research and integration testing of the medsam2-cxr node. Not for clinical use: not "
                         "validated on patients."),
        "limitations": [f"Encoder weights: {weights}."]
        + (["Trained and measured on synthetic phantom radiographs only; figures mean nothing for patients."]
           if synthetic else []),
        "encoder": {"spec": spec, "image_size": size, "weights": weights, "training_feature_precision": extract.precision,
                    "input": f"{size} px ({'the MedSAM2 resolution' if size == 512 else 'MedSAM2 uses 512'})"},
        **cal,
        "training": build_description(variant, seed, split_seed, epochs, dataset.shift_method),
        "metrics": {"test": figures},
    }
    body.update(card or {})
    return write_bundle(out, body, encoder.cpu(), head, encoder_checkpoint=checkpoint)


def build_description(variant: Variant, seed: int, split_seed: int, epochs: int, shift_method: str) -> dict:
    """Exactly how a variant is built, for its model card and metrics.json."""
    from model_training.data import TRAIN_SHIFT_RANGE

    d = {
        "variant": variant.name, "description": variant.description, "seed": seed, "split_seed": split_seed,
        "features": "frozen encoder vision_features pooled: global mean + 2x2 grid means (5 x channels), standardised",
        "head": ("linear map to a 128-d point, linear classifier" if variant.hidden == 0 else
                 "Linear(in, 256) - GELU - Dropout(0.1) - Linear(256, 128) center"
                 + (" and softplus radius" if variant.box else " (point, radius 0)")
                 + ", linear classifier to 14 logits"),
        "loss": (f"masked BCE over K=4 uniform in-box samples + {KL_WEIGHT} x mean over dimensions of "
                 "KL(U[c - r, c + r] || N(0, 1)) = -log 2r + log(2 pi)/2 + (c^2 + r^2/3)/2" if variant.box
                 else "masked BCE on the point"),
        "optimiser": f"AdamW lr 1e-3 wd 1e-3, batch 128, {epochs} epochs",
        "inference": (f"BL-TTA N={variant.tta_n} (scrambled Sobol, antithetic)" if variant.tta_n > 1
                      else "center point only"),
        "calibration": ("per-label temperature and bias, p = sigmoid(logit / T + b), on validation (grid search, summed "
                        f"BCE plus normal priors: log T around the pooled temperature, sd {LOG_T_PRIOR_SD}; b around 0, "
                        f"sd {BIAS_PRIOR_SD})" if variant.calibrate else "none (T=1, b=0)"),
        "thresholds": ("per label on the calibrated probabilities of the validation split and the training split's "
                       f"{THRESHOLD_FOLDS}-fold patient-level out-of-fold scores: "
                       f"{operating_points.DEFAULT_CRITERION} ({operating_points.describe(operating_points.DEFAULT_CRITERION)}; "
                       "ties towards 0.5), "
                       f"{operating_points.URGENT_CRITERION} ({operating_points.describe(operating_points.URGENT_CRITERION)}) "
                       f"for the urgent findings {', '.join(operating_points.URGENT_LABELS)} where the held-out images "
                       f"have at least {operating_points.MIN_CLASS_COUNT} positives and rank them above chance "
                       f"(one-sided p < {operating_points.CHANCE_P}); else {operating_points.DEFAULT_CRITERION}, and the "
                       "card's not_estimable says which and why"),
    }
    if variant.invariance:
        d["invariance"] = (f"one shifted copy per training image, intensity uniform in {list(TRAIN_SHIFT_RANGE)} "
                           f"({shift_method}); its own box loss at weight {SHIFTED_WEIGHT} plus 1.0 x containment hinge "
                           "relu(z_shift - z) + relu(Z - Z_shift) asking the shifted box to contain the original")
    if variant.contrastive:
        d["contrastive"] = ("report TF-IDF (1-2 grams, min_df 2, 2048 terms, fitted on training reports) -> "
                            "Linear(V, 128); symmetric InfoNCE with the L2-normalised point, tau 0.1, weight 0.5; "
                            "identical reports are positives of each other; the text projection is not kept")
    return d
