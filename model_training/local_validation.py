"""Local validation: the bundle's figures on a site's own studies, against its first readers' reports.

Plain arrays in, metrics.json-ready dicts out (worker.validation gathers the arrays from the job
store, the spool and the report store). Every figure is computed with the evaluation's own
definitions (model_training.metrics, models.operating_points.confusion), with a bootstrap
confidence interval that resamples whole patients (or studies, where no patient is known), so
that one patient's several studies do not count as independent evidence. A label with fewer
positives or negatives than operating_points.MIN_CLASS_COUNT gets no figure, only its counts and
a sentence saying why: a rate over a handful of positives is mostly chance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from model_training import metrics
from models import operating_points as op
from models.labels import LABELS

DEFAULT_BOOTSTRAP = 500
CI_LEVEL = 0.95
MIN_CLASS_COUNT = op.MIN_CLASS_COUNT  # the same floor as a fitted operating point's "thin" warning
PER_LABEL = ("auroc", "sensitivity", "specificity", "brier", "ece")
TRUTH_RULE = ("the first reader's report, read by both labelers (index.labelers): present when both read it "
              "positive, absent when neither reads it positive or uncertain (negated or not mentioned), left "
              "out when they disagree or either reads it uncertain (ris.second_read.ReportLabels.truth)")


@dataclass
class Cases:
    """One row per validated job (an image whose study's report has arrived)."""

    p: np.ndarray  # (n, L) calibrated probabilities, as the result stated them
    y: np.ndarray  # (n, L) 1 / 0 / nan from the report
    thresholds: np.ndarray  # (n, L) the result's own thresholds (its operating point)
    ood: np.ndarray  # (n,) bool: the result said out of distribution
    cluster: np.ndarray  # (n,) resampling unit: the keyed patient hash, else the study UID
    calling_aet: np.ndarray  # (n,) str
    device: np.ndarray  # (n,) str: "Manufacturer / ManufacturerModelName" of the received instance
    received_at: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n,) epoch seconds
    center: np.ndarray | None = None  # (n, d) the box, for recalibration (model_training.recalibrate)
    radius: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.p)

    def subset(self, mask: np.ndarray) -> Cases:
        m = np.asarray(mask)
        opt = lambda a: None if a is None else a[m]  # noqa: E731
        return Cases(self.p[m], self.y[m], self.thresholds[m], self.ood[m], self.cluster[m], self.calling_aet[m],
                     self.device[m], self.received_at[m] if len(self.received_at) else self.received_at,
                     opt(self.center), opt(self.radius))


def cluster_bootstrap(cluster: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Row indices of ``n_boot`` resamples that draw whole clusters with replacement (seeded)."""
    uniq, inverse = np.unique(np.asarray(cluster), return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    return [np.concatenate([members[j] for j in rng.integers(0, len(uniq), len(uniq))]) for _ in range(n_boot)]


def interval(values: Sequence[float | None], level: float = CI_LEVEL) -> list[float] | None:
    """The percentile interval of the defined bootstrap values; None when fewer than half are."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if len(v) < max(1, len(values) // 2):
        return None
    a = (1 - level) / 2
    return [float(np.quantile(v, a)), float(np.quantile(v, 1 - a))]


def _label_figures(y: np.ndarray, p: np.ndarray, thr: np.ndarray) -> dict[str, float | None]:
    """One label's figures on one (re)sample: AUROC, sensitivity and specificity at the results'
    thresholds, Brier, ECE (over this label's known cells)."""
    known = ~np.isnan(y)
    yk, pk, tk = y[known], p[known], thr[known]
    if not len(yk):
        return dict.fromkeys(PER_LABEL)
    both = len(np.unique(yk)) == 2
    c = op.confusion(yk, pk - tk, 0.0)  # called present when p >= that result's own threshold
    return {"auroc": metrics.per_label_auroc(yk[:, None], pk[:, None], ["x"])["x"] if both else None,
            "sensitivity": c["sensitivity"], "specificity": c["specificity"],
            "brier": metrics.brier(yk[:, None], pk[:, None]), "ece": metrics.ece(yk[:, None], pk[:, None])}


def _overall_figures(c: Cases, idx: np.ndarray | None = None) -> dict[str, float | None]:
    y, p = (c.y, c.p) if idx is None else (c.y[idx], c.p[idx])
    ood = c.ood if idx is None else c.ood[idx]
    auroc, _ = metrics.macro_auroc(y, p)
    return {"macro_auroc": None if math.isnan(auroc) else auroc, "brier": metrics.brier(y, p),
            "ece": metrics.ece(y, p), "ood_rate": float(np.mean(ood)) if len(ood) else None}


def _with_ci(point: float | None, boots: Sequence[float | None], n_boot: int) -> dict:
    return {"value": point, "ci": interval(boots) if point is not None and n_boot else None}


def figures(c: Cases, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0) -> dict:
    """Per-label and overall figures of one group of cases, each with its bootstrap interval and counts."""
    n = len(c)
    out: dict = {"n_images": n, "n_clusters": int(len(np.unique(c.cluster))) if n else 0,
                 "n_out_of_distribution": int(np.sum(c.ood)), "labels": {}}
    if n == 0:
        out["overall"] = {}
        return out
    resamples = cluster_bootstrap(c.cluster, n_boot, seed) if n_boot else []
    point = _overall_figures(c)
    boots = [_overall_figures(c, idx) for idx in resamples]
    out["overall"] = {k: _with_ci(v, [b[k] for b in boots], n_boot) for k, v in point.items()}
    out["reliability"] = metrics.reliability(c.y, c.p)
    for k, name in enumerate(LABELS):
        y, p, t = c.y[:, k], c.p[:, k], c.thresholds[:, k]
        known = ~np.isnan(y)
        n_pos, n_neg = int(np.sum(y[known] == 1)), int(np.sum(y[known] == 0))
        row: dict = {"n_known": int(known.sum()), "n_positive": n_pos, "n_negative": n_neg,
                     "n_left_out": int((~known).sum()),
                     "thresholds": sorted({round(float(v), 4) for v in t})}
        if min(n_pos, n_neg) < MIN_CLASS_COUNT:
            row["too_few"] = (f"{n_pos} positive and {n_neg} negative reports: fewer than {MIN_CLASS_COUNT} of one "
                              "class, so no figure is given")
            row.update({m: None for m in PER_LABEL})
        else:
            pt = _label_figures(y, p, t)
            bs = [_label_figures(y[idx], p[idx], t[idx]) for idx in resamples]
            row.update({m: _with_ci(pt[m], [b[m] for b in bs], n_boot) for m in PER_LABEL})
        out["labels"][name] = row
    return out


def card_figures(card: Mapping) -> dict:
    """The model card's own test figures, per label and overall, as the local ones are named."""
    test = (card.get("metrics") or {}).get("test") or {}
    ops = test.get("operating_points") or {}
    per_auroc = test.get("per_label_auroc") or {}
    labels = {}
    for k in LABELS:
        o = ops.get(k) or {}
        pos = o["tp"] + o["fn"] if "tp" in o and "fn" in o else None
        neg = o["tn"] + o["fp"] if "tn" in o and "fp" in o else None
        labels[k] = {"auroc": per_auroc.get(k), "sensitivity": o.get("sensitivity"), "specificity": o.get("specificity"),
                     "n_positive": pos, "n_negative": neg}
    overall = {"macro_auroc": test.get("macro_auroc"), "brier": test.get("brier"), "ece": test.get("ece")}
    if card.get("drift"):
        overall["ood_rate"] = card["drift"].get("validation", {}).get("ood_rate")
    return {"labels": labels, "overall": overall, "n_test": test.get("n_test"),
            "data": card.get("validation_data") or card.get("training_data", "")}


_WORDS = {"auroc": "AUROC", "sensitivity": "sensitivity", "specificity": "specificity", "macro_auroc": "macro-AUROC",
          "brier": "Brier score", "ece": "ECE", "ood_rate": "out-of-distribution rate"}
_LOWER_IS_BETTER = {"brier", "ece", "ood_rate"}


def disagreements(local: Mapping, card: Mapping) -> dict[str, list[str]]:
    """A plain sentence wherever the local interval excludes the card's figure, per label and overall."""
    out: dict[str, list[str]] = {}

    def check(where: str, metric: str, fig: Mapping | None, theirs: float | None) -> None:
        if not fig or fig.get("ci") is None or fig.get("value") is None or theirs is None:
            return
        lo, hi = fig["ci"]
        if lo <= theirs <= hi:
            return
        higher = fig["value"] > theirs
        better = higher != (metric in _LOWER_IS_BETTER)
        subject = f"{where}: the" if where != "overall" else "Overall, the"
        out.setdefault(where, []).append(
            f"{subject} local {_WORDS[metric]} is {fig['value']:.3f} (95% CI {lo:.3f}-{hi:.3f}), "
            f"{'higher' if higher else 'lower'} than the model card's {theirs:.3f}: "
            f"{'better' if better else 'worse'} here than in the bundle's own test.")

    for metric, fig in (local.get("overall") or {}).items():
        check("overall", metric, fig, (card.get("overall") or {}).get(metric))
    for label, row in (local.get("labels") or {}).items():
        theirs = (card.get("labels") or {}).get(label, {})
        thin = _card_thin(theirs)
        for metric in ("auroc", "sensitivity", "specificity"):
            if thin and row.get(metric) is not None and theirs.get(metric) is not None:
                out.setdefault(label, []).append(f"{label}: the model card's {_WORDS[metric]} rests on {thin}, too few "
                                                 "to hold the local figure against.")
                break
            check(label, metric, row.get(metric), theirs.get(metric))
    return out


def _card_thin(theirs: Mapping) -> str:
    """Words for a card figure over fewer than MIN_CLASS_COUNT test positives or negatives; "" if not."""
    pos, neg = theirs.get("n_positive"), theirs.get("n_negative")
    if pos is None or neg is None or min(pos, neg) >= MIN_CLASS_COUNT:
        return ""
    return f"{pos} positive and {neg} negative test images"


def validate(c: Cases, card: Mapping, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0,
             min_group: int = 1, progress: Callable[[str], None] | None = None) -> dict:
    """metrics.json: the figures overall, per calling AE and per device, the card's beside them,
    and the sentences where they disagree (overall group only: subgroups are smaller and noisier)."""
    say = progress or (lambda _: None)
    say("overall")
    overall = figures(c, n_boot, seed)
    theirs = card_figures(card)
    groups: dict[str, dict] = {"by_calling_aet": {}, "by_device": {}}
    for key, column in (("by_calling_aet", c.calling_aet), ("by_device", c.device)):
        for value in sorted(set(column.tolist())):
            m = column == value
            if m.sum() >= min_group:
                say(f"{key} {value}")
                groups[key][str(value)] = figures(c.subset(m), n_boot, seed)
    return {"truth": TRUTH_RULE,
            "bootstrap": {"resamples": n_boot, "seed": seed, "unit": "patient (keyed hash), else study",
                          "level": CI_LEVEL},
            "min_class_count": MIN_CLASS_COUNT, "overall": overall, **groups, "card": theirs,
            "disagreements": disagreements(overall, theirs)}
