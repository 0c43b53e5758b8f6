"""Operating points: the threshold at which a finding is called present, and the rule that chose it.

A bundle fits every label's threshold on held-out scores, after calibration, by a stated
criterion: its validation split and the training split's out-of-fold scores
(model_training.train.out_of_fold; "validation" below means these held-out images). It keeps each
label's held-out confusion counts at every candidate threshold
(`RocTable`) so a site can switch a label to another criterion in its configuration without
refitting (`[model.operating_points]`, applied by models.bundle.load_bundle).

Criteria (the spec strings a card and a configuration use):
- "expected_accuracy": present when the calibrated probability is at least 0.5. The default: a
  second reader is best served by a call that is right most often (it is what the elementwise
  accuracy of the paper's table measures), and for a calibrated probability the call with the
  highest expected accuracy is p >= 0.5 (Bayes' rule for 0/1 loss). It rests on the per-label
  calibration (a temperature and a bias, models.calibration, fitted on the validation split
  alone, with priors) instead of a threshold searched on a few dozen positives, which is noisier.
- "accuracy": the highest empirical validation accuracy (for the label: TP + TN over known
  images), ties broken towards 0.5.
- "sensitivity:X": the highest threshold whose validation sensitivity is at least X;
  "sensitivity:X,min_specificity:Y" the same, but never below the lowest threshold whose
  validation specificity is at least Y. The urgent findings of a triage product get the latter
  (URGENT_LABELS, URGENT_CRITERION): missing one costs more than a false alarm, but not without
  limit.
- "specificity:X": the lowest threshold whose validation specificity is at least X.
- "f1": the highest F1 of the present calls; "youden": the highest sensitivity + specificity - 1
  (the node's criterion before issue 16: on calibrated, flattened probabilities it picks low
  thresholds and calls many findings present).
- "threshold:X": a fixed threshold X in (0, 1), fitted on nothing.
A label whose validation split has fewer than MIN_KNOWN known images or one class only gets 0.5,
and the card says so.

A rate target needs the images it is a rate of: "sensitivity:X" fitted on fewer than
MIN_CLASS_COUNT held-out positives (or "specificity:X" on fewer negatives) is no point a reader
can trust, since one image moves the rate by more than 10 points. On 800 phantoms of seed 3131
Pneumothorax had 2 validation positives: every variant's sensitivity point caught at most one of
them, and its specificity floor flagged one normal image in five (the out-of-fold scores of the
training split now add about eight times as many). A bundle's own fit therefore
gives such a label the default criterion instead (`fit`; the card lists it under "not_estimable"
with the counts). A site that names the rate target in its configuration still gets it (`apply`);
the card's "not_estimable" entry says on how few images it rests.

A sensitivity target also needs scores that rank the finding's positives above its negatives
better than chance (one-sided Mann-Whitney p < CHANCE_P over the held-out images). Without that,
the threshold that reaches it flags as many images as the specificity floor allows, at random.
On phantoms (random-weight features), with thresholds on the out-of-fold scores and without this
rule, B5's Pneumothorax point flagged 18% of the test images without one and caught 7 of 26
pneumothoraces (seeds 101-505). With it, Pneumothorax is listed as not estimable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from models.labels import LABELS
from models.urgency import DEFAULT_RULES

# Findings a chest X-ray triage product flags as urgent: the one list the node consults.
URGENT_LABELS: tuple[str, ...] = tuple(DEFAULT_RULES)  # the default [urgent] rules (models.urgency)
DEFAULT_CRITERION = "expected_accuracy"
# High sensitivity, but a flag that fires on more than one normal image in five is no triage a
# reader trusts: on a weak bundle (few validation positives, phantom features) the sensitivity
# point alone flagged about nine normal images in ten (tuned on phantoms of seed 101, not the
# evaluation's seed).
URGENT_CRITERION = "sensitivity:0.9,min_specificity:0.8"
MIN_KNOWN = 5
# A validation rate over fewer positives (or negatives) than this moves by 10 points or more with
# one image: the card names such labels ("thin"), since their fitted point is mostly chance (on
# 800 phantoms Pneumothorax had 1-2 validation positives).
MIN_CLASS_COUNT = 10
# A sensitivity target needs held-out scores that beat chance at this one-sided level (Mann-Whitney).
CHANCE_P = 0.05
FALLBACK_THRESHOLD = 0.5
ALL_OTHERS = "*"  # configuration key: every label not named

_NAMED = ("expected_accuracy", "accuracy", "f1", "youden")
_PARAMETRISED = ("sensitivity", "specificity", "threshold")


@dataclass(frozen=True)
class Criterion:
    """A parsed operating-point spec. Build with Criterion.parse("sensitivity:0.9")."""

    kind: str
    value: float | None = None
    min_specificity: float | None = None  # sensitivity only: never below the point with this specificity

    @property
    def level(self) -> float:
        """The number of a parametrised criterion (sensitivity:X, specificity:X, threshold:X)."""
        if self.value is None:
            raise ValueError(f"operating point {self.kind!r} takes no number")
        return self.value

    @classmethod
    def parse(cls, spec: str | Criterion) -> Criterion:
        """Raises ValueError for an unknown criterion or a value outside (0, 1)."""
        if isinstance(spec, Criterion):
            return spec
        text = str(spec).strip().lower()
        text, comma, floor = text.partition(",")
        if comma:
            base = cls.parse(text)
            key, _, arg = floor.partition(":")
            if base.kind != "sensitivity" or key.strip() != "min_specificity":
                raise ValueError(f"operating point {spec!r} not understood; the only compound is "
                                 "sensitivity:X,min_specificity:Y")
            return cls(base.kind, base.value, cls.parse(f"specificity:{arg}").value)
        kind, sep, arg = text.partition(":")
        kind = kind.strip()
        if kind in _NAMED and not sep:
            return cls(kind)
        if kind in _PARAMETRISED and sep:
            try:
                value = float(arg)
            except ValueError:
                raise ValueError(f"operating point {spec!r}: {arg!r} is not a number") from None
            if not 0.0 < value < 1.0:
                raise ValueError(f"operating point {spec!r}: the value must lie strictly between 0 and 1")
            return cls(kind, value)
        raise ValueError(f"operating point {spec!r} not understood; use one of {', '.join(_NAMED)}, "
                         f"or sensitivity:X, specificity:X, threshold:X with 0 < X < 1")

    def __str__(self) -> str:
        if self.value is None:
            return self.kind
        floor = "" if self.min_specificity is None else f",min_specificity:{self.min_specificity:g}"
        return f"{self.kind}:{self.value:g}{floor}"

    def describe(self) -> str:
        """Words for a reader, e.g. "validation sensitivity >= 90%"."""
        if self.kind == "expected_accuracy":
            return "calibrated probability >= 0.5 (best expected accuracy)"
        if self.kind == "accuracy":
            return "best validation accuracy"
        if self.kind == "f1":
            return "best validation F1"
        if self.kind == "youden":
            return "best validation Youden's J"
        if self.kind == "threshold":
            return f"fixed threshold {self.level:g}"
        words = f"validation {self.kind} >= {100 * self.level:.0f}%"
        if self.min_specificity is not None:
            words += f" (specificity kept >= {100 * self.min_specificity:.0f}%)"
        return words


def describe(spec: str) -> str:
    """Reader's words for a spec; a spec this code does not parse (an old card's) is shown as is."""
    try:
        return Criterion.parse(spec).describe()
    except ValueError:
        return str(spec)


def summary(criteria: Mapping[str, str]) -> str:
    """One line naming the operating points of a result, e.g. "best validation accuracy;
    validation sensitivity >= 90% for Pneumothorax, Pleural Effusion"; "" when none is named."""
    named = {k: v for k, v in criteria.items() if v}
    if not named:
        return ""
    groups: dict[str, list[str]] = {}
    for k, v in named.items():
        groups.setdefault(describe(v), []).append(k)
    main = max(groups, key=lambda d: len(groups[d]))
    parts = [main if len(groups) > 1 or len(named) == len(LABELS) else f"{main} for {', '.join(groups[main])}"]
    parts += [f"{d} for {', '.join(ks)}" for d, ks in groups.items() if d != main]
    return "; ".join(parts)


def default_criteria() -> dict[str, str]:
    """The criterion each label gets in a new bundle: URGENT_CRITERION for URGENT_LABELS."""
    return {k: URGENT_CRITERION if k in URGENT_LABELS else DEFAULT_CRITERION for k in LABELS}


@dataclass(frozen=True)
class RocTable:
    """One label's validation confusion counts at every candidate threshold, ascending.

    Candidates lie between consecutive distinct validation probabilities (midpoints), plus one
    below the lowest and one above the highest, so every achievable split of the validation
    images is represented and no threshold sits exactly on a validation score.
    """

    thresholds: np.ndarray  # (T,) ascending, in (0, 1)
    tp: np.ndarray  # (T,) positives with p >= threshold
    fp: np.ndarray  # (T,) negatives with p >= threshold
    n_pos: int
    n_neg: int

    @classmethod
    def from_scores(cls, p: np.ndarray, y: np.ndarray) -> RocTable:
        """p: probabilities; y: 1 / 0 / nan (nan = unknown, left out)."""
        p, y = np.asarray(p, np.float64), np.asarray(y, np.float64)
        known = ~np.isnan(y)
        p, y = p[known], y[known]
        u = np.unique(p)
        if len(u):
            # Rounded as the card stores them, so a reloaded table gives the same thresholds.
            cands = np.unique(np.round(np.r_[u[0] / 2, (u[:-1] + u[1:]) / 2, (u[-1] + 1) / 2], 6))
        else:
            cands = np.array([FALLBACK_THRESHOLD])
        pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
        tp = len(pos) - np.searchsorted(pos, cands, side="left")
        fp = len(neg) - np.searchsorted(neg, cands, side="left")
        return cls(cands, tp.astype(np.int64), fp.astype(np.int64), int(len(pos)), int(len(neg)))

    @property
    def usable(self) -> bool:
        return self.n_pos + self.n_neg >= MIN_KNOWN and self.n_pos > 0 and self.n_neg > 0

    def choose(self, criterion: str | Criterion) -> float:
        """The threshold the criterion picks; FALLBACK_THRESHOLD when the table is not usable."""
        c = Criterion.parse(criterion)
        if c.kind == "threshold":
            return c.level
        if c.kind == "expected_accuracy":
            return 0.5  # the calibration carries the fit
        if not self.usable:
            return FALLBACK_THRESHOLD
        t = self.thresholds
        tpr = self.tp / self.n_pos
        tnr = 1 - self.fp / self.n_neg
        if c.kind == "sensitivity":
            ok = np.flatnonzero(tpr >= c.level - 1e-12)
            chosen = float(t[ok[-1]])  # tpr falls as t rises; t[0] has tpr 1
            if c.min_specificity is not None:  # not so low that most normal images are flagged
                chosen = max(chosen, float(t[np.flatnonzero(tnr >= c.min_specificity - 1e-12)[0]]))
            return chosen
        if c.kind == "specificity":
            ok = np.flatnonzero(tnr >= c.level - 1e-12)
            return float(t[ok[0]])  # tnr rises with t; the last candidate has tnr 1
        if c.kind == "accuracy":
            score = self.tp + (self.n_neg - self.fp)
        elif c.kind == "f1":
            fn = self.n_pos - self.tp
            score = np.where(self.tp > 0, 2 * self.tp / np.maximum(2 * self.tp + self.fp + fn, 1), 0.0)
        else:  # youden
            score = tpr + tnr - 1
        best = np.flatnonzero(np.isclose(score, score.max(), rtol=0, atol=1e-12))
        return float(t[best[np.argmin(np.abs(t[best] - 0.5))]])

    def to_json(self) -> dict:
        return {"thresholds": [float(v) for v in self.thresholds], "tp": self.tp.tolist(),
                "fp": self.fp.tolist(), "n_pos": self.n_pos, "n_neg": self.n_neg}

    @classmethod
    def from_json(cls, d: Mapping) -> RocTable:
        return cls(np.asarray(d["thresholds"], np.float64), np.asarray(d["tp"], np.int64),
                   np.asarray(d["fp"], np.int64), int(d["n_pos"]), int(d["n_neg"]))


    @property
    def auroc(self) -> float:
        """The empirical AUROC of the scores the table was built from (ties count half), exactly."""
        tpr = np.r_[self.tp / self.n_pos, 0.0][::-1]
        fpr = np.r_[self.fp / self.n_neg, 0.0][::-1]
        return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))

    @property
    def chance_p(self) -> float:
        """One-sided p-value that the scores rank positives above negatives no better than chance
        (Mann-Whitney U, normal approximation)."""
        sd = math.sqrt((self.n_pos + self.n_neg + 1) / (12 * self.n_pos * self.n_neg))
        return 0.5 * math.erfc((self.auroc - 0.5) / sd / math.sqrt(2))


def not_estimable_because(criterion: str | Criterion, table: RocTable) -> str | None:
    """Why the held-out images cannot carry the criterion's rate target, or None when they can.

    A sensitivity needs at least MIN_CLASS_COUNT positives (a specificity as many negatives), and
    a sensitivity needs scores that rank the positives above the negatives better than chance
    (one-sided p < CHANCE_P): otherwise the threshold that reaches it flags images at random, as
    many as the specificity floor allows, and a reader learns to ignore the flag. Other criteria
    (and a table `usable` says is not) are judged elsewhere.
    """
    c = Criterion.parse(criterion)
    if not table.usable or c.kind not in ("sensitivity", "specificity"):
        return None
    n, of = (table.n_pos, "positives") if c.kind == "sensitivity" else (table.n_neg, "negatives")
    if n < MIN_CLASS_COUNT:
        return f"{c} needs at least {MIN_CLASS_COUNT} held-out {of}, {n} here"
    if c.kind == "sensitivity" and table.chance_p >= CHANCE_P:
        return (f"{c} needs scores that rank the finding above chance; held-out AUROC {table.auroc:.2f} over "
                f"{table.n_pos} positives and {table.n_neg} negatives (one-sided p = {table.chance_p:.2f})")
    return None


def estimable(criterion: str | Criterion, table: RocTable) -> bool:
    """Whether the held-out images can carry the criterion's rate target (not_estimable_because)."""
    return not_estimable_because(criterion, table) is None


def fit(p: np.ndarray, y: np.ndarray, criteria: Mapping[str, str] | None = None,
        fitted_on: str = "validation split, calibrated probabilities") -> dict:
    """The card's "operating_points" entry and the thresholds it implies, from held-out scores.

    p, y: (B, L) calibrated held-out probabilities and labels (nan = unknown); fitted_on says which
    images they are, for the card. Returns {"thresholds": {label: t}, "operating_points": {...}}.
    A rate target the held-out images cannot carry (`not_estimable_because`) gives way to
    DEFAULT_CRITERION; "not_estimable" says which and why.
    """
    criteria = {**default_criteria(), **(criteria or {})}
    tables = {k: RocTable.from_scores(p[:, i], y[:, i]) for i, k in enumerate(LABELS)}
    not_estimable = {}
    for k in LABELS:
        why = not_estimable_because(criteria[k], tables[k])
        if why:
            not_estimable[k] = f"{why}: {DEFAULT_CRITERION} instead"
            criteria[k] = DEFAULT_CRITERION
    thresholds = {k: tables[k].choose(criteria[k]) for k in LABELS}
    fallback = {k: (f"{tables[k].n_pos + tables[k].n_neg} known held-out images, {tables[k].n_pos} positive: "
                    f"threshold {FALLBACK_THRESHOLD}") for k in LABELS
                if not tables[k].usable and Criterion.parse(criteria[k]).kind != "threshold"}
    thin = {k: f"fitted on {tables[k].n_pos} held-out positives and {tables[k].n_neg} negatives"
            for k in LABELS if k not in fallback and Criterion.parse(criteria[k]).kind not in ("threshold", "expected_accuracy")
            and min(tables[k].n_pos, tables[k].n_neg) < MIN_CLASS_COUNT}
    return {
        "thresholds": thresholds,
        "operating_points": {
            "fitted_on": fitted_on,
            "default_criterion": DEFAULT_CRITERION,
            "urgent_labels": list(URGENT_LABELS),
            "urgent_criterion": URGENT_CRITERION,
            "criteria": {k: str(Criterion.parse(criteria[k])) for k in LABELS},
            "descriptions": {k: describe(criteria[k]) for k in LABELS},
            "fallback": fallback,
            "not_estimable": not_estimable,
            "thin": thin,
            "validation_roc": {k: tables[k].to_json() for k in LABELS},
        },
    }


def apply(card: Mapping, overrides: Mapping[str, str] | None) -> tuple[dict[str, float], dict[str, str]]:
    """Thresholds and criterion per label: the card's, with a site's overrides applied.

    overrides: label (or ALL_OTHERS) -> spec. Raises ValueError for an unknown label or spec, or
    for a fitted criterion on a card that carries no validation ROC points (a bundle from before
    operating points; only "threshold:X" applies to it).
    """
    ops = card.get("operating_points") or {}
    criteria = {k: ops.get("criteria", {}).get(k, "bundle threshold") for k in LABELS}
    thresholds = {k: float(card["thresholds"][k]) for k in LABELS}
    if not overrides:
        return thresholds, criteria
    unknown = [k for k in overrides if k not in LABELS and k != ALL_OTHERS]
    if unknown:
        raise ValueError(f"operating points for unknown labels {unknown}; labels are {list(LABELS)}")
    wanted = {k: overrides.get(k, overrides.get(ALL_OTHERS)) for k in LABELS}
    for k, spec in wanted.items():
        if spec is None:
            continue
        c = Criterion.parse(spec)
        roc = ops.get("validation_roc", {}).get(k)
        if roc is None and c.kind != "threshold":
            raise ValueError(f"{k}: operating point {spec!r} needs the bundle's validation ROC points, which "
                             "this bundle's card does not carry; rebuild the bundle or give threshold:X")
        thresholds[k] = c.level if c.kind == "threshold" else RocTable.from_json(roc).choose(c)
        criteria[k] = str(c)
    return thresholds, criteria


def confusion(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """Counts and rates of one label's calls at a threshold over known images (test figures)."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    known = ~np.isnan(y)
    y, call = y[known] == 1, p[known] >= threshold
    tp, fp = int((call & y).sum()), int((call & ~y).sum())
    fn, tn = int((~call & y).sum()), int((~call & ~y).sum())

    def rate(a: int, b: int) -> float | None:
        return a / b if b else None

    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "sensitivity": rate(tp, tp + fn),
            "specificity": rate(tn, tn + fp), "ppv": rate(tp, tp + fp)}
