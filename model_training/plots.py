"""The evaluation's figures as PNG files: what a reader would rather look at than read.

matplotlib with the Agg backend only (no display, safe in workers and CI). Each function takes
plain arrays, writes one file and returns its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from model_training import metrics  # noqa: E402
from models.labels import LABELS  # noqa: E402

_DPI = 110


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def roc_per_label(y: np.ndarray, probs: dict[str, np.ndarray], path: Path, title: str = "") -> Path:
    """One panel per label, one ROC curve per model; labels with a single class say so."""
    fig, axes = plt.subplots(4, 4, figsize=(14, 13))
    for k, ax in enumerate(axes.flat):
        if k >= len(LABELS):
            ax.axis("off")
            continue
        known = ~np.isnan(y[:, k])
        yk = y[known, k]
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
        if len(np.unique(yk)) < 2:
            ax.text(0.5, 0.5, "one class only:\nnot scored", ha="center", va="center", color="0.4")
        else:
            for name, p in probs.items():
                fpr, tpr, _ = roc_curve(yk, p[known, k])
                ax.plot(fpr, tpr, lw=1.3, label=f"{name} {roc_auc_score(yk, p[known, k]):.2f}")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{LABELS[k]} (n+={int(np.nansum(yk))})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    fig.supxlabel("false positive rate")
    fig.supylabel("true positive rate")
    fig.suptitle(title or "ROC per label (test split)")
    return _save(fig, path)


def reliability_diagram(y: np.ndarray, probs: dict[str, np.ndarray], path: Path, n_bins: int = metrics.ECE_BINS) -> Path:
    """Observed rate against mean predicted probability per bin, with the bin counts below."""
    fig, (ax, axh) = plt.subplots(2, 1, figsize=(6, 7), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    width = 1.0 / n_bins / (len(probs) + 1)
    for j, (name, p) in enumerate(probs.items()):
        bins = metrics.reliability(y, p, n_bins)
        conf = [b["confidence"] for b in bins if b["count"]]
        obs = [b["observed"] for b in bins if b["count"]]
        ax.plot(conf, obs, marker="o", lw=1.4, label=f"{name} (ECE {metrics.ece(y, p, n_bins):.3f})")
        axh.bar([b["lo"] + (j + 0.5) * width for b in bins], [b["count"] for b in bins], width=width, label=name)
    ax.set_ylabel("observed frequency")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Reliability over all known (image, label) cells")
    axh.set_yscale("log")
    axh.set_xlabel("predicted probability")
    axh.set_ylabel("cells")
    return _save(fig, path)


def auroc_vs_shift(curves: dict[str, dict[float, tuple[float, float]]], path: Path) -> Path:
    """Macro-AUROC (mean and sd over seeds) against device-shift intensity, one line per model."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, c in curves.items():
        s = sorted(c)
        m = np.array([c[k][0] for k in s], dtype=float)
        sd = np.array([c[k][1] for k in s], dtype=float)
        ax.plot(s, m, marker="o", label=name)
        ax.fill_between(s, m - sd, m + sd, alpha=0.15)
    ax.axvline(1.0, color="0.6", ls=":", lw=1)
    ax.text(1.02, ax.get_ylim()[1], "strongest shift in training", fontsize=7, color="0.4", va="top")
    ax.set_xlabel("device-shift intensity (1 = strongest used in training)")
    ax.set_ylabel("macro-AUROC (test)")
    ax.set_title("Robustness to acquisition-device shift")
    ax.legend(fontsize=8)
    return _save(fig, path)


def radius_distribution(in_scores: np.ndarray, out_scores: dict[str, np.ndarray], path: Path,
                        xlabel: str = "OOD score: mean log radius of the box", aurocs: dict[str, float] | None = None) -> Path:
    """Histograms of the OOD score for in-distribution test images and each OOD set."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    allv = np.concatenate([np.asarray(in_scores)] + [np.asarray(v) for v in out_scores.values()])
    edges: Any = np.linspace(allv.min(), allv.max() + 1e-9, 40) if len(allv) else 10  # bin edges, or a count
    ax.hist(in_scores, bins=edges, density=True, alpha=0.55, label=f"in distribution (test, n={len(in_scores)})")
    for name, v in out_scores.items():
        extra = f", AUROC {aurocs[name]:.2f}" if aurocs and name in aurocs else ""
        ax.hist(v, bins=edges, density=True, histtype="step", lw=1.8, label=f"{name} (n={len(v)}{extra})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title("How large the box is, in and out of distribution")
    ax.legend(fontsize=8)
    return _save(fig, path)
