"""Drift: what a site's images do to the model, day by day, against the range seen at validation.

Three figures per site (calling AE title) and UTC day: the share of images with each label
present, the share flagged out of distribution, and the mean box radius (mean over the latent
dimensions of r, averaged over the day's images). The model card holds the range each figure
took over day-sized resamples of the validation split (:func:`reference`, written by
training.train.calibrate); a day whose figure leaves it is an excursion (:func:`excursions`).
Plain functions of numbers: the console (console/data.py) and the tests call them, the
Prometheus counters (dicom_node.metrics.record_drift) and alert rule (deploy/prometheus) do the
same in PromQL.

The range is that of the bundle's own thresholds; a site's operating point override
([model] operating_points) changes which images count as present, so that label has no range
at the site (see :func:`card_reference`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models.labels import LABELS

DAY_IMAGES = 50  # images of one resampled "day": fewer in a real day and its figures are not compared
RESAMPLES = 2000
QUANTILES = (0.001, 0.999)  # of the resampled figures: the range "seen" at validation
STATISTICS = ("positive_rate", "ood_rate", "mean_radius")


class DriftReferenceMissing(ValueError):
    """The model card has no drift range: a bundle built before it was recorded."""


def image_figures(prediction) -> dict:
    """What one prediction (models.prediction.Prediction) adds to its day's figures."""
    return {"present": [f.label for f in prediction.findings if f.present],
            "out_of_distribution": bool(prediction.out_of_distribution),
            "mean_radius": float(np.mean(prediction.radius)) if np.size(prediction.radius) else 0.0}


def reference(present: np.ndarray, ood: np.ndarray, mean_radius: np.ndarray, labels: Sequence[str] = LABELS,
              day_images: int = DAY_IMAGES, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """The model card's drift entry: the range of each figure over ``resamples`` days of
    ``day_images`` images drawn with replacement from the validation images.

    present: (n, L) bool, the label present at the bundle's thresholds; ood: (n,) bool; mean_radius:
    (n,) float. The rates get one pseudo-image with and one without (a Laplace prior), so that a
    label never present on a small validation split does not get the range [0, 0].

    Raises
    ------
    ValueError
        No validation images, or arrays of different lengths.
    """
    present = np.asarray(present, bool)
    ood = np.asarray(ood, bool)
    mean_radius = np.asarray(mean_radius, np.float64)
    n = len(ood)
    if n == 0 or present.shape != (n, len(labels)) or mean_radius.shape != (n,):
        raise ValueError(f"drift reference needs n > 0 validation images with present (n, {len(labels)}), ood (n,) "
                         f"and mean_radius (n,); got {present.shape}, {ood.shape}, {mean_radius.shape}")
    rng = np.random.default_rng(seed)

    def rate_range(column: np.ndarray) -> list[float]:
        pool = np.concatenate([column.astype(np.float64), [0.0, 1.0]])
        means = pool[rng.integers(0, len(pool), (resamples, day_images))].mean(1)
        return [float(v) for v in np.quantile(means, QUANTILES)]

    radius_means = mean_radius[rng.integers(0, n, (resamples, day_images))].mean(1)
    return {
        "what": (f"range ({QUANTILES[0]:g} to {QUANTILES[1]:g} quantiles) of each figure over {resamples} days of "
                 f"{day_images} images resampled from the validation split; rates with one pseudo-image present "
                 "and one absent"),
        "n_validation": int(n), "day_images": int(day_images), "resamples": int(resamples),
        "quantiles": list(QUANTILES),
        "validation": {"positive_rate": {k: float(present[:, i].mean()) for i, k in enumerate(labels)},
                       "ood_rate": float(ood.mean()), "mean_radius": float(mean_radius.mean())},
        "positive_rate": {k: rate_range(present[:, i]) for i, k in enumerate(labels)},
        "ood_rate": rate_range(ood),
        "mean_radius": [float(v) for v in np.quantile(radius_means, QUANTILES)],
    }


def card_reference(card: Mapping, overridden: Iterable[str] = ()) -> dict:
    """The card's drift range, without the labels whose threshold the site overrides
    (``overridden``: [model] operating_points keys; "*" stands for every label not named).

    Raises
    ------
    DriftReferenceMissing
        A card written before the drift range was recorded: rebuild the bundle (`medsam2-cxr
        train`, or delete <spool>/models/default for the default one) to compare against it.
    """
    ref = card.get("drift")
    if not ref:
        raise DriftReferenceMissing("the model card has no drift range (a bundle built before it was recorded); "
                                    "rebuild the bundle to compare a site's figures with its validation")
    overridden = set(overridden)
    every = "*" in overridden
    keep = {k: v for k, v in ref["positive_rate"].items() if not every and k not in overridden}
    return {**ref, "positive_rate": keep}


@dataclass(frozen=True)
class DayFigures:
    site: str
    day: str  # UTC date, ISO
    images: int
    positive_rate: dict[str, float]
    ood_rate: float
    mean_radius: float | None  # None: no image of the day had a radius recorded


def daily(records: Iterable[Mapping], labels: Sequence[str] = LABELS) -> list[DayFigures]:
    """Figures per (site, UTC day) from per-image records: ``time`` (epoch seconds), ``site``,
    ``present`` (labels), ``out_of_distribution`` and ``mean_radius`` (may be missing). Sorted by
    site, then day."""
    groups: dict[tuple[str, str], list[Mapping]] = {}
    for r in records:
        day = dt.datetime.fromtimestamp(float(r["time"]), dt.UTC).date().isoformat()
        groups.setdefault((str(r.get("site") or "unknown"), day), []).append(r)
    out = []
    for (site, day), rs in sorted(groups.items()):
        n = len(rs)
        radii = [float(r["mean_radius"]) for r in rs if r.get("mean_radius") is not None]
        out.append(DayFigures(
            site=site, day=day, images=n,
            positive_rate={k: sum(k in (r.get("present") or ()) for r in rs) / n for k in labels},
            ood_rate=sum(bool(r.get("out_of_distribution")) for r in rs) / n,
            mean_radius=float(np.mean(radii)) if radii else None))
    return out


@dataclass(frozen=True)
class Excursion:
    site: str
    day: str
    statistic: str  # STATISTICS
    label: str  # the finding for positive_rate, "" otherwise
    value: float
    low: float
    high: float


def excursions(days: Iterable[DayFigures], ref: Mapping) -> list[Excursion]:
    """Each figure of a day with at least ref["day_images"] images that lies outside its range."""
    out = []
    for d in days:
        if d.images < int(ref["day_images"]):
            continue
        checks: list[tuple[str, str, float | None, Sequence[float]]] = [
            ("positive_rate", k, d.positive_rate.get(k), rng) for k, rng in ref["positive_rate"].items()]
        checks += [("ood_rate", "", d.ood_rate, ref["ood_rate"]), ("mean_radius", "", d.mean_radius, ref["mean_radius"])]
        for statistic, label, value, (low, high) in checks:
            if value is not None and not (low <= value <= high):
                out.append(Excursion(d.site, d.day, statistic, label, float(value), float(low), float(high)))
    return out
