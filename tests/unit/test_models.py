"""Encoder loading, box head, BL-TTA against its closed form, calibration, bundle round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model_training import train as train_mod
from model_training.split import split_patients
from model_training.train import VARIANTS, FeatureSet, calibrate, fit_head, macro_auroc, out_of_fold
from models import encoder as enc
from models.boxhead import BoxHead, ood_score, pool_features
from models.bundle import BundleError, load_bundle, write_bundle
from models.calibration import fit_calibration, fit_thresholds, tier
from models.labels import LABELS
from models.predictor import Predictor, to_input
from models.preprocess import resize_for_model
from models.tta import bl_tta, box_samples, linear_limit


@pytest.fixture(scope="module")
def tiny():
    return enc.build_encoder("tiny")


def test_tiny_encoder_outputs_fixed_dict(tiny):
    out = tiny(torch.zeros(2, 3, 128, 128))
    assert set(out) == {"vision_features", "vision_pos_enc", "backbone_fpn"}
    assert out["vision_features"].shape == (2, 32, 8, 8)


def test_checkpoint_round_trip_is_strict(tiny, tmp_path):
    path = tmp_path / "MedSAM2_like.pt"
    digest = enc.save_checkpoint(tiny, path)
    blob = torch.load(path, weights_only=True)
    assert all(k.startswith("image_encoder.") for k in blob["model"])
    other = enc.build_encoder("tiny", seed=1)
    assert enc.load_checkpoint(other, path) == digest
    for a, b in zip(tiny.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    # A checkpoint missing one tensor, or of another graph, is refused with the reason.
    state = dict(blob["model"])
    state.pop(next(iter(state)))
    torch.save({"model": state}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="1 missing"):
        enc.load_checkpoint(other, tmp_path / "partial.pt")
    torch.save({"state_dict": {}}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="not a MedSAM2 checkpoint"):
        enc.load_checkpoint(other, tmp_path / "wrong.pt")


@pytest.mark.slow
def test_medsam2_512_graph_has_the_documented_layout(tmp_path):
    e = enc.build_encoder("t512")
    assert sum(p.numel() for p in e.parameters()) == 27_219_136
    assert len(enc.encoder_state(e)) == 162
    with torch.no_grad():
        out = e(torch.zeros(1, 3, 512, 512))
    assert out["vision_features"].shape == (1, 256, 32, 32)
    assert [tuple(f.shape[1:]) for f in out["backbone_fpn"]] == [(256, 128, 128), (256, 64, 64), (256, 32, 32)]


def test_bl_tta_converges_to_the_linear_closed_form():
    torch.manual_seed(0)
    d = 64
    head = BoxHead(in_dim=8, latent_dim=d, hidden=16)
    c = torch.randn(16, d)
    r = torch.rand(16, d) * 0.8
    limit = linear_limit(head.classifier.weight, head.classifier.bias, c, r)
    errors = {}
    with torch.no_grad():
        for n in (1, 8, 64, 4096):
            p = bl_tta(head, c, r, box_samples(n, d), torch.ones(len(LABELS)), torch.zeros(len(LABELS))).mean(1)
            errors[n] = (p - limit).abs().mean().item()
    assert errors[4096] < 0.01  # the probit approximation itself is accurate to about this
    assert errors[64] <= errors[1]
    assert errors[8] < errors[1]


def test_box_samples_are_antithetic_and_deterministic():
    s = box_samples(8, 32)
    assert torch.allclose(s[:4], -s[4:])
    assert torch.equal(s, box_samples(8, 32))
    assert s.abs().max() <= 1
    assert torch.equal(box_samples(1, 4), torch.zeros(1, 4))


def test_pool_features_and_ood_score():
    vf = torch.randn(3, 4, 8, 8)
    assert pool_features(vf).shape == (3, 20)
    assert ood_score(torch.full((2, 5), 0.5)).allclose(torch.log(torch.tensor([0.5, 0.5])))


def test_temperature_undoes_overconfidence():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 2, (2000, 1))
    y = (rng.random((2000, 1)) < 1 / (1 + np.exp(-true_logit))).astype(float)
    logits = (true_logit * 4)[:, None, :]  # 4x overconfident
    t, b = fit_calibration(logits, y)
    assert 3.0 < t[0] < 5.5 and abs(b[0]) <= 0.2  # overconfident, not shifted: no bias to speak of
    thr = fit_thresholds(1 / (1 + np.exp(-logits[:, 0] / t)), y)
    assert 0.2 < thr[0] < 0.8
    assert tier(0.97, 0.5, 0.01) == "high" and tier(0.52, 0.5, 0.01) == "low"


def test_temperature_prior_pulls_a_thin_label_to_the_pooled_fit_and_leaves_a_rich_one_alone():
    # Label 0: 2000 images, 3x overconfident. Label 1: 85 images, 2 positives that happen to
    # score high: alone it takes a very sharp temperature; with the prior it stays near label 0's.
    rng = np.random.default_rng(1)
    n = 2000
    true = rng.normal(0, 2, n)
    y = np.full((n, 2), np.nan)
    y[:, 0] = rng.random(n) < 1 / (1 + np.exp(-true))
    logits = np.zeros((n, 1, 2))
    logits[:, 0, 0] = 3 * true
    y[:85, 1] = 0
    y[:2, 1] = 1
    logits[:85, 0, 1] = np.r_[4.0, 3.5, rng.normal(-3, 1.5, 83)]
    alone, _ = fit_calibration(logits, y, prior_sd=None, bias_sd=0.0)
    shrunk, _ = fit_calibration(logits, y, bias_sd=0.0)
    assert alone[1] < 0.6 and 2.4 < alone[0] < 3.8  # the thin label alone: sharpened
    assert abs(np.log(shrunk[1] / shrunk[0])) < abs(np.log(alone[1] / shrunk[0])) - 0.5  # pulled towards the pool
    assert abs(np.log(shrunk[0] / alone[0])) < 0.06  # 2000 images outweigh the prior (one grid step is 0.054)
    one_class = np.where(np.isnan(y), np.nan, 0.0)
    one_class[:, 0] = y[:, 0]
    t, b = fit_calibration(logits, one_class)
    assert t[1] == t[0] and b[1] == 0.0  # nothing to fit: the pool, and no bias


def test_bias_moves_the_decision_a_temperature_cannot():
    # Logits 1.5 too high on held-out images (the head has seen its training labels): sign(l / T)
    # is sign(l) for every T, so only the bias brings the p >= 0.5 calls back to the right ones.
    rng = np.random.default_rng(2)
    n = 3000
    true = rng.normal(-1.0, 1.5, (n, 1))
    y = (rng.random((n, 1)) < 1 / (1 + np.exp(-true))).astype(float)
    logits = (true + 1.5)[:, None, :]
    t_only, b_none = fit_calibration(logits, y, bias_sd=0.0)
    t, b = fit_calibration(logits, y)
    assert b_none[0] == 0.0 and -1.8 <= b[0] <= -1.2 and 0.8 < t[0] < 1.25

    def acc(t_, b_):
        return float(((1 / (1 + np.exp(-(logits[:, 0] / t_ + b_))) >= 0.5) == (y == 1)).mean())

    assert acc(t, b) > acc(t_only, 0.0) + 0.03  # calls present at logit >= 0 were too many
    # a thin label (8 images) keeps its bias near the prior's 0
    thin = np.full((n, 2), np.nan)
    thin[:, 0] = y[:, 0]
    thin[:8, 1] = [1, 0, 0, 0, 1, 0, 0, 0]
    _, b2 = fit_calibration(np.concatenate([logits, logits], axis=2), thin)
    assert abs(b2[1]) < abs(b[0])


def _synthetic_features(n=300, d=24, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, len(LABELS))) < 0.3).astype(float)
    w = rng.normal(size=(len(LABELS), d))
    x = y @ w + rng.normal(0, 1.0, (n, d))
    return FeatureSet(x.astype(np.float32), y, np.array([f"p{i // 2}" for i in range(n)]),
                      (x + rng.normal(0, 0.3, x.shape)).astype(np.float32))


@pytest.mark.parametrize("name", ["B0", "B3", "B4", "B5"])
def test_heads_learn_separable_features(name):
    fs = _synthetic_features()
    tr, va, te = split_patients(fs.patients, seed=0)
    assert not set(fs.patients[tr]) & set(fs.patients[te])
    head = fit_head(FeatureSet(fs.x[tr], fs.y[tr], fs.patients[tr], fs.x_shift[tr]), VARIANTS[name], seed=0, epochs=30)
    cal = calibrate(head, VARIANTS[name], FeatureSet(fs.x[va], fs.y[va], fs.patients[va]))
    assert cal["validation"]["macro_auroc"] > 0.85
    assert cal["validation"]["labels_scored"] == len(LABELS)


def test_out_of_fold_scores_every_training_image_with_a_head_that_never_saw_its_patient(monkeypatch):
    fs = _synthetic_features(n=120)
    trained_on: dict[int, set] = {}
    scored: list[tuple[set, np.ndarray]] = []
    real_fit, real_score = train_mod.fit_head, train_mod.score

    def spy_fit(sub, variant, seed, **kw):
        head = real_fit(sub, variant, seed, **kw)
        trained_on[id(head)] = set(sub.patients)
        return head

    def spy_score(head, x, n, **kw):
        rows = np.flatnonzero((fs.x[:, None, :] == x[None]).all(-1).any(1))
        scored.append((trained_on[id(head)], rows))
        return real_score(head, x, n, **kw)

    monkeypatch.setattr(train_mod, "fit_head", spy_fit)
    monkeypatch.setattr(train_mod, "score", spy_score)
    logits, y = out_of_fold(fs, VARIANTS["B5"], seed=3, epochs=2)
    assert logits.shape == (120, VARIANTS["B5"].tta_n, len(LABELS)) and np.array_equal(y, fs.y, equal_nan=True)
    assert len(scored) == train_mod.THRESHOLD_FOLDS
    rows = np.concatenate([r for _, r in scored])
    assert sorted(rows) == list(range(120))  # every image once
    for seen, r in scored:
        assert not seen & set(fs.patients[r])  # never by a head trained on its patient
        assert len(seen) + len(set(fs.patients[r])) == len(set(fs.patients))


def test_calibrate_fits_thresholds_on_validation_and_the_out_of_fold_scores():
    fs = _synthetic_features()
    tr, va, _ = split_patients(fs.patients, seed=0)
    train, val = fs.subset(tr), fs.subset(va)
    head = fit_head(train, VARIANTS["B5"], seed=0, epochs=5)
    alone = calibrate(head, VARIANTS["B5"], val)
    pooled = calibrate(head, VARIANTS["B5"], val, held_out=out_of_fold(train, VARIANTS["B5"], seed=0, epochs=5))
    roc_alone, roc = alone["operating_points"]["validation_roc"], pooled["operating_points"]["validation_roc"]
    for i, k in enumerate(LABELS):
        assert roc_alone[k]["n_pos"] == int(np.nansum(val.y[:, i]))
        assert roc[k]["n_pos"] == int(np.nansum(val.y[:, i]) + np.nansum(train.y[:, i]))
    assert "out-of-fold" in pooled["operating_points"]["fitted_on"]
    # the calibration is the bundle head's own, on validation: the out-of-fold heads saw less data
    assert pooled["temperatures"] == alone["temperatures"] and pooled["biases"] == alone["biases"]
    # the validation figures stay those of the bundle's head on the validation split
    assert pooled["validation"]["n_images"] == alone["validation"]["n_images"] == int(va.sum())


def test_macro_auroc_skips_single_class_labels():
    y = np.array([[1, 0], [0, 0], [1, 0], [0, np.nan]], dtype=float)
    p = np.array([[0.9, 0.1], [0.1, 0.2], [0.8, 0.3], [0.2, 0.4]])
    assert macro_auroc(y, p) == (1.0, 1)


def test_bundle_round_trip_and_tamper_detection(tiny, tmp_path):
    fs = _synthetic_features(d=160)
    head = fit_head(fs, VARIANTS["B5"], seed=0, epochs=2)
    cal = calibrate(head, VARIANTS["B5"], fs)
    card = {"name": "t", "version": "0", "synthetic_training": True, "training_data": "synthetic features",
            "intended_use": "tests", "encoder": {"spec": "tiny", "image_size": 128}, **cal}
    written = write_bundle(tmp_path / "b", card, tiny, head)
    b = load_bundle(tmp_path / "b")
    assert b.digest == written["digest"] and b.identity().synthetic_training
    predictor = Predictor(b, device="cpu")
    image = np.random.default_rng(0).random((300, 250)).astype(np.float32)
    preds = predictor.predict([image] * 2)
    assert len(preds) == 2 and len(preds[0].findings) == len(LABELS)
    assert preds[0].to_json() == preds[1].to_json()  # deterministic
    # What a worker's decode processes return (Pillow's resize) gives the result of the decoded
    # image (torch's resize) to within float rounding.
    resized, full = predictor.predict([resize_for_model(image, b.image_size), image])
    for f, g in zip(resized.findings, full.findings, strict=True):
        assert f.label == g.label and f.tier == g.tier
        assert abs(f.probability - g.probability) < 1e-4 and abs(f.spread - g.spread) < 1e-4
    assert np.allclose(resized.center, full.center, atol=1e-4) and abs(resized.ood_score - full.ood_score) < 1e-4
    assert preds[0].saliency and all(m.shape == (8, 8) for m in preds[0].saliency.values())
    assert all(0 <= f.probability <= 1 for f in preds[0].findings)
    # Altering the card or a weight file is caught.
    card_path = tmp_path / "b" / "model_card.json"
    body = json.loads(card_path.read_text())
    body["thresholds"]["Cardiomegaly"] = 0.01
    card_path.write_text(json.dumps(body))
    with pytest.raises(BundleError, match="altered"):
        load_bundle(tmp_path / "b")


def test_to_input_normalises_like_medsam2():
    x = to_input([np.ones((10, 20), np.float32)], 16)
    assert x.shape == (1, 3, 16, 16)
    assert torch.allclose(x[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_batched_grad_cam_equals_one_image_at_a_time():
    from models.saliency import grad_cam

    torch.manual_seed(0)
    head = BoxHead(in_dim=20, latent_dim=8, hidden=16).eval()
    vf = torch.randn(3, 4, 6, 6, requires_grad=True)
    logits = head.logits(head(pool_features(vf))[0])
    targets = [[2, 5], [7], [1, 3, 4]]
    together = grad_cam(vf, logits, targets)
    for b, t in enumerate(targets):
        v = vf[b:b + 1].detach().clone().requires_grad_(True)
        alone = grad_cam(v, head.logits(head(pool_features(v))[0]), [t])[0]
        assert together[b].keys() == alone.keys()
        for k in t:
            assert torch.allclose(together[b][k], alone[k], atol=1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the bf16 / channels_last path runs on a GPU host"))])
def test_predictor_and_feature_extractor_give_identical_features(tiny, tmp_path, device):
    """One encoder forward (models.encoder.forward): what a bundle and an index are fitted on is what
    a live query sees, on the CPU (float32) and on CUDA (bf16 autocast, channels_last) alike."""
    from models.features import FeatureExtractor

    fs = _synthetic_features(d=160)
    head = fit_head(fs, VARIANTS["B4"], seed=0, epochs=1)
    card = {"name": "t", "version": "0", "synthetic_training": True, "training_data": "synthetic features",
            "intended_use": "tests", "encoder": {"spec": "tiny", "image_size": 128}, **calibrate(head, VARIANTS["B4"], fs)}
    write_bundle(tmp_path / "b", card, tiny, head)
    b = load_bundle(tmp_path / "b")
    rng = np.random.default_rng(5)
    images = [rng.random((170, 150)).astype(np.float32) for _ in range(3)]
    x = to_input(images, b.image_size)
    predictor = Predictor(b, device=device)
    live = pool_features(predictor.encode(x)).cpu()
    extractor = FeatureExtractor(b.encoder, b.image_size, "digest", tmp_path / "cache", device=device)
    assert extractor.precision == predictor.precision == ("bf16" if device == "cuda" else "fp32")
    assert torch.equal(extractor.pooled(x).cpu(), live)
    # The cache stores float16 and every read goes through it: a miss and a hit give the same rows.
    items = [(f"img{i}", lambda im=im: im) for i, im in enumerate(images)]
    stored = extractor(iter(items), len(items), "features")
    np.testing.assert_array_equal(stored, live.numpy().astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(extractor(iter(items), len(items), "features"), stored)
