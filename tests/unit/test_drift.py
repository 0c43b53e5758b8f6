"""Drift figures (models/drift.py) on synthetic numbers, the card's validation range, the per-site
counters and the range the HTTP app exports from the card."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from prometheus_client import REGISTRY

from models import drift
from models.labels import LABELS
from models.prediction import Finding, Prediction

DAY = dt.datetime(2026, 11, 28, tzinfo=dt.UTC).timestamp()


def _validation(n: int = 400, seed: int = 1):
    rng = np.random.default_rng(seed)
    rates = np.linspace(0.0, 0.5, len(LABELS))  # "No Finding" never present on this split
    present = rng.random((n, len(LABELS))) < rates
    ood = rng.random(n) < 0.01
    radius = rng.normal(0.1, 0.01, n)
    return present, ood, radius


def test_the_range_holds_the_validation_figure_and_is_as_wide_as_a_day_of_images():
    present, ood, radius = _validation()
    ref = drift.reference(present, ood, radius, day_images=50, resamples=2000)
    for i, k in enumerate(LABELS):
        lo, hi = ref["positive_rate"][k]
        rate = present[:, i].mean()
        assert lo <= rate <= hi
        sd = np.sqrt(max(rate, 1 / 402) * (1 - rate) / 50)  # binomial sd of a 50-image day
        assert 2 * sd < hi - lo < 8 * sd, (k, lo, hi, sd)
    assert ref["positive_rate"]["No Finding"][0] == 0.0 < ref["positive_rate"]["No Finding"][1]  # not [0, 0]
    lo, hi = ref["mean_radius"]
    assert lo < radius.mean() < hi and hi - lo < 0.02
    assert ref["n_validation"] == 400 and ref["day_images"] == 50
    again = drift.reference(present, ood, radius, day_images=50, resamples=2000)
    assert again == ref  # seeded: the card is reproducible
    with pytest.raises(ValueError, match="n > 0"):
        drift.reference(present[:0], ood[:0], radius[:0])


def _records(site: str, day: float, n: int, present_every: int, ood_every: int, radius: float) -> list[dict]:
    return [{"time": day + 60 * i, "site": site, "present": ["Cardiomegaly"] if i % present_every == 0 else [],
             "out_of_distribution": i % ood_every == 0, "mean_radius": radius} for i in range(n)]


def test_daily_figures_per_site_and_utc_day():
    records = (_records("A", DAY, 60, 4, 30, 0.1) + _records("A", DAY + 86400, 8, 2, 100, 0.3)
               + _records("B", DAY + 3600, 60, 2, 3, 0.2))
    days = drift.daily(records)
    assert [(d.site, d.day, d.images) for d in days] == [("A", "2026-11-28", 60), ("A", "2026-11-29", 8),
                                                          ("B", "2026-11-28", 60)]
    a, a2, b = days
    assert a.positive_rate["Cardiomegaly"] == 15 / 60 and a.ood_rate == 2 / 60 and a.mean_radius == pytest.approx(0.1)
    assert b.positive_rate["Cardiomegaly"] == 30 / 60 and b.ood_rate == 20 / 60
    assert a.positive_rate["Edema"] == 0.0
    ref = {"day_images": 50, "positive_rate": {"Cardiomegaly": [0.1, 0.4]}, "ood_rate": [0.0, 0.06],
           "mean_radius": [0.08, 0.12]}
    out = drift.excursions(days, ref)
    # A's first day is inside; its second has too few images; B leaves every range
    assert [(e.site, e.statistic, e.label) for e in out] == [("B", "positive_rate", "Cardiomegaly"),
                                                             ("B", "ood_rate", ""), ("B", "mean_radius", "")]
    assert out[0].value == 0.5 and (out[0].low, out[0].high) == (0.1, 0.4)


def test_an_old_card_without_the_range_and_overridden_labels():
    with pytest.raises(drift.DriftReferenceMissing, match="rebuild the bundle"):
        drift.card_reference({"name": "old"})
    present, ood, radius = _validation(100)
    card = {"drift": drift.reference(present, ood, radius)}
    assert set(drift.card_reference(card)["positive_rate"]) == set(LABELS)
    assert "Cardiomegaly" not in drift.card_reference(card, ["Cardiomegaly"])["positive_rate"]
    everything = drift.card_reference(card, ["*"])
    assert everything["positive_rate"] == {} and everything["ood_rate"] == card["drift"]["ood_rate"]


def _prediction(present: set[str], ood: bool, radius: float) -> Prediction:
    findings = tuple(Finding(k, 0.9 if k in present else 0.1, 0.5, "low", 0.0) for k in LABELS)
    return Prediction(findings, ood_score=1.0 if ood else -1.0, ood_threshold=0.0, center=np.zeros(4),
                      radius=np.full(4, radius))


def test_the_per_site_counters():
    from dicom_node import metrics

    def value(name, **labels):
        return REGISTRY.get_sample_value(name, {"model": "d1f7c0ffee00", **labels}) or 0.0

    before = (value("medsam2_drift_images_total", calling_aet="SITE_X"),
              value("medsam2_drift_positive_total", calling_aet="SITE_X", label="Edema"),
              value("medsam2_drift_ood_total", calling_aet="SITE_X"), value("medsam2_drift_radius_total", calling_aet="SITE_X"))
    metrics.record_drift("d1f7c0ffee00" + "0" * 52, "SITE_X", _prediction({"Edema"}, True, 0.25))
    metrics.record_drift("d1f7c0ffee00" + "0" * 52, "SITE_X", _prediction(set(), False, 0.05))
    after = (value("medsam2_drift_images_total", calling_aet="SITE_X"),
             value("medsam2_drift_positive_total", calling_aet="SITE_X", label="Edema"),
             value("medsam2_drift_ood_total", calling_aet="SITE_X"), value("medsam2_drift_radius_total", calling_aet="SITE_X"))
    assert np.subtract(after, before) == pytest.approx([2, 1, 1, 0.3])
    assert value("medsam2_drift_positive_total", calling_aet="SITE_X", label="Fracture") == 0.0  # exists, at 0
    assert drift.image_figures(_prediction({"Edema"}, True, 0.25)) == {"present": ["Edema"], "out_of_distribution": True,
                                                                       "mean_radius": 0.25}


def test_a_new_bundle_carries_the_range_and_the_app_exports_it(tiny_bundle):
    from console.app import drift_range_metrics

    card = json.loads((tiny_bundle / "model_card.json").read_text())
    ref = card["drift"]
    assert set(ref["positive_rate"]) == set(LABELS) and ref["n_validation"] == card["validation"]["n_images"]
    assert all(lo <= ref["validation"]["positive_rate"][k] <= hi for k, (lo, hi) in ref["positive_rate"].items())
    got = {m.name: m for m in drift_range_metrics(card, "m", overridden=["Edema"])}
    assert got["medsam2_model_card_drift_recorded"].samples[0].value == 1.0
    lows = {(s.labels["statistic"], s.labels["label"]): s.value for s in got["medsam2_model_card_drift_low"].samples}
    assert lows[("mean_radius", "")] == ref["mean_radius"][0] and ("positive_rate", "Edema") not in lows
    assert len(lows) == len(LABELS) - 1 + 2
    assert got["medsam2_model_card_drift_day_images"].samples[0].value == ref["day_images"]
    old = {m.name: m for m in drift_range_metrics({"name": "old"}, "m")}
    assert list(old) == ["medsam2_model_card_drift_recorded"] and old[
        "medsam2_model_card_drift_recorded"].samples[0].value == 0.0


def test_the_console_drift_page(tmp_path, tiny_bundle):
    from fastapi.testclient import TestClient

    from dicom_node.audit import AuditLog
    from dicom_node.jobstore import JobStore
    from dicom_node.spool import Spool
    from tests.console_helpers import console_app, users_toml
    from tests.unit.test_console import _login
    from worker.pipeline import Context
    from worker.settings import load_settings

    card = json.loads((tiny_bundle / "model_card.json").read_text())
    ref = card["drift"]
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[paths]\nspool = "{tmp_path / "var"}"\n[model]\nbundle = "{tiny_bundle}"\n'
                   '[console]\nsession_secret = "s"\n' + users_toml())
    spool = tmp_path / "var"
    t = [DAY]
    audit = AuditLog(spool / "audit.jsonl", clock=lambda: t[0])
    ctx = Context(spool=Spool(spool), jobs=JobStore(spool / "jobs.sqlite"), audit=audit)
    high_radius = ref["mean_radius"][1] * 2
    for i in range(ref["day_images"]):  # one full day at SITE_B, every image out of range in radius
        t[0] = DAY + 60 * i
        audit.record("inferred", job=f"j{i}", calling_aet="SITE_B", present=[], out_of_distribution=False,
                     mean_radius=high_radius)
    t[0] = DAY + 86400
    audit.record("inferred", job="k", calling_aet="SITE_A", present=["Edema"], out_of_distribution=True,
                 mean_radius=ref["validation"]["mean_radius"])
    client = TestClient(console_app(load_settings(cfg), ctx=ctx, echo=lambda d: (True, ""), clock=lambda: DAY + 86400))
    _login(client, "viewer")
    got = client.get("/api/drift").json()
    assert [(d["site"], d["day"], d["images"]) for d in got["days"]] == [("SITE_A", "2026-11-29", 1),
                                                                          ("SITE_B", "2026-11-28", ref["day_images"])]
    # no label present all day: below the range of each label whose validation range starts above 0
    want = {("positive_rate", k) for k, (lo, _) in ref["positive_rate"].items() if lo > 0} | {("mean_radius", "")}
    want |= {("ood_rate", "")} if ref["ood_rate"][0] > 0 else set()  # nor flagged
    assert {(e["statistic"], e["label"]) for e in got["excursions"]} == want
    assert {e["site"] for e in got["excursions"]} == {"SITE_B"} and got["reference_missing"] is None
    assert [e["value"] for e in got["excursions"] if e["statistic"] == "mean_radius"] == [pytest.approx(high_radius)]
    page = client.get("/drift").text
    assert page.count("<svg") == 2 + len(LABELS) and 'data-figure="mean_radius"' in page and "SITE_B" in page


def test_a_device_shift_moves_the_drift_figures_out_of_the_validation_range(tiny_bundle, tmp_path):
    """The same phantom cases from the same devices at shift 0 and at twice the strongest training
    shift (phantoms/devices.py), and other cases at shift 0 as the control: the shifted site's
    mean radius and OOD rate leave the card's range, the unshifted sites' mean radius stays in it."""
    from models.bundle import load_bundle
    from models.predictor import Predictor
    from phantoms import generate
    from worker.decoding import model_input

    predictor = Predictor(load_bundle(tiny_bundle), device="cpu")
    ref = predictor.bundle.card["drift"]

    def day(site: str, seed: int, shift: float) -> drift.DayFigures:
        out = generate(24, tmp_path / site, seed=seed, shift=shift, size=256).parent
        images = [model_input(str(p), predictor.bundle.image_size) for p in sorted((out / "images").glob("*.dcm"))]
        records = [{"time": DAY, "site": site, **drift.image_figures(p)} for p in predictor.predict(images)]
        (figures,) = drift.daily(records)
        return figures

    same, control, shifted = day("A", 21, 0.0), day("A2", 22, 0.0), day("B", 21, 2.0)
    for d in (same, control):  # (the tiny bundle's OOD range, from 8 validation images, is too coarse to hold them to)
        assert ref["mean_radius"][0] <= d.mean_radius <= ref["mean_radius"][1], d
    assert shifted.mean_radius > ref["mean_radius"][1] and shifted.ood_rate > ref["ood_rate"][1], shifted
    assert shifted.ood_rate > max(same.ood_rate, control.ood_rate)
    assert shifted.mean_radius - same.mean_radius > 2 * abs(control.mean_radius - same.mean_radius)
    moved = sum(abs(shifted.positive_rate[k] - same.positive_rate[k]) for k in LABELS)
    assert moved > sum(abs(control.positive_rate[k] - same.positive_rate[k]) for k in LABELS)
