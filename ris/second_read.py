"""The second reader: which of the model's findings the first reader's report leaves out.

A pure function of the prediction, the report's labels (both labelers) and the configuration;
the store, the notification and the audit are the caller's (ris.intake).

A discrepancy ("model_positive"): the model calls the finding present at a confident tier (medium
or high by default, [second_read] tiers), the image is not out of distribution, and the report is
negative or silent on it: *neither* labeler reads it as positive or uncertain. A hedge ("cannot
exclude effusion") is a mention, not a miss, so it raises no flag.
The other way round ("report_positive", only with also_report_positive_model_negative): the
report is positive on the finding by *both* labelers (they agree, so the flag does not rest on
one parser's reading) and the model calls it absent, on an image not out of distribution.
"No Finding" is never a discrepancy: it is derived from the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from index.labelers import Extractor, get_extractor
from index.labelers.common import NEGATIVE, POSITIVE, UNCERTAIN, Labels
from models.labels import LABELS
from models.prediction import ALL_TIERS, Prediction

MODEL_POSITIVE = "model_positive"  # the model calls it, the report does not
REPORT_POSITIVE = "report_positive"  # the report calls it, the model does not
DEFAULT_TIERS = ("medium", "high")
_EXCLUDED = ("No Finding",)


@dataclass(frozen=True)
class ReportLabels:
    """Both labelers' reading of one report and where they agree."""

    lexicon: Labels
    grammar: Labels

    @property
    def agree(self) -> dict[str, bool]:
        return {label: self.lexicon.get(label) == self.grammar.get(label) for label in LABELS}

    @property
    def agreement(self) -> float:
        """The fraction of the 14 labels both labelers give the same value (1, 0, -1 or not mentioned)."""
        a = self.agree
        return sum(a.values()) / len(a)

    def mentioned(self, label: str) -> bool:
        """Positive or uncertain by either labeler."""
        return any(x.get(label) in (POSITIVE, UNCERTAIN) for x in (self.lexicon, self.grammar))

    def positive(self, label: str) -> bool:
        """Positive by both labelers."""
        return all(x.get(label) == POSITIVE for x in (self.lexicon, self.grammar))

    def truth(self, label: str) -> float:
        """The report as a reference label for local validation: 1 when both labelers read it
        positive, 0 when neither reads it positive or uncertain (negated or not mentioned: a report
        names what it sees), nan when they disagree or either reads it uncertain (left out)."""
        values = {self.lexicon.get(label), self.grammar.get(label)}
        if values == {POSITIVE}:
            return 1.0
        if not values & {POSITIVE, UNCERTAIN}:
            return 0.0
        return float("nan")

    def state(self, label: str) -> str:
        """What the report says of a label, for the list: positive, uncertain, negative or silent."""
        values = {self.lexicon.get(label), self.grammar.get(label)}
        if POSITIVE in values:
            return "positive"
        if UNCERTAIN in values:
            return "uncertain"
        return "negative" if NEGATIVE in values else "silent"


def label_report(text: str) -> ReportLabels:
    """Both labelers on one report text."""
    return ReportLabels(get_extractor(Extractor.LEXICON)(text), get_extractor(Extractor.GRAMMAR)(text))


@dataclass(frozen=True)
class Discrepancy:
    label: str
    direction: str  # MODEL_POSITIVE or REPORT_POSITIVE
    tier: str  # the model's tier for the finding
    probability: float
    report: str  # ReportLabels.state of the label


def check_tiers(tiers: Iterable[str]) -> tuple[str, ...]:
    """The configured tiers, each one of models.prediction.ALL_TIERS; ValueError names the valid ones."""
    out = tuple(tiers)
    bad = [t for t in out if t not in ALL_TIERS]
    if bad or not out:
        raise ValueError(f"[second_read] tiers {list(out)}: choose from {list(ALL_TIERS)} (at least one)")
    return out


def discrepancies(prediction: Prediction, report: ReportLabels, *, tiers: Iterable[str] = DEFAULT_TIERS,
                  also_report_positive: bool = False) -> list[Discrepancy]:
    """The discrepancies between one image's prediction and one report (see the module docstring)."""
    if prediction.out_of_distribution:
        return []
    confident = set(check_tiers(tiers))
    out = []
    for f in prediction.findings:
        if f.label in _EXCLUDED:
            continue
        if f.present and f.tier in confident and not report.mentioned(f.label):
            out.append(Discrepancy(f.label, MODEL_POSITIVE, f.tier, f.probability, report.state(f.label)))
        elif also_report_positive and not f.present and report.positive(f.label):
            out.append(Discrepancy(f.label, REPORT_POSITIVE, f.tier, f.probability, report.state(f.label)))
    return out


def labels_json(report: ReportLabels) -> Mapping[str, object]:
    """What the store keeps with a report: both labelers' labels and their agreement."""
    return {"lexicon": report.lexicon, "grammar": report.grammar, "agree": report.agree,
            "agreement": round(report.agreement, 4)}
