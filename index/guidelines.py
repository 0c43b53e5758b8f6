"""Curated clinical guideline references per finding, each with a full citation.

Only published guidelines whose citation the project has checked are listed; a DOI appears only
where it was verified, otherwise the journal citation stands alone. A finding without an entry
gets no reference: the drafter never makes one up. Before clinical use a site should review this
table against the current editions (guidelines are superseded).

Each reference's note (why the guideline applies to the finding) is written here in English; other
report languages translate it in index/wording.py under the same (label, guideline key), and that
module fails to import when a key here has no translation. Citations are never translated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from models.labels import LABELS


@dataclass(frozen=True)
class Guideline:
    key: str
    citation: str  # Vancouver style: authors. Title. Journal. Year;Volume(Issue):pages.
    doi: str | None
    scope: str  # what the guideline covers, as a reader needs to know it

    def cite(self) -> str:
        return f"{self.citation} doi:{self.doi}" if self.doi else self.citation


@dataclass(frozen=True)
class Reference:
    """A guideline attached to one finding, with why it applies."""

    label: str
    guideline: Guideline
    note: str


GUIDELINES: Mapping[str, Guideline] = MappingProxyType({
    g.key: g for g in (
        Guideline(
            "fleischner-2017",
            "MacMahon H, Naidich DP, Goo JM, et al. Guidelines for Management of Incidental Pulmonary Nodules "
            "Detected on CT Images: From the Fleischner Society 2017. Radiology. 2017;284(1):228-243.",
            "10.1148/radiol.2017161659",
            "follow-up of incidental pulmonary nodules once characterised on CT",
        ),
        Guideline(
            "fleischner-glossary-2008",
            "Hansell DM, Bankier AA, MacMahon H, McLoud TC, Müller NL, Remy J. Fleischner Society: glossary of "
            "terms for thoracic imaging. Radiology. 2008;246(3):697-722.",
            "10.1148/radiol.2462070712",
            "definitions of the descriptive terms of thoracic imaging",
        ),
        Guideline(
            "bts-pleural-2023",
            "Roberts ME, et al. British Thoracic Society Guideline for pleural disease. "
            "Thorax. 2023;78(Suppl 3):s1-s42.",
            None,
            "investigation and management of pleural effusion and pneumothorax",
        ),
        Guideline(
            "ats-idsa-cap-2019",
            "Metlay JP, Waterer GW, Long AC, et al. Diagnosis and Treatment of Adults with Community-acquired "
            "Pneumonia. An Official Clinical Practice Guideline of the American Thoracic Society and Infectious "
            "Diseases Society of America. Am J Respir Crit Care Med. 2019;200(7):e45-e67.",
            "10.1164/rccm.201908-1581ST",
            "diagnosis and treatment of community-acquired pneumonia in adults",
        ),
        Guideline(
            "esc-hf-2021",
            "McDonagh TA, Metra M, Adamo M, et al. 2021 ESC Guidelines for the diagnosis and treatment of acute "
            "and chronic heart failure. Eur Heart J. 2021;42(36):3599-3726.",
            "10.1093/eurheartj/ehab368",
            "diagnosis and treatment of heart failure, including congestion and pulmonary oedema",
        ),
        Guideline(
            "asa-cva-2020",
            "American Society of Anesthesiologists Task Force on Central Venous Access. Practice Guidelines for "
            "Central Venous Access 2020: An Updated Report by the American Society of Anesthesiologists Task Force "
            "on Central Venous Access. Anesthesiology. 2020;132(1):8-43.",
            None,
            "placement and confirmation of central venous catheter position",
        ),
    )
})

# label -> (guideline key, why it applies to this finding)
_BY_LABEL: dict[str, tuple[tuple[str, str], ...]] = {
    "Lung Lesion": (("fleischner-2017", "a nodule seen on a radiograph is characterised on CT; follow-up per Fleischner"),),
    "Pleural Effusion": (("bts-pleural-2023", "investigation of a pleural effusion"),),
    "Pneumothorax": (("bts-pleural-2023", "management of pneumothorax"),),
    "Pneumonia": (("ats-idsa-cap-2019", "community-acquired pneumonia in adults"),),
    "Consolidation": (("fleischner-glossary-2008", "definition of consolidation"),
                      ("ats-idsa-cap-2019", "when infection is suspected")),
    "Lung Opacity": (("fleischner-glossary-2008", "definition of opacity"),),
    "Atelectasis": (("fleischner-glossary-2008", "definition of atelectasis"),),
    "Pleural Other": (("fleischner-glossary-2008", "definitions of pleural plaque and thickening"),),
    "Cardiomegaly": (("esc-hf-2021", "evaluation for heart failure"),),
    "Edema": (("esc-hf-2021", "pulmonary congestion in heart failure"),),
    "Support Devices": (("asa-cva-2020", "confirming central venous catheter position"),),
    # No curated guideline: Enlarged Cardiomediastinum, Fracture, No Finding.
}
if set(_BY_LABEL) - set(LABELS):  # a renamed label must not silently lose its references
    raise ImportError(f"guideline table names unknown labels {set(_BY_LABEL) - set(LABELS)}")


def reference_notes() -> dict[tuple[str, str], str]:
    """(label, guideline key) -> the English note: the keys every report language translates."""
    return {(label, key): note for label, refs in _BY_LABEL.items() for key, note in refs}


def for_label(label: str) -> list[Reference]:
    """The curated references for one finding (empty when none is curated)."""
    return [Reference(label, GUIDELINES[key], note) for key, note in _BY_LABEL.get(label, ())]


def for_labels(labels: list[str]) -> list[Reference]:
    """References for several findings, in their order, one per (finding, guideline)."""
    return [ref for label in labels for ref in for_label(label)]
