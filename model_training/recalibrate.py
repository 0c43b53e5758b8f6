"""Local recalibration: new per-label temperatures, biases and thresholds from a site's validated studies,
measured on patients it was not fitted on, written as a new bundle version beside the old one.

The weights stay as they are; only what the card says about them changes. Per-sample BL-TTA
logits are recomputed from the box each result kept in the spool (center and radius) with the
bundle's own head and sample points, so nothing is run through the encoder again. Temperatures
and biases are fitted as at training (models.calibration.fit_calibration; the bias is what
follows a site's own prevalence) and thresholds at the bundle's own
criteria (models.operating_points.fit with the card's criteria), on one part of the patients;
ECE, Brier and AUROC before and after are reported on the rest. The node never switches to the
new bundle by itself: an administrator points [model] bundle at it.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from model_training import metrics
from model_training.local_validation import Cases
from model_training.measure import Scores
from model_training.split import split_patients
from models import drift
from models import operating_points as op
from models.bundle import CARD, Bundle, card_digest, load_bundle
from models.calibration import fit_calibration
from models.labels import LABELS

DEFAULT_HELD_FRACTION = 0.5


class RecalibrationError(ValueError):
    """Too few local studies, or studies without the box a recalibration needs."""


def box_logits(bundle: Bundle, center: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """(B, N, L) per-sample logits before temperature at the bundle's BL-TTA points in each box."""
    with torch.no_grad():
        c, r = torch.as_tensor(center, dtype=torch.float32), torch.as_tensor(radius, dtype=torch.float32)
        z = c[:, None] + r[:, None] * bundle.samples[None]
        return bundle.head.logits(z).numpy().astype(np.float64)


def held_figures(y: np.ndarray, p: np.ndarray) -> dict:
    auroc, scored = metrics.macro_auroc(y, p)
    per = metrics.per_label_auroc(y, p)
    return {"ece": metrics.ece(y, p), "brier": metrics.brier(y, p), "macro_auroc": None if np.isnan(auroc) else auroc,
            "labels_scored": scored, "per_label_auroc": per,
            "per_label_ece": {k: metrics.ece(y[:, [i]], p[:, [i]]) for i, k in enumerate(LABELS)}}


def recalibrate(bundle: Bundle, cases: Cases, out: Path, *, version: str, data: Mapping, seed: int = 0,
                held_fraction: float = DEFAULT_HELD_FRACTION, now: dt.datetime | None = None) -> dict:
    """Fit on one patient-level part of ``cases``, measure on the rest, write the new bundle to
    ``out`` (a new folder) and return what was done (recalibration.json; the "_held" key holds the
    held-back part's labels and probabilities before and after, for plots).

    data: what the local data were (worker.validation.Gathered.summary: counts, date range, calling
    AEs, devices), recorded in the new card. Raises RecalibrationError when either part is too
    small, when a result kept no box, or when ``out`` holds something already.
    """
    if len(cases) < 2 * op.MIN_KNOWN:
        raise RecalibrationError(f"{len(cases)} validated images are too few to recalibrate (at least "
                                 f"{2 * op.MIN_KNOWN}); wait for more reports, or widen --since")
    if cases.center is None or cases.radius is None:
        raise RecalibrationError("the validated results kept no box (center, radius); they cannot be rescored")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RecalibrationError(f"{out}: not empty; give a new folder for the new bundle version")
    fit_m, _, held_m = split_patients(cases.cluster, seed, (1 - held_fraction, 0.0, held_fraction))
    if fit_m.sum() < op.MIN_KNOWN or held_m.sum() < op.MIN_KNOWN:
        raise RecalibrationError(f"{len(cases)} validated images ({int(fit_m.sum())} to fit, {int(held_m.sum())} held "
                                 "back) are too few to recalibrate; wait for more reports")
    card = bundle.card
    logits = box_logits(bundle, cases.center, cases.radius)
    t0, b0 = bundle.temperature.numpy().astype(np.float64), bundle.bias.numpy().astype(np.float64)
    thr0 = np.array([float(card["thresholds"][k]) for k in LABELS])
    before = Scores(logits, np.zeros(len(cases))).probabilities(t0, b0)
    t1, b1 = fit_calibration(logits[fit_m], cases.y[fit_m])
    p_fit = Scores(logits[fit_m], np.zeros(int(fit_m.sum()))).probabilities(t1, b1)
    criteria = (card.get("operating_points") or {}).get("criteria") or op.default_criteria()
    ops = op.fit(p_fit, cases.y[fit_m], criteria,
                 fitted_on="the site's own validated studies (fit part), calibrated probabilities")
    thr1 = np.array([ops["thresholds"][k] for k in LABELS])
    after = Scores(logits, np.zeros(len(cases))).probabilities(t1, b1)
    y_h = cases.y[held_m]
    result = {
        "from": {"name": card["name"], "version": card["version"], "digest": card["digest"], "path": str(bundle.root)},
        "split": {"unit": "patient (keyed hash), else study", "seed": seed, "held_fraction": held_fraction},
        "fit": {"images": int(fit_m.sum()), "patients": int(len(np.unique(cases.cluster[fit_m])))},
        "held": {"images": int(held_m.sum()), "patients": int(len(np.unique(cases.cluster[held_m]))),
                 "before": held_figures(y_h, before[held_m]), "after": held_figures(y_h, after[held_m])},
        # how far the rescored probabilities are from what the results said: ~0 unless a result came
        # from other temperatures (it would not be this bundle's)
        "rescoring_max_abs_difference": float(np.abs(before - cases.p).max()) if len(cases) else 0.0,
        "labels": {k: {"temperature": [float(t0[i]), float(t1[i])], "bias": [float(b0[i]), float(b1[i])],
                       "threshold": [float(thr0[i]), float(thr1[i])],
                       "criterion": str(criteria.get(k, "")),
                       "note": ops["operating_points"]["fallback"].get(k) or ops["operating_points"]["thin"].get(k, "")}
                   for i, k in enumerate(LABELS)},
    }
    new = _new_card(card, t1, b1, ops, result, data, version, now or dt.datetime.now(dt.UTC),
                    present=after[fit_m] >= thr1, ood=cases.ood[fit_m], mean_radius=cases.radius[fit_m].mean(1))
    _write(bundle.root, out, new)
    load_bundle(out)  # the new version loads and verifies, or this raises before anyone is told to use it
    result["to"] = {"name": new["name"], "version": new["version"], "digest": new["digest"], "path": str(out)}
    # arrays for the plots, not for JSON (as model_training.measure's "_" keys)
    result["_held"] = {"y": y_h, "before": before[held_m], "after": after[held_m]}
    return result


def _new_card(card: Mapping, temperatures: np.ndarray, biases: np.ndarray, ops: Mapping, result: Mapping, data: Mapping, version: str,
              now: dt.datetime, present: np.ndarray, ood: np.ndarray, mean_radius: np.ndarray) -> dict:
    new = json.loads(json.dumps(card))  # a deep copy of plain JSON
    new["version"] = version
    new["created"] = now.isoformat(timespec="seconds")
    new["temperatures"] = dict(zip(LABELS, map(float, temperatures)))
    new["biases"] = dict(zip(LABELS, map(float, biases)))
    new["thresholds"] = {k: float(v) for k, v in ops["thresholds"].items()}
    new["operating_points"] = ops["operating_points"]
    new["drift"] = drift.reference(present, ood, mean_radius)
    new["local_recalibration"] = {
        "from": result["from"], "data": dict(data), "split": result["split"], "fit": result["fit"],
        "held": {"images": result["held"]["images"], "patients": result["held"]["patients"],
                 **{w: {m: result["held"][w][m] for m in ("ece", "brier", "macro_auroc")} for w in ("before", "after")}},
        "reference": "first readers' reports (ris.second_read.ReportLabels.truth)",
        "changed": "temperatures, biases, thresholds, operating points and the drift range; the weights are the same files",
    }
    new["limitations"] = [*card.get("limitations", []),
                          f"Recalibrated on local studies ({result['fit']['images']} images) from version "
                          f"{card['version']}; metrics.test are that version's test figures, before recalibration."]
    new["digest"] = card_digest(new)
    return new


def _write(src: Path, out: Path, card: Mapping) -> None:
    """The old bundle's weight files (unchanged, so their digests hold) and the new card, card last."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (card["encoder"]["checkpoint"], card["head"]["file"]):
        shutil.copy2(Path(src) / name, out / name)
    tmp = out / (CARD + ".tmp")
    tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / CARD)
