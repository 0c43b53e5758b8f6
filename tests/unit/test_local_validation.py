"""model_training.local_validation: patient-level bootstrap, figures with counts, labels with too
few positives, the card's figures held against the local intervals; the report's reference rule."""

from __future__ import annotations

import numpy as np

from model_training import local_validation as lv
from model_training import metrics
from models.labels import LABELS
from ris.second_read import ReportLabels

L = len(LABELS)


def _cases(n: int = 400, seed: int = 0, rare: str = "Pneumothorax", overconfident: bool = False) -> lv.Cases:
    """Calibrated probabilities (y ~ Bernoulli(p)) from 2 studies a patient, one label nearly never positive."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, (n, L))
    y = (rng.random((n, L)) < p).astype(float)
    k = LABELS.index(rare)
    y[:, k] = 0.0
    y[:3, k] = 1.0
    y[5:20, 0] = np.nan  # left out: the labelers disagreed
    shown = np.clip(np.where(p > 0.5, p + 0.4 * (1 - p), p * 0.4), 0, 1) if overconfident else p
    return lv.Cases(p=shown, y=y, thresholds=np.full((n, L), 0.5), ood=rng.random(n) < 0.1,
                    cluster=np.array([f"patient{i // 2}" for i in range(n)], dtype=object),
                    calling_aet=np.array(["A" if i % 3 else "B" for i in range(n)], dtype=object),
                    device=np.array(["Vendor / X"] * n, dtype=object), received_at=np.arange(n, dtype=float))


def test_the_bootstrap_draws_whole_patients_and_is_seeded() -> None:
    cluster = np.array(["a", "a", "b", "c", "c", "c"], dtype=object)
    draws = lv.cluster_bootstrap(cluster, 20, seed=4)
    for idx in draws:
        picked = cluster[idx]
        for name, size in (("a", 2), ("b", 1), ("c", 3)):
            assert (picked == name).sum() % size == 0  # a patient comes with all its studies, or not at all
    again = lv.cluster_bootstrap(cluster, 20, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))
    assert not all(np.array_equal(a, b) for a, b in zip(draws, lv.cluster_bootstrap(cluster, 20, seed=5)))


def test_figures_with_intervals_and_counts() -> None:
    c = _cases()
    f = lv.figures(c, n_boot=100, seed=1)
    row = f["labels"]["Edema"]
    k = LABELS.index("Edema")
    assert row["n_positive"] == int((c.y[:, k] == 1).sum()) and row["n_known"] == len(c)
    lo, hi = row["auroc"]["ci"]
    assert lo < row["auroc"]["value"] < hi
    assert abs(row["auroc"]["value"] - metrics.per_label_auroc(c.y, c.p)["Edema"]) < 1e-12  # the evaluation's own AUROC
    assert f["labels"]["No Finding"]["n_left_out"] == 15
    assert f["overall"]["ece"]["value"] < 0.08  # calibrated by construction
    assert f["overall"]["ood_rate"]["ci"][0] <= f["overall"]["ood_rate"]["value"] <= f["overall"]["ood_rate"]["ci"][1]
    assert f["n_clusters"] == len(c) // 2


def test_a_label_with_too_few_positives_says_so_instead_of_a_number() -> None:
    row = lv.figures(_cases(), n_boot=20)["labels"]["Pneumothorax"]
    assert row["auroc"] is None and row["sensitivity"] is None and row["ece"] is None
    assert "3 positive" in row["too_few"] and str(lv.MIN_CLASS_COUNT) in row["too_few"]


def _card(auroc: float, ece: float, pos: int = 50) -> dict:
    ops = {k: {"sensitivity": 0.5, "specificity": 0.5, "tp": pos // 2, "fn": pos - pos // 2, "tn": 40, "fp": 40}
           for k in LABELS}
    return {"metrics": {"test": {"per_label_auroc": dict.fromkeys(LABELS, auroc), "operating_points": ops,
                                 "macro_auroc": auroc, "brier": 0.2, "ece": ece, "n_test": 200}},
            "validation_data": "held-out test split"}


def test_a_sentence_where_the_local_interval_excludes_the_card() -> None:
    c = _cases(overconfident=True)
    res = lv.validate(c, _card(auroc=0.99, ece=0.01), n_boot=100)
    said = res["disagreements"]
    assert any("local ECE" in s and "worse here" in s for s in said["overall"])
    assert any("Edema: the local AUROC" in s and "lower than the model card's 0.990" in s for s in said["Edema"])
    assert "Pneumothorax" not in said  # too few positives locally: no figure, no sentence
    assert set(res["by_calling_aet"]) == {"A", "B"} and res["by_calling_aet"]["B"]["n_images"] == len(c) // 3 + 1
    # a card figure the local interval contains raises nothing
    local_auc = res["overall"]["labels"]["Edema"]["auroc"]["value"]
    quiet = lv.disagreements(res["overall"], lv.card_figures(_card(auroc=local_auc, ece=0.01)))
    assert not any("AUROC" in s for s in quiet.get("Edema", []))


def test_the_fast_auroc_is_scikit_learns() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    for _ in range(20):
        y = (rng.random(60) < 0.3).astype(float)
        y[:2] = [0, 1]
        s = np.round(rng.random(60), 1)  # ties
        assert abs(metrics.binary_auroc(y, s) - roc_auc_score(y, s)) < 1e-12


def test_a_card_figure_over_a_handful_of_test_positives_is_not_held_against() -> None:
    res = lv.validate(_cases(), _card(auroc=0.99, ece=0.01, pos=3), n_boot=50)
    assert any("rests on 3 positive" in s for s in res["disagreements"]["Edema"])
    assert not any("lower than" in s for s in res["disagreements"]["Edema"])


def test_the_reports_reference_rule() -> None:
    both = ReportLabels({"Edema": 1, "Cardiomegaly": 0, "Atelectasis": -1, "Pneumonia": 1},
                        {"Edema": 1, "Atelectasis": 0, "Pneumonia": 0})
    assert both.truth("Edema") == 1.0  # both positive
    assert both.truth("Cardiomegaly") == 0.0  # negated by one, not mentioned by the other
    assert both.truth("Fracture") == 0.0  # not mentioned by either
    assert np.isnan(both.truth("Atelectasis"))  # uncertain
    assert np.isnan(both.truth("Pneumonia"))  # the labelers disagree
