"""The paper's metrics against hand-computed cases (../shared/docs/method.md, "Metrics")."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model_training import metrics
from models.labels import LABELS

nan = np.nan


def test_macro_auroc_skips_and_counts_single_class_labels_and_masks_unknowns():
    # label 0: AUROC 0.75 by hand (pairs (pos, neg): (0.8>0.3) (0.8>0.1) (0.2<0.3) (0.2>0.1) -> 3/4)
    # label 1: only negatives among known values -> skipped; label 2: the nan row would flip it
    y = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1], [0, nan, nan]])
    p = np.array([[0.8, 0.5, 0.9], [0.2, 0.1, 0.1], [0.3, 0.2, 0.7], [0.1, 0.9, 0.99]])
    per = metrics.per_label_auroc(y, p, ["a", "b", "c"])
    assert per == {"a": 0.75, "b": None, "c": 1.0}
    assert metrics.macro_auroc(y, p) == (pytest.approx(0.875), 2)
    assert math.isnan(metrics.macro_auroc(np.zeros((3, 2)), np.ones((3, 2)))[0])


def test_elementwise_accuracy_is_one_minus_hamming_not_subset_accuracy():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 1, nan]])
    p = np.array([[0.9, 0.2, 0.4], [0.1, 0.6, 0.8], [0.7, 0.9, 0.0]])
    # cells: row0 1,1,0 | row1 1,0,1 | row2 1,1,(masked): 6 of 8 right; no row is fully right
    # except row 2 on its known cells, so subset accuracy would be 1/3.
    assert metrics.elementwise_accuracy(y, p, 0.5) == pytest.approx(6 / 8)
    # per-label thresholds: label 2 at 0.3 turns row0's miss into a hit
    assert metrics.elementwise_accuracy(y, p, np.array([0.5, 0.5, 0.3])) == pytest.approx(7 / 8)


def test_brier_is_per_label_mean_over_known_then_mean_over_labels():
    y = np.array([[1, 0], [0, nan], [1, nan]])
    p = np.array([[0.5, 0.2], [0.5, 0.9], [1.0, 0.9]])
    # label 0: (0.25 + 0.25 + 0) / 3; label 1: 0.04 / 1
    assert metrics.brier(y, p) == pytest.approx(((0.5 / 3) + 0.04) / 2)
    # a label with no known value does not count
    y2 = np.c_[y, np.full(3, nan)]
    assert metrics.brier(y2, np.c_[p, np.zeros(3)]) == pytest.approx(metrics.brier(y, p))


def test_ece_on_a_known_reliability_set():
    # bin [0.2, 0.3): 4 cells at 0.25 with 1 positive -> perfectly calibrated
    # bin [0.9, 1.0]: 4 cells at 0.95 with 2 positives -> |0.5 - 0.95| = 0.45
    p = np.array([0.25] * 4 + [0.95] * 4)[:, None]
    y = np.array([1, 0, 0, 0, 1, 1, 0, 0], dtype=float)[:, None]
    assert metrics.ece(y, p) == pytest.approx(0.5 * 0.45)
    bins = metrics.reliability(y, p)
    assert [b["count"] for b in bins] == [0, 0, 4, 0, 0, 0, 0, 0, 0, 4]
    # p = 1.0 falls in the last bin, unknown cells are ignored
    assert metrics.ece(np.array([[1.0], [nan]]), np.array([[1.0], [0.0]])) == 0.0


def test_ood_auroc_with_ood_as_positive_class_and_fpr_at_95_tpr():
    ind = np.array([0.0, 1.0, 2.0, 3.0])
    ood = np.array([2.5, 4.0])
    r = metrics.ood_auroc(ind, ood)
    assert r["auroc"] == pytest.approx(7 / 8)  # 2.5 beats 3 of 4, 4.0 beats all 4
    # flagging both OOD images needs threshold 2.5, which also flags the in-distribution 3.0
    assert r["fpr_at_95_tpr"] == pytest.approx(1 / 4)
    assert r["positive_class"] == "out-of-distribution" and (r["n_in"], r["n_out"]) == (4, 2)
    assert metrics.ood_auroc(ind, ind + 10)["fpr_at_95_tpr"] == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        metrics.ood_auroc(ind, np.array([]))


def test_summaries_over_seeds_and_shift_drop():
    s = metrics.summarize([0.60, 0.64, 0.62])
    assert s["mean"] == pytest.approx(0.62) and s["sd"] == pytest.approx(0.02) and s["best"] == 0.64
    assert metrics.summarize([0.1, 0.3], higher_is_better=False)["best"] == 0.1
    assert metrics.summarize([0.5])["sd"] == 0.0
    u = metrics.summarize([0.5, nan, None])
    assert u["n"] == 1 and u["n_undefined"] == 2
    assert metrics.summarize([nan])["mean"] is None
    assert metrics.shift_drop({0.0: 0.70, 1.0: 0.69, 2.0: 0.65}) == pytest.approx(0.05)


def test_per_label_auroc_uses_the_canonical_labels_by_default():
    rng = np.random.default_rng(0)
    y = (rng.random((50, len(LABELS))) < 0.5).astype(float)
    per = metrics.per_label_auroc(y, y * 0.8 + 0.1)
    assert list(per) == list(LABELS) and all(v == 1.0 for v in per.values())
