"""Scoring a trained head and its test figures, as ../shared/docs/method.md defines them.

Per-sample logits for BL-TTA (score), the closed-form limit and the BL-TTA gap, the OOD score of
a point embedding, and `measure`: every figure of one head on a test split for the model card and
the evaluation report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model_training import metrics
from model_training.variants import Variant
from models import operating_points
from models.boxhead import BoxHead, ood_score
from models.calibration import calibrated
from models.labels import LABELS
from models.tta import box_samples, linear_limit


def probabilities(logits_n: np.ndarray, temperature: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """BL-TTA probabilities (B, L): the mean over samples of the calibrated per-sample probabilities."""
    return (1 / (1 + np.exp(-calibrated(logits_n, temperature, bias)))).mean(1)


@dataclass
class Scores:
    logits_n: np.ndarray  # (B, N, L) per-sample logits before calibration
    ood: np.ndarray  # (B,)

    def probabilities(self, temperature: np.ndarray, bias: np.ndarray) -> np.ndarray:
        return probabilities(self.logits_n, temperature, bias)


def score(head: BoxHead, x: np.ndarray, n: int, seed: int = 0) -> Scores:
    samples = box_samples(n, head.latent_dim, seed)
    with torch.no_grad():
        c, r = head(torch.as_tensor(x))
        z = c[:, None] + r[:, None] * samples[None]
        logits = head.logits(z).numpy()
    return Scores(logits_n=logits, ood=ood_score(r).numpy())


def closed_form_probabilities(head: BoxHead, x: np.ndarray, temperature: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The N -> infinity BL-TTA limit for the head's linear classifier (probit approximation)."""
    t = torch.as_tensor(np.asarray(temperature), dtype=torch.float32)
    with torch.no_grad():
        c, r = head(torch.as_tensor(x))
        w = head.classifier.weight / t[:, None]
        b = calibrated(head.classifier.bias, t, torch.as_tensor(np.asarray(bias), dtype=torch.float32))
        return linear_limit(w, b, c, r).numpy()


def tta_gap(head: BoxHead, x: np.ndarray, y: np.ndarray, temperature: np.ndarray, bias: np.ndarray,
            ns: Sequence[int] = (1, 8, 64),
            reference_n: int = 4096, chunk: int = 32) -> dict[str, dict]:
    """How far the N-sample BL-TTA estimate is from its limit, and what N does to the figures.

    gap_to_closed_form: mean |p_N - closed form| over test cells; gap_to_reference: the same
    against a 4096-sample estimate (the closed form is itself an approximation, to about 0.01).
    """
    ref = np.concatenate([score(head, x[i:i + chunk], reference_n).probabilities(temperature, bias)
                          for i in range(0, len(x), chunk)]) if len(x) else np.zeros((0, len(LABELS)))
    limit = closed_form_probabilities(head, x, temperature, bias)
    out = {}
    for n in ns:
        p = score(head, x, n).probabilities(temperature, bias)
        out[str(n)] = {"macro_auroc": metrics.macro_auroc(y, p)[0], "brier": metrics.brier(y, p),
                       "gap_to_closed_form": float(np.abs(p - limit).mean()),
                       "gap_to_reference": float(np.abs(p - ref).mean())}
    return out


def predictive_entropy(p: np.ndarray) -> np.ndarray:
    """Mean binary entropy over labels: the OOD score of a point embedding, which has no radius."""
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return (-(q * np.log(q) + (1 - q) * np.log(1 - q))).mean(1)


def measure(head: BoxHead, variant: Variant, cal: dict, y: np.ndarray, x: np.ndarray,
            shifted: dict[float, np.ndarray] | None = None, ood: dict[str, np.ndarray] | None = None,
            tta_ns: Sequence[int] = ()) -> dict:
    """Test figures of one trained head, as ../shared/docs/method.md defines them.

    x: test features; shifted: intensity -> features of the same test images shifted; ood: set
    name -> features. Keys starting with "_" hold arrays for plots, not for JSON.
    """
    temps = np.array([cal["temperatures"][k] for k in LABELS])
    bias = np.array([cal["biases"][k] for k in LABELS])
    thr = np.array([cal["thresholds"][k] for k in LABELS])
    sc = score(head, x, variant.tta_n)
    p = sc.probabilities(temps, bias)
    auroc, scored = metrics.macro_auroc(y, p)
    out: dict = {
        "n_test": int(len(x)), "macro_auroc": auroc, "labels_scored": scored,
        "per_label_auroc": metrics.per_label_auroc(y, p),
        "elementwise_accuracy": metrics.elementwise_accuracy(y, p, thr),
        "elementwise_accuracy_at_0.5": metrics.elementwise_accuracy(y, p, 0.5),
        # where the accuracy is won or lost: the urgent labels' high-sensitivity points against the rest
        **accuracy_by_group(y, p, thr),
        "operating_points": {k: {"criterion": cal.get("operating_points", {}).get("criteria", {}).get(k, "bundle threshold"),
                                 "threshold": float(thr[i]), **operating_points.confusion(y[:, i], p[:, i], thr[i])}
                             for i, k in enumerate(LABELS)},
        "brier": metrics.brier(y, p), "ece": metrics.ece(y, p),
        # share of test images called positive at the calibrated thresholds: what a site's own
        # positive rates are held against (the console's today page)
        "positive_rate": {k: float((p[:, i] >= thr[i]).mean()) for i, k in enumerate(LABELS)} if len(x) else {},
        "ood_score": "mean log radius of the box" if variant.box else "mean predictive entropy (no box)",
        "_p": p,
    }

    def ood_of(feats: np.ndarray) -> np.ndarray:
        s = score(head, feats, variant.tta_n)
        return s.ood if variant.box else predictive_entropy(s.probabilities(temps, bias))

    if variant.box:
        out["mean_log_radius"] = float(sc.ood.mean())
    if shifted:
        curve = {0.0: auroc}
        for s_, xs in sorted(shifted.items()):
            curve[float(s_)] = metrics.macro_auroc(y, score(head, xs, variant.tta_n).probabilities(temps, bias))[0]
        out["shift_auroc"] = {str(k): v for k, v in sorted(curve.items())}
        if 2.0 in curve:
            out["shift_drop_at_2"] = metrics.shift_drop(curve, 2.0)
    if ood:
        s_in = ood_of(x)
        out["_ood_in"] = s_in
        out["ood"] = {}
        for name, feats in ood.items():
            s_out = ood_of(feats)
            out["ood"][name] = metrics.ood_auroc(s_in, s_out)
            out[f"_ood_{name}"] = s_out
    if variant.box and tta_ns:
        out["bl_tta"] = tta_gap(head, x, y, temps, bias, tta_ns)
    return out


def public(d: dict) -> dict:
    """Drop the array entries (keys starting with "_") before writing JSON."""
    return {k: v for k, v in d.items() if not k.startswith("_")}


def accuracy_by_group(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    """Elementwise accuracy over the operating_points.URGENT_LABELS columns and over the other labels' columns.

    The two urgent high-sensitivity points call far more images present than p >= 0.5 does, so
    they cost every variant accuracy; this split shows how much, and whether a variant's overall
    figure is won on the calibrated labels or lost on the urgent ones.
    """
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    thr = np.broadcast_to(np.asarray(thresholds, np.float64), (len(LABELS),))
    urgent = np.array([k in operating_points.URGENT_LABELS for k in LABELS])
    return {"elementwise_accuracy_urgent": metrics.elementwise_accuracy(y[:, urgent], p[:, urgent], thr[urgent]),
            "elementwise_accuracy_other": metrics.elementwise_accuracy(y[:, ~urgent], p[:, ~urgent], thr[~urgent])}
