"""Issue 16's done-when on a small run: on phantoms of a seed no rule was tuned on (5557), B5 at its
bundle thresholds is at least as accurate elementwise as B0, B1 and B3 at theirs, and its
macro-AUROC, Brier and ECE are no worse than before the operating-point fixes (commit 3e347d1, the
same run: `medsam2-cxr evaluate --data phantoms:800:5557 --seeds 2 --encoder tiny`).

The smallest run that shows the effect: 800 phantoms (78 validation images; at 400 every urgent
label has a handful of validation positives and each variant's point is chance), the tiny encoder
at 128 px, two head seeds, no shifted test copies or BL-TTA study (neither changes a head or its
thresholds, so the figures equal the full command's). About 2 CPU-minutes with the out-of-fold
heads; 15 minutes or more of wall time on two cores shared with eight other processes, hence the
longer timeout.

B5 got there with two changes tuned on phantoms of seeds 101-505, never this seed: the shifted
copies' own loss at half weight (model_training.train.SHIFTED_WEIGHT) and a per-label bias beside
the temperature (models.calibration.fit_calibration). Before them B5 was 0.9055 against 0.9060,
after them 0.9070. The urgent findings' high-sensitivity points are now fitted on the validation
split and the training split's out-of-fold scores, where the scores rank the finding above
chance (model_training.train.out_of_fold, models.operating_points). On seeds 101-505 that raised
B5's test sensitivity for Pleural Effusion from 0.49 to 0.78 and its lead over the best of B0, B1
and B3 from +0.0021 to +0.0039. On this seed, B1's effusion point gained five cells and B5 now
trails it by one cell in about 2,000 (0.9079 against 0.9084). That is the shortfall the strict
xfail names. One seed decides little here: one image's call moves a variant's accuracy by about
0.0009. Over nine seeds no rule was tuned on (`python -m bench operating-points`, in
bench/operating_points.py), B5 met the done-when on four, and against B1 it was +0.0007
(standard error 0.0027; ahead on 4 of 9), against B0 +0.0060 and B3 +0.0044 (ahead on 7 of 9 each).
"""

from __future__ import annotations

import pytest

from bench import operating_points

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]

SEED = 5557
# B5 on this run at 3e347d1 (2 head seeds): the "today" of the done-when.
BEFORE = {"macro_auroc": 0.7689, "brier": 0.0700, "ece": 0.0258}
# Another machine's BLAS may move a figure in the 4th decimal; a regression is larger than this.
NUMERIC = 5e-4


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict:
    return operating_points.evaluate_seed(SEED, 800, tmp_path_factory.mktemp("done-when"))["variants"]


def test_b5_calibration_and_ranking_are_no_worse_than_before(variants):
    b5 = variants["B5"]
    assert b5["macro_auroc"]["mean"] >= BEFORE["macro_auroc"] - NUMERIC, b5["macro_auroc"]
    assert b5["brier"]["mean"] <= BEFORE["brier"] + NUMERIC, b5["brier"]
    assert b5["ece"]["mean"] <= BEFORE["ece"] - 1e-3, b5["ece"]  # the pooled temperature prior: 0.0258 -> 0.0240
    # Pleural Effusion keeps its high-sensitivity point in every variant. A criterion that gave way
    # (Pneumothorax, whose phantom features barely rank it) says why, and the summary agrees.
    for name, v in variants.items():
        assert "Pleural Effusion" in v["criteria"] and "Pleural Effusion" not in v["not_estimable"], name
        assert set(v["not_estimable"]) <= {"Pneumothorax"}, (name, v["not_estimable"])
        for why in v["not_estimable"].values():
            assert "above chance" in why or "positives" in why, why
        assert ("Pneumothorax" in v["criteria"]) == ("Pneumothorax" not in v["not_estimable"]), name


@pytest.mark.xfail(strict=True, reason="issue 16 open: on seed 5557 B5 trails B1 by one cell in about 2,000 (0.9079 "
                   "against 0.9084) since the urgent points are fitted on the out-of-fold scores too")
def test_b5_at_its_bundle_thresholds_is_as_accurate_as_b0_b1_and_b3(variants):
    acc = {k: r["elementwise_accuracy"]["mean"] for k, r in variants.items()}
    assert acc["B5"] >= max(acc["B0"], acc["B1"], acc["B3"]) - operating_points.TIE, acc  # equal cell counts tie


def test_the_several_seed_comparison_counts_ties_as_met_and_pairs_by_seed():
    """bench operating-points' summary, on accuracies made up so every figure is known."""
    per_seed = {1: {"B0": 0.90, "B1": 0.91, "B3": 0.89, "B5": 0.91},  # tie with B1: met
                2: {"B0": 0.88, "B1": 0.90, "B3": 0.92, "B5": 0.91},  # B3 ahead by 0.01
                3: {"B0": 0.90, "B1": 0.89, "B3": 0.90, "B5": 0.93}}
    out = operating_points.compare(per_seed)
    assert out["b5_minus_best_other"] == {"1": 0.0, "2": -0.01, "3": 0.03}
    assert out["done_when_met_on"] == 2 and out["mean_b5_minus_best_other"] == pytest.approx(0.0067, abs=1e-4)
    b1 = out["b5_against"]["B1"]  # differences 0, 0.01, 0.04: mean 0.0167, sd 0.0208
    assert b1["mean_difference"] == pytest.approx(0.0167, abs=1e-4) and b1["b5_ahead_or_tied"] == 3
    assert b1["standard_error"] == pytest.approx(0.0208 / 3 ** 0.5, abs=1e-4)
    assert out["b5_against"]["B3"]["b5_ahead_or_tied"] == 2
    assert operating_points.compare({1: per_seed[1]})["b5_against"]["B1"]["standard_error"] is None  # one seed
