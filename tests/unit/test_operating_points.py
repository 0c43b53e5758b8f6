"""Operating points: threshold selection with known optima, the card, site overrides, results naming them."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from scipy.stats import mannwhitneyu

from dicom_node.uids import results_key
from model_training.metrics import binary_auroc
from models import operating_points as op
from models.bundle import BundleError, load_bundle
from models.calibration import fit_thresholds
from models.labels import LABELS
from models.predictor import Predictor
from models.preprocess import read_image

REPO = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


def _texts(ds) -> list[str]:
    """Every TEXT value and algorithm parameter of an SR, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out += _texts(item)
    return out


def _calibrated(n: int, a: float, b: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated scores by construction: p ~ Beta(a, b), y ~ Bernoulli(p)."""
    rng = np.random.default_rng(seed)
    p = rng.beta(a, b, n)
    return p, (rng.random(n) < p).astype(float)


def test_accuracy_picks_one_half_on_calibrated_scores_where_youden_picks_the_prevalence():
    # For calibrated scores the accuracy-optimal threshold is 0.5; Youden's J is optimal where the
    # likelihood ratio is 1, i.e. at p = prevalence (0.2 here): the rule that called too much present.
    p, y = _calibrated(40000, 1.0, 4.0)
    roc = op.RocTable.from_scores(p, y)
    assert abs(roc.choose("accuracy") - 0.5) < 0.04
    assert roc.choose("expected_accuracy") == 0.5  # the default rests on that: Bayes for a calibrated p
    assert abs(roc.choose("youden") - 0.2) < 0.04
    assert abs(fit_thresholds(p[:4000, None], y[:4000, None])[0] - 0.2) < 0.06  # the old rule agrees


def test_criteria_match_a_brute_force_search_over_every_threshold():
    p, y = _calibrated(300, 2.0, 3.0, seed=1)
    roc = op.RocTable.from_scores(p, y)
    grid = np.r_[0.0, np.unique(p), 1.1]  # p >= each: every split of the images there is
    calls = p[None, :] >= grid[:, None]
    tp, fp = (calls & (y == 1)).sum(1), (calls & (y == 0)).sum(1)
    fn, tn = (y == 1).sum() - tp, (y == 0).sum() - fp
    acc = (tp + tn) / len(y)
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)

    def at(t: float) -> tuple[int, int]:
        return int(((p >= t) & (y == 1)).sum()), int(((p >= t) & (y == 0)).sum())

    t_acc, t_f1 = roc.choose("accuracy"), roc.choose("f1")
    assert (at(t_acc)[0] + len(y) - (y == 1).sum() - at(t_acc)[1]) / len(y) == pytest.approx(acc.max())
    tp1, fp1 = at(t_f1)
    assert 2 * tp1 / (2 * tp1 + fp1 + (y == 1).sum() - tp1) == pytest.approx(f1.max())
    # sensitivity:0.9 = the highest threshold still catching >= 90% of the positives
    t_s = roc.choose("sensitivity:0.9")
    sens = tp / (y == 1).sum()
    assert at(t_s) == at(grid[sens >= 0.9].max())  # the same split as the highest such threshold
    t_sp = roc.choose("specificity:0.8")
    spec = tn / (y == 0).sum()
    assert at(t_sp) == at(grid[spec >= 0.8].min())
    assert roc.choose("threshold:0.37") == 0.37


def test_sensitivity_point_on_a_small_known_example():
    # positives at 0.2, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.96, 0.97, 0.99: catching 9 of 10 means
    # a threshold between 0.2 and 0.5 (midpoint 0.35 among the distinct scores, negatives at 0.1, 0.3, 0.4)
    pos = [0.2, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.96, 0.97, 0.99]
    neg = [0.1, 0.3, 0.4]
    p = np.array(pos + neg)
    y = np.array([1.0] * len(pos) + [0.0] * len(neg))
    roc = op.RocTable.from_scores(p, y)
    assert roc.choose("sensitivity:0.9") == pytest.approx(0.45)  # highest: between 0.4 and 0.5
    assert roc.choose("sensitivity:0.95") == pytest.approx(0.15)  # all 10: below 0.2
    # With a specificity floor the point never goes below the lowest threshold keeping it.
    assert roc.choose("sensitivity:0.95,min_specificity:0.6") == pytest.approx(0.35)  # spec 2/3
    assert roc.choose("sensitivity:0.9,min_specificity:0.6") == pytest.approx(0.45)  # floor not binding
    assert str(op.Criterion.parse(" Sensitivity:0.90, min_specificity:0.80")) == "sensitivity:0.9,min_specificity:0.8"
    assert op.confusion(y, p, 0.45) == {"tp": 9, "fp": 0, "tn": 3, "fn": 1, "sensitivity": 0.9,
                                        "specificity": 1.0, "ppv": 1.0}


def test_one_class_or_too_few_images_fall_back_to_one_half_and_the_card_says_so():
    p = np.random.default_rng(0).random((30, len(LABELS)))
    y = np.zeros_like(p)
    y[:, 0] = np.r_[np.ones(15), np.zeros(15)]
    y[3:, 1] = np.nan  # 3 known only
    fitted = op.fit(p, y)
    assert fitted["thresholds"]["Pneumothorax"] == op.FALLBACK_THRESHOLD  # one class
    assert set(fitted["operating_points"]["fallback"]) == set(LABELS[1:])
    assert fitted["operating_points"]["criteria"]["Pneumothorax"] == op.URGENT_CRITERION
    assert fitted["operating_points"]["criteria"]["Cardiomegaly"] == "expected_accuracy"


def test_a_rate_target_on_too_few_validation_positives_gives_way_to_the_default_and_the_card_says_why():
    # 80 validation images: Pneumothorax with 2 positives (as on phantoms of seed 3131), Pleural
    # Effusion with 12. A sensitivity point on 2 positives is chance: the bundle's own fit uses
    # the default criterion for Pneumothorax and names why; Pleural Effusion keeps its point.
    rng = np.random.default_rng(3)
    p = rng.random((80, len(LABELS)))
    y = np.zeros_like(p)
    pn, pe = LABELS.index("Pneumothorax"), LABELS.index("Pleural Effusion")
    y[:2, pn] = 1
    y[:12, pe] = 1
    p[:12, pe] = 0.4 + 0.6 * p[:12, pe]  # scores that rank its positives above chance
    y[:2, LABELS.index("Cardiomegaly")] = 1  # expected_accuracy: fitted on nothing, so never thin
    y[:75, LABELS.index("Edema")] = 1  # 5 negatives: a specificity target cannot be fitted either
    ops = op.fit(p, y, {"Fracture": "f1", "Edema": "specificity:0.9", "Atelectasis": "sensitivity:0.8"})
    o = ops["operating_points"]
    assert o["criteria"]["Pneumothorax"] == op.DEFAULT_CRITERION and ops["thresholds"]["Pneumothorax"] == 0.5
    assert o["not_estimable"]["Pneumothorax"] == ("sensitivity:0.9,min_specificity:0.8 needs at least 10 held-out "
                                                  "positives, 2 here: expected_accuracy instead")
    assert o["not_estimable"]["Edema"].startswith("specificity:0.9 needs at least 10 held-out negatives, 5 here")
    assert set(o["not_estimable"]) == {"Pneumothorax", "Edema"}  # Atelectasis: one class, so the 0.5 fallback
    assert o["criteria"]["Pleural Effusion"] == op.URGENT_CRITERION
    roc = op.RocTable.from_scores(p[:, pe], y[:, pe])
    assert ops["thresholds"]["Pleural Effusion"] == roc.choose(op.URGENT_CRITERION) != 0.5
    assert o["thin"] == {}  # every fitted point rests on at least 10 images of each class
    assert "Fracture" in o["fallback"] and "Atelectasis" in o["fallback"]
    # A site that asks for the rate target itself still gets it, from the card's ROC points.
    card = {"thresholds": ops["thresholds"], "operating_points": o}
    thr, crit = op.apply(card, {"Pneumothorax": "sensitivity:0.9"})
    assert crit["Pneumothorax"] == "sensitivity:0.9"
    assert thr["Pneumothorax"] == op.RocTable.from_scores(p[:, pn], y[:, pn]).choose("sensitivity:0.9")
    assert op.estimable("sensitivity:0.9", roc) and op.estimable("f1", op.RocTable.from_scores(p[:, pn], y[:, pn]))


def test_a_sensitivity_point_on_scores_no_better_than_chance_gives_way_to_the_default():
    # 700 held-out images, 25 pneumothoraces: enough positives, but scores that do not rank them
    # (phantom features carry no pneumothorax). Its high-sensitivity point would flag one image
    # in five at random; the fit says so and uses the default. Pleural Effusion, ranked, keeps it.
    rng = np.random.default_rng(11)
    n = 700
    p = rng.random((n, len(LABELS))) * 0.2
    y = np.zeros_like(p)
    pn, pe = LABELS.index("Pneumothorax"), LABELS.index("Pleural Effusion")
    y[rng.choice(n, 25, replace=False), pn] = 1
    pos = rng.choice(n, 60, replace=False)
    y[pos, pe] = 1
    p[pos, pe] += 0.15
    chance, ranked = op.RocTable.from_scores(p[:, pn], y[:, pn]), op.RocTable.from_scores(p[:, pe], y[:, pe])
    assert abs(chance.auroc - 0.5) < 0.1 and chance.chance_p > op.CHANCE_P and ranked.chance_p < 1e-6
    ops = op.fit(p, y)["operating_points"]
    assert ops["criteria"]["Pneumothorax"] == op.DEFAULT_CRITERION
    assert ops["not_estimable"]["Pneumothorax"].startswith(
        f"{op.URGENT_CRITERION} needs scores that rank the finding above chance; held-out AUROC {chance.auroc:.2f} "
        "over 25 positives and 675 negatives")
    assert ops["criteria"]["Pleural Effusion"] == op.URGENT_CRITERION and "Pleural Effusion" not in ops["not_estimable"]
    # the table's AUROC is the scores' own (ties count half), and its p-value the Mann-Whitney one
    assert ranked.auroc == pytest.approx(binary_auroc(y[:, pe], p[:, pe]), abs=1e-12)
    u = mannwhitneyu(p[y[:, pn] == 1, pn], p[y[:, pn] == 0, pn], alternative="greater", method="asymptotic",
                     use_continuity=False)
    assert chance.chance_p == pytest.approx(u.pvalue, rel=1e-3)


def test_accuracy_by_group_splits_the_urgent_columns_from_the_rest():
    n = 10
    y = np.zeros((n, len(LABELS)))
    p = np.zeros_like(y)
    u = [LABELS.index(k) for k in op.URGENT_LABELS]
    thr = np.full(len(LABELS), 0.5)
    thr[u] = 0.1
    p[:4, u] = 0.2  # 4 false alarms on each urgent label, none elsewhere
    p[:3, 0] = 0.9  # 3 false "No Finding" calls
    y[9, 1] = np.nan  # a masked cell counts nowhere
    from model_training.measure import accuracy_by_group
    got = accuracy_by_group(y, p, thr)
    assert got["elementwise_accuracy_urgent"] == pytest.approx(1 - 8 / 20)
    assert got["elementwise_accuracy_other"] == pytest.approx(1 - 3 / (12 * n - 1))
    from model_training import metrics
    total = metrics.elementwise_accuracy(y, p, thr)
    assert total == pytest.approx((20 * got["elementwise_accuracy_urgent"] + 119 * got["elementwise_accuracy_other"]) / 139)


@pytest.mark.parametrize("spec", ["sensitivity", "sensitivity:1.5", "accuracy:0.3", "magic", "threshold:abc",
                                  "f1,min_specificity:0.5", "sensitivity:0.9,min_specificity:2"])
def test_bad_specs_are_refused(spec):
    with pytest.raises(ValueError, match="operating point"):
        op.Criterion.parse(spec)


def test_settings_refuse_an_unknown_label_or_criterion(tmp_path):
    from worker.errors import ConfigError
    from worker.settings import load_settings

    cfg = tmp_path / "c.toml"
    cfg.write_text('[model.operating_points]\n"Pleural Effusion" = "sensitivity:0.95"\n"*" = "f1"\n')
    assert load_settings(cfg).model.operating_points == {"Pleural Effusion": "sensitivity:0.95", "*": "f1"}
    cfg.write_text('[model.operating_points]\n"Pleural Efusion" = "sensitivity:0.95"\n')
    with pytest.raises(ConfigError, match="unknown labels"):
        load_settings(cfg)
    cfg.write_text('[model.operating_points]\n"Pneumothorax" = "sensitive"\n')
    with pytest.raises(ConfigError, match="not understood"):
        load_settings(cfg)


def test_the_default_bundle_card_states_each_labels_operating_point_with_test_counts(tiny_bundle):
    card = json.loads((tiny_bundle / "model_card.json").read_text())
    ops = card["operating_points"]
    assert ops["urgent_labels"] == list(op.URGENT_LABELS)
    test = card["metrics"]["test"]["operating_points"]
    for k in LABELS:
        urgent = k in op.URGENT_LABELS and k not in ops["not_estimable"]  # too few held-out positives: the default
        assert ops["criteria"][k] == ("sensitivity:0.9,min_specificity:0.8" if urgent else "expected_accuracy")
        assert set(ops["validation_roc"][k]) == {"thresholds", "tp", "fp", "n_pos", "n_neg"}
        t = test[k]
        assert t["criterion"] == ops["criteria"][k] and t["threshold"] == card["thresholds"][k]
        assert {"sensitivity", "specificity", "ppv", "tp", "fp", "tn", "fn"} <= set(t)
        assert t["tp"] + t["fp"] + t["tn"] + t["fn"] > 0
    # The card's thresholds are what its validation ROC points give under its criteria.
    assert op.apply(card, {k: ops["criteria"][k] for k in LABELS})[0] == pytest.approx(card["thresholds"])
    assert card["validated_on_real_images"] is False and "Youden" not in card["training"]["thresholds"]


def test_a_site_operating_point_changes_present_and_the_results_name_it(tiny_bundle, tmp_path):
    from dicom_node.encoders.sc import _panel_lines, shown_findings
    from worker.pipeline import encode_results

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    image = read_image(ds)
    own = Predictor(load_bundle(tiny_bundle), device="cpu").predict([image], saliency_top=0)[0]
    site_bundle = load_bundle(tiny_bundle, {"Pleural Effusion": "threshold:0.001", "Fracture": "specificity:0.99"})
    site = Predictor(site_bundle, device="cpu").predict([image], saliency_top=0)[0]
    by, own_by = {f.label: f for f in site.findings}, {f.label: f for f in own.findings}
    assert by["Pleural Effusion"].present and by["Pleural Effusion"].operating_point == "threshold:0.001"
    own_card = json.loads((tiny_bundle / "model_card.json").read_text())
    assert own_by["Pleural Effusion"].operating_point == own_card["operating_points"]["criteria"]["Pleural Effusion"]
    assert by["Fracture"].operating_point == "specificity:0.99"
    assert by["Cardiomegaly"].operating_point == "expected_accuracy" and by["Cardiomegaly"] == own_by["Cardiomegaly"]
    everything = Predictor(load_bundle(tiny_bundle, {"*": "threshold:1e-9"}), device="cpu").predict([image], 0)[0]
    assert all(f.present for f in everything.findings) and not all(f.present for f in own.findings)
    model = site_bundle.identity()
    assert "Pleural Effusion=threshold:0.001" in model.operating_points and results_key(model) != model.digest
    sr, sc, *_ = encode_results(ds, image, site, model, NOW, None)
    dumped = " | ".join(_texts(sr))
    assert "operating point threshold:0.001 (fixed threshold 0.001)" in dumped
    assert "validation specificity >= 99%" in dumped and "Operating points:" in dumped
    own_sr, *_ = encode_results(ds, image, own, load_bundle(tiny_bundle).identity(), NOW, None)
    assert own_sr.SOPInstanceUID != sr.SOPInstanceUID  # different calls -> a different object
    panel = [t for t, _ in _panel_lines(site, model, shown_findings(site))]
    assert any(t.startswith("Thresholds: ") for t in panel)
    assert site.to_json()["findings"][LABELS.index("Pleural Effusion")]["operating_point"] == "threshold:0.001"


def test_an_old_card_without_roc_points_takes_only_fixed_thresholds(tiny_bundle):
    card = json.loads((tiny_bundle / "model_card.json").read_text())
    old = {k: v for k, v in card.items() if k != "operating_points"}
    thr, crit = op.apply(old, None)
    assert crit["Cardiomegaly"] == "bundle threshold" and thr == card["thresholds"]
    assert op.apply(old, {"Cardiomegaly": "threshold:0.3"})[0]["Cardiomegaly"] == 0.3
    with pytest.raises(ValueError, match="validation ROC points"):
        op.apply(old, {"Cardiomegaly": "f1"})
    with pytest.raises(BundleError, match="unknown labels"):
        load_bundle(tiny_bundle, {"Cardiomegally": "f1"})


def test_infer_json_and_sr_name_the_configured_operating_point(tmp_path, tiny_bundle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[paths]\nspool = "{tmp_path / "var"}"\n[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n'
                   '[model.operating_points]\n"Pleural Effusion" = "sensitivity:0.95"\n"Pneumothorax" = "threshold:1e-9"\n')
    out = subprocess.run([sys.executable, "-m", "worker.cli", "infer", get_testdata_file("RG1_UNCI.dcm"), "--out",
                          str(tmp_path / "out"), "--config", str(cfg)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.splitlines()[0])
    assert "Pneumothorax" in line["present"]
    summary = json.loads((tmp_path / "out" / line["summary"]).read_text())
    by = {f["label"]: f for f in summary["findings"]}
    assert by["Pleural Effusion"]["operating_point"] == "sensitivity:0.95"
    assert by["Pneumothorax"]["operating_point"] == "threshold:1e-09" and by["Pneumothorax"]["present"]
    assert by["Edema"]["operating_point"] == "expected_accuracy"
    sr = pydicom.dcmread(tmp_path / "out" / summary["sr"])
    assert any(t.startswith("operating point sensitivity:0.95") for t in _texts(sr))


def test_tiers_are_never_medium_or_high_from_a_bundle_not_validated_on_real_images():
    from models.calibration import tier

    assert tier(0.99, 0.5, 0.0) == "high" and tier(0.99, 0.5, 0.0, validated=False) == "not validated"
    assert tier(0.52, 0.5, 0.3, validated=False) == "low"


def test_the_io_step_reads_back_the_operating_point_and_the_not_validated_tier(tiny_bundle, tmp_path):
    from dicom_node.spool import Spool
    from worker.pipeline import load_prediction, save_prediction

    bundle = load_bundle(tiny_bundle, {"Edema": "f1"})
    pred = Predictor(bundle, device="cpu").predict([read_image(pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm")))])[0]
    pred = dataclasses.replace(pred, findings=(dataclasses.replace(pred.findings[0], tier="not validated"),
                                               *pred.findings[1:]))
    folder = tmp_path / "job"
    folder.mkdir()
    save_prediction(Spool(tmp_path), folder, pred, bundle.identity())
    back, model = load_prediction(folder)
    key = lambda f: (f.label, f.tier, f.operating_point)  # noqa: E731  (probabilities are rounded)
    assert [key(f) for f in back.findings] == [key(f) for f in pred.findings] and model == bundle.identity()
    assert {f.label: f.operating_point for f in back.findings}["Edema"] == "f1"
    assert results_key(model) == results_key(bundle.identity()) != model.digest
