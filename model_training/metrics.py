"""The figures the paper reports, computed exactly as ../shared/docs/method.md defines them.

Every function takes labels y with nan for unknown or uncertain values, so a masked cell never
counts, and returns plain floats (or dicts of them) that go straight into metrics.json.
Metrics are computed per label by hand rather than with `roc_auc_score(average="macro")`, which
returns NaN for the whole macro when one label has a single class (scikit-learn 1.9).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from models.labels import LABELS

ECE_BINS = 10


def _known(y: np.ndarray) -> np.ndarray:
    return ~np.isnan(np.asarray(y, dtype=np.float64))


def binary_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """AUROC of scores s for 0/1 labels y (both classes present): the Mann-Whitney statistic with
    ties counted half, which is what `roc_auc_score` returns, without its input checks (about 8 ms
    a call here), so that a bootstrap over thousands of resamples stays fast."""
    y = np.asarray(y) == 1
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    ranks = rankdata(np.asarray(s, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def per_label_auroc(y: np.ndarray, p: np.ndarray, labels: Sequence[str] = LABELS) -> dict[str, float | None]:
    """AUROC per label over images whose label is known; None where only one class is present."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    out: dict[str, float | None] = {}
    for k, name in enumerate(labels):
        known = _known(y[:, k])
        yk = y[known, k]
        out[name] = binary_auroc(yk, p[known, k]) if len(np.unique(yk)) == 2 else None
    return out


def macro_auroc(y: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    """Mean AUROC over the labels with both classes present, and how many labels were scored."""
    aucs = [a for a in per_label_auroc(y, p, [str(i) for i in range(np.shape(y)[1])]).values() if a is not None]
    return (float(np.mean(aucs)) if aucs else float("nan")), len(aucs)


def elementwise_accuracy(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray | float = 0.5) -> float:
    """Mean over known (image, label) cells of [p >= threshold] == y: 1 - Hamming loss.

    Not `accuracy_score`, which on multilabel data is exact-match subset accuracy.
    """
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    known = _known(y)
    if not known.any():
        return float("nan")
    hit = (p >= np.broadcast_to(np.asarray(thresholds, dtype=np.float64), p.shape)) == (y == 1)
    return float(hit[known].mean())


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Mean (p - y)^2 over known images per label, then the mean over labels that have any."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    per = [float(np.mean((p[m, k] - y[m, k]) ** 2)) for k in range(y.shape[1]) if (m := _known(y[:, k])).any()]
    return float(np.mean(per)) if per else float("nan")


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-width probability bins over all known cells: count, mean confidence, observed rate."""
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    known = _known(y)
    yy, pp = y[known], p[known]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(pp, edges[1:-1], right=False), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(m.sum()),
                    "confidence": float(pp[m].mean()) if m.any() else None,
                    "observed": float(yy[m].mean()) if m.any() else None})
    return out


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error over all known (image, label) cells pooled.

    sum_b (n_b / n) |mean(y in b) - mean(p in b)| with n_bins equal-width bins on [0, 1]; a
    probability of exactly 1 falls in the last bin.
    """
    bins = reliability(y, p, n_bins)
    n = sum(b["count"] for b in bins)
    if n == 0:
        return float("nan")
    return float(sum(b["count"] / n * abs(b["observed"] - b["confidence"]) for b in bins if b["count"]))


def ood_auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> dict:
    """Binary AUROC of an OOD score, out-of-distribution images being the positive class.

    A higher score must mean "more foreign". fpr_at_95_tpr: the fraction of in-distribution images
    flagged at the highest threshold that still flags 95% of the OOD images.
    """
    a = np.asarray(in_scores, dtype=np.float64)
    b = np.asarray(out_scores, dtype=np.float64)
    if not len(a) or not len(b):
        raise ValueError(f"OOD AUROC needs both sets non-empty (got {len(a)} in-distribution, {len(b)} OOD)")
    y = np.r_[np.zeros(len(a)), np.ones(len(b))]
    s = np.r_[a, b]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {"auroc": float(roc_auc_score(y, s)), "fpr_at_95_tpr": float(fpr[np.searchsorted(tpr, 0.95, side="left")]),
            "positive_class": "out-of-distribution", "n_in": int(len(a)), "n_out": int(len(b))}


def shift_drop(auroc_by_shift: dict[float, float], at: float = 2.0) -> float:
    """macro-AUROC at no shift minus macro-AUROC at shift `at` (positive = the model got worse)."""
    return float(auroc_by_shift[0.0] - auroc_by_shift[at])


def summarize(values: Sequence[float], higher_is_better: bool = True) -> dict:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and best over seeds.

    NaN values (a metric undefined for a seed) are left out and counted in n_undefined.
    """
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    n_undef = len(values) - len(v)
    if not len(v):
        return {"mean": None, "sd": None, "best": None, "n": 0, "n_undefined": n_undef}
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "best": float(v.max() if higher_is_better else v.min()), "n": int(len(v)), "n_undefined": n_undef}
