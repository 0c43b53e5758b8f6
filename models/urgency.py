"""Which findings make a study urgent: the rules a triage product applies, as configuration.

A rule is label -> the lowest confidence tier ("medium" or "high") at which that finding, when
present (probability at or above its threshold), moves the study up the reader's worklist. A
study is urgent when any rule fires and the image is not out of distribution: on an image the
model does not know, its confidence means nothing, and the results already warn about it.

Default rules (DEFAULT_RULES), both at "medium":
- Pneumothorax: the finding every chest X-ray triage product flags (Lunit INSIGHT CXR Triage,
  qXR, Annalise Enterprise CXR Triage); a tension pneumothorax kills within hours.
- Pleural Effusion: triage products flag a *large* effusion. The CheXpert label has no size, so
  this rule flags effusions of every size: small ones are flagged too (over-triage). A site that
  finds that too many can raise it to "high" or drop it; the measured rates are in
  `python -m bench.urgent` (phantoms with known sizes).
- Not by default: Consolidation / Pneumonia. Triage devices do not flag them as urgent: they are
  common in the populations these studies come from (so flagging them dilutes the priority of
  every other flag), and their urgency is clinical (sepsis, hypoxia), not read off the image.
  A site can add them (`[urgent] rules = {..., "Consolidation" = "high"}`).
The same two labels get the high-sensitivity operating point of a new bundle
(models.operating_points.URGENT_LABELS derives from DEFAULT_RULES): a flag must not be missed
because the threshold was set for accuracy.

Confidence not validated. A bundle not validated on real images (the phantom-trained default)
states no medium or high tier: those read "not validated" (models.prediction.NOT_VALIDATED), and
only a tier that would have been medium or high becomes "not validated". Such a finding *counts*
at the tier its own margin and spread give (models.calibration.tier as for a validated
bundle, recomputed here): a missed
pneumothorax costs far more than a study read a little earlier, and refusing to flag would make
the default node never flag anything. The flag then carries `confidence_validated = False`, and
every object made for it (the KOS, the results' text) says that its confidence is not validated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from models.labels import LABELS
from models.prediction import NOT_VALIDATED, TIERS, Finding, Prediction

# Tiers a rule may name, lowest first; "low" is no urgency: it is the tier of a call near its threshold.
RULE_TIERS = ("medium", "high")
DEFAULT_RULES: Mapping[str, str] = MappingProxyType({"Pneumothorax": "medium", "Pleural Effusion": "medium"})
_RANK = {t: i for i, t in enumerate(reversed(TIERS))}  # low 0, medium 1, high 2


def check_rules(rules: Mapping[str, str]) -> dict[str, str]:
    """The rules as a plain dict, every label known and every tier one of RULE_TIERS.

    Raises
    ------
    ValueError
        A label that is not one of the 14 (models.labels.LABELS) or a tier that is not
        "medium" or "high"; the message names it and what is allowed.
    """
    out: dict[str, str] = {}
    for label, tier in rules.items():
        if label not in LABELS or label == "No Finding":
            raise ValueError(f"[urgent] rules: {label!r} is not a finding label; use one of "
                             f"{[k for k in LABELS if k != 'No Finding']}")
        value = str(tier).strip().lower()
        if value not in RULE_TIERS:
            raise ValueError(f"[urgent] rules: {label} = {tier!r}: the lowest confidence that flags must be "
                             f"one of {list(RULE_TIERS)}")
        out[label] = value
    return out


def effective_tier(finding: Finding) -> str:
    """The finding's tier; for "not validated", the tier its margin and spread give (medium or high)."""
    if finding.tier != NOT_VALIDATED:
        return finding.tier
    # Imported here: it imports torch, needed only when a tier is not validated.
    from models.calibration import tier

    return tier(finding.probability, finding.threshold, finding.spread, validated=True)


def urgent_findings(prediction: Prediction, rules: Mapping[str, str] = DEFAULT_RULES) -> list[Finding]:
    """The findings that make this study urgent under `rules`, most probable first; [] when none
    fires or the image is out of distribution."""
    if prediction.out_of_distribution:
        return []
    rules = check_rules(rules)
    hits = [f for f in prediction.findings
            if f.label in rules and f.present and _RANK[effective_tier(f)] >= _RANK[rules[f.label]]]
    return sorted(hits, key=lambda f: f.probability, reverse=True)


@dataclass(frozen=True)
class Urgency:
    """What the results, the audit and a RIS message say about a study's priority."""

    findings: tuple[Finding, ...]
    confidence_validated: bool  # False when a flagging finding's tier reads "not validated"

    @property
    def is_urgent(self) -> bool:
        return bool(self.findings)

    @property
    def labels(self) -> list[str]:
        return [f.label for f in self.findings]

    def describe(self) -> str:
        """One line for a reader, e.g. "Urgent: Pneumothorax 91% (confidence not validated)"."""
        if not self.findings:
            return "Not urgent"
        what = ", ".join(f"{f.label} {100 * f.probability:.0f}%" for f in self.findings)
        return f"Urgent: {what}" + ("" if self.confidence_validated else " (confidence not validated)")

    def to_json(self) -> dict:
        return {"is_urgent": self.is_urgent, "findings": self.labels,
                "confidence_validated": self.confidence_validated}


def assess(prediction: Prediction, rules: Mapping[str, str] = DEFAULT_RULES) -> Urgency:
    """urgent_findings, with whether their confidence is validated."""
    hits = urgent_findings(prediction, rules)
    return Urgency(tuple(hits), confidence_validated=not any(f.tier == NOT_VALIDATED for f in hits))
