"""The evaluate engine end to end on a tiny run, the train and model-pull commands, data sources, B1."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import resource
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from model_training import data as data_mod
from model_training.evaluate import EvalConfig, run_evaluation
from model_training.split import split_patients
from model_training.train import VARIANTS, FeatureSet, calibrate, fit_head, text_features, uniform_box_kl
from models import encoder as enc
from models import operating_points
from models.bundle import load_bundle
from models.features import FeatureExtractor
from models.labels import LABELS
from models.pull import PullError, pull
from worker.cli import app

ALL = ("B0", "B1", "B3", "B4", "B5")


@pytest.fixture(scope="module")
def tiny_extractor(tmp_path_factory):
    e = enc.build_encoder("tiny")
    return FeatureExtractor(e, 128, "tiny-test-encoder", tmp_path_factory.mktemp("features"))


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def test_evaluate_end_to_end_on_a_tiny_run(tmp_path, tiny_extractor):
    cpu0 = _cpu_s()  # CPU time, not wall time: the suite shares a busy 2-core machine
    ds = data_mod.load_dataset("phantoms:40:1", size=192, n_ood=6)
    cfg = EvalConfig(seeds=2, variants=ALL, epochs=4, shift_pair_fraction=0.5)
    report = run_evaluation(ds, tiny_extractor, tmp_path, {"spec": "tiny", "image_size": 128, "weights": "random"}, cfg,
                            now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert _cpu_s() - cpu0 < 60
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m == json.loads(json.dumps(report))
    assert set(m["variants"]) == set(ALL)
    for name, v in m["variants"].items():
        assert set(v["macro_auroc"]) >= {"mean", "sd", "best", "labels_scored"}
        for key in ("elementwise_accuracy", "brier", "ece", "shift_drop_at_2"):
            assert set(v[key]) >= {"mean", "sd", "best"}, (name, key)
        assert set(v["ood_auroc"]) == {"lateral", "nonchest", "device_shift_2x"}
        assert v["ood_auroc"]["lateral"]["positive_class"] == "out-of-distribution"
        assert set(v["shift_auroc"]) == {"0.0", "0.5", "1.0", "1.5", "2.0"}
        assert len(v["seeds"]) == 2 and not any(k.startswith("_") for k in v["seeds"][0])
        assert ("bl_tta" in v) == VARIANTS[name].box
        # accuracy and per-label sensitivity / specificity at the bundle's own thresholds, criterion named
        assert 0 <= v["elementwise_accuracy"]["mean"] <= 1
        # the overall figure is the cell-weighted mix of the urgent points' and the other labels' accuracy
        for run in v["seeds"]:
            lo, hi = sorted((run["elementwise_accuracy_urgent"], run["elementwise_accuracy_other"]))
            assert lo - 1e-12 <= run["elementwise_accuracy"] <= hi + 1e-12, name
        # an urgent label keeps its high-sensitivity point unless the held-out images could not carry it
        ops = v["operating_points"]
        assert v["criteria"].startswith("expected_accuracy") and set(ops) == set(LABELS)
        for k in operating_points.URGENT_LABELS:
            kept = k not in v["not_estimable"]
            assert ops[k]["criterion"].startswith("sensitivity:0.9") == kept and (k in v["criteria"]) == kept, (name, k)
        assert set(ops["Cardiomegaly"]) >= {"criterion", "threshold", "sensitivity", "specificity", "ppv",
                                            "counts_over_seeds"}
    assert set(m["variants"]["B5"]["bl_tta"]) == {"1", "8", "64"}
    assert m["variants"]["B0"]["ood_score"].startswith("mean predictive entropy")
    assert m["variants"]["B5"]["ood_score"] == "mean log radius of the box"
    assert m["data"]["n_train"] + m["data"]["n_val"] + m["data"]["n_test"] == 40
    assert "B2" in m["not_measured"]
    table = (tmp_path / "table.md").read_text()
    assert "| **B5 full" in table and "BL-TTA" in table and "B2 Bootstrapping-style" in table
    assert "| acc. urgent labels | acc. other labels |" in table
    assert "| thresholds by |" in table and "Sensitivity / specificity per label" in table
    assert "| Pneumothorax |" in table
    gave_way = m["variants"]["B5"]["not_estimable"]
    assert all(f"- {k}: {why}" in table for k, why in gave_way.items())
    for png in ("roc_per_label.png", "reliability.png", "auroc_vs_shift.png", "radius_in_vs_out.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_command_writes_a_loadable_bundle_that_says_how_it_was_built(tmp_path):
    out = tmp_path / "b1"
    res = CliRunner().invoke(app, ["train", "--data", "phantoms:30:2", "--variant", "B1", "--seed", "1", "--out",
                                   str(out), "--encoder", "tiny", "--render-size", "192", "--epochs", "3",
                                   "--cache", str(tmp_path / "cache"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    b = load_bundle(out)
    assert b.card["variant"] == "B1" and b.card["variant_description"] == VARIANTS["B1"].description
    assert "InfoNCE" in b.card["training"]["contrastive"] and b.card["training"]["seed"] == 1
    assert b.card["synthetic_training"] is True and "random initialisation" in b.card["encoder"]["weights"]
    assert "shift_auroc" in b.card["metrics"]["test"] and b.head.box is False


def test_model_pull_fails_cleanly_offline_with_instructions(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dest = tmp_path / "w" / "MedSAM2_latest.pt"
    res = CliRunner().invoke(app, ["model", "pull", "--dest", str(dest)])
    assert res.exit_code == 2
    assert "cannot reach https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt" in res.output
    assert str(dest) in res.output and "encoder_checkpoint" in res.output
    assert not dest.exists() and not dest.parent.exists()


class _Response(io.BytesIO):
    def __init__(self, body: bytes, headers: dict):
        super().__init__(body)
        self.headers = headers


def test_model_pull_verifies_the_digest_before_the_file_appears(tmp_path):
    body = b"not really a checkpoint" * 1000
    good = hashlib.sha256(body).hexdigest()
    dest = tmp_path / "MedSAM2_latest.pt"

    got = pull(dest, opener=lambda req, timeout: _Response(body, {"X-Linked-Etag": f'"{good}"', "Content-Length": str(len(body))}))
    assert got.downloaded and got.verified_against == "huggingface" and dest.read_bytes() == body
    again = pull(dest, sha256=good, opener=lambda *a, **k: pytest.fail("no download when the file is intact"))
    assert not again.downloaded and again.verified_against == "user"

    other = tmp_path / "other.pt"
    with pytest.raises(PullError, match="differs from the expected"):
        pull(other, sha256="0" * 64, opener=lambda req, timeout: _Response(body, {}))
    assert not other.exists() and not (tmp_path / "other.pt.part").exists()
    with pytest.raises(PullError, match="states no sha256"):
        pull(other, opener=lambda req, timeout: _Response(body, {"ETag": '"abc"'}))
    with pytest.raises(PullError, match="not a 64-digit"):
        pull(other, sha256="xyz")


def test_phantom_items_keys_shifts_and_the_attenuation_shortcut():
    a = data_mod.phantom_items(3, 4, 128)
    b = data_mod.phantom_items(3, 4, 128)
    assert [i.key for i in a] == [i.key for i in b]
    s1, s2 = a[0].shifted(1.0), a[0].shifted(2.0)
    assert len({a[0].key, s1.key, s2.key}) == 3 and a[0].shifted(0) is a[0]
    img0, img2 = a[0].load(), s2.load()
    assert img0.dtype == np.float32 and 0 <= img0.min() and img0.max() <= 1
    assert np.abs(img0 - img2).mean() > 0.01  # a shift changes the picture
    assert np.array_equal(s2.load(), img2)  # and is deterministic
    np.testing.assert_array_equal(a[0].labels, b[0].labels)


def test_manifest_dataset_from_a_phantoms_folder_masks_uncertain_and_detects_synthetic(tmp_path):
    from phantoms import generate

    man = generate(8, tmp_path / "ph", seed=5, size=128)
    ds = data_mod.load_dataset(str(man.parent))
    assert len(ds.items) == 8 and ds.synthetic and ds.items[0].report
    with man.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    y = ds.labels()
    for row, labels in zip(rows, y):  # 1 / 0 kept; -1 (hedged in the report) masked
        for k, v in zip(LABELS, labels):
            assert (np.isnan(v) and row[k] == "-1") or float(row[k]) == v
    shifted = ds.items[0].shifted(1.0, salt=3)
    assert shifted.key != ds.items[0].key and shifted.load().shape == ds.items[0].load().shape
    with pytest.raises(FileNotFoundError, match="manifest.csv"):
        data_mod.load_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="phantoms:N"):
        data_mod.load_dataset("phantoms:many")


def test_feature_cache_hit_equals_miss_and_is_keyed_by_size_and_precision(tmp_path):
    e = enc.build_encoder("tiny")
    imgs = {f"k{i}": np.random.default_rng(i).random((64, 80)).astype(np.float32) for i in range(3)}
    items = [(k, (lambda v=v: v)) for k, v in imgs.items()]
    fx = FeatureExtractor(e, 128, "d" * 64, tmp_path, batch_size=2)
    first = fx(items, 3, "t")
    again = FeatureExtractor(e, 128, "d" * 64, tmp_path)
    second = again([(k, lambda: pytest.fail("cache miss")) for k in imgs], 3, "t")
    np.testing.assert_array_equal(first, second)
    assert fx.encoded == 3 and again.encoded == 0
    assert {p.name for p in tmp_path.iterdir()} == {"dddddddddddddddd-128px-fp32"}
    with pytest.raises(ValueError, match="precision"):
        FeatureExtractor(e, 128, "d" * 64, None, precision="fp8")


def _with_reports(n=300, d=24, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < 0.3).astype(float)
    x = y @ rng.normal(size=(len(LABELS), d)) + rng.normal(0, 1.0, (n, d))
    reports = ["FINDINGS: " + " ".join(("" if v else "no ") + k.lower() + "." for k, v in zip(LABELS, row)) for row in y]
    return x.astype(np.float32), y, np.array([f"p{i // 2}" for i in range(n)]), reports


def test_b1_aligns_images_with_reports_and_learns():
    x, y, pats, reports = _with_reports()
    tr, va, _ = split_patients(pats, seed=0)
    text, rid = text_features([r for r, m in zip(reports, tr) if m])
    assert text.shape[0] == tr.sum() and text.shape[1] > 10
    head = fit_head(FeatureSet(x[tr], y[tr], pats[tr], None, text, rid), VARIANTS["B1"], seed=0, epochs=30)
    cal = calibrate(head, VARIANTS["B1"], FeatureSet(x[va], y[va], pats[va]))
    assert cal["validation"]["macro_auroc"] > 0.85 and "no box" in cal["ood"]["note"]
    with pytest.raises(ValueError, match="no report text"):
        fit_head(FeatureSet(x[tr], y[tr], pats[tr]), VARIANTS["B1"], seed=0, epochs=1)


def test_uniform_box_kl_matches_a_monte_carlo_estimate():
    c, r = torch.tensor([[0.3, -1.0]]), torch.tensor([[0.5, 2.0]])
    u = torch.rand(200_000, 2) * 2 - 1
    z = c + r * u
    log_q = -torch.log(2 * r)
    log_p = -0.5 * z**2 - 0.5 * np.log(2 * np.pi)
    mc = (log_q - log_p).mean(0)
    assert torch.allclose(uniform_box_kl(c, r)[0], mc, atol=0.02)


SHARED_OPENI = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "data" / "openi"


@pytest.mark.skipif(not (SHARED_OPENI / "openi-reports-dev.tgz").exists(), reason="needs ../shared/data/openi")
def test_openi_spec_reads_real_reports_with_generated_images_and_keeps_the_export_split(tmp_path):
    import tarfile

    from PIL import Image

    from model_training.openi import read_reports

    rep_dir = tmp_path / "ecgen-radiology"
    with tarfile.open(SHARED_OPENI / "openi-reports-dev.tgz") as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(".xml")][:12]
        tf.extractall(tmp_path, members=members, filter="data")
    reports = read_reports(rep_dir)
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for r in reports:
        for image_id in r.images:  # the NLM PNG release names: CXR<n>_IM-....png
            Image.fromarray((rng.random((64, 64)) * 255).astype(np.uint8)).save(img_dir / f"{image_id}.png")
    spec = f"openi:{rep_dir},{img_dir},{SHARED_OPENI / 'nlmcxr_dicom_metadata.csv.gz'}"
    ds = data_mod.load_dataset(spec, workdir=tmp_path / "work")
    assert ds.name == "openi" and not ds.synthetic and 0 < len(ds.items) <= len(reports)
    assert all(it.patient_id.startswith("openi-") for it in ds.items) and ds.items[0].report
    assert set(ds.split) <= {"train", "val", "test"}
    tr, va, te = ds.split_masks(seed=123)  # the export's split wins over a seed given later
    np.testing.assert_array_equal(tr, ds.split == "train")
    img = ds.items[0].load()
    assert img.shape == (64, 64) and img.dtype == np.float32
    assert ds.items[0].shifted(1.0).load().shape == (64, 64)
