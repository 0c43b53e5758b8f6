"""What both report labelers share: the output type, section handling, sentences, the label rules.

The two extractors (:mod:`index.labelers.lexicon` and :mod:`index.labelers.grammar`) differ in how
they read a sentence; they agree on the input they read and on the output they produce, so their
outputs can be compared cell by cell (Cohen's kappa in :mod:`index.label_eval`).

Output (the CheXpert labeler format): a dict with the 14 names of :data:`models.labels.LABELS`
as keys, in that order, and values ``1`` (positive), ``0`` (negative), ``-1`` (uncertain) or
``None`` (not mentioned).

Rules applied after extraction, the same for both extractors (:func:`finalize`):

- Several mentions of one label in a report: positive beats uncertain beats negative beats not
  mentioned (as CheXpert does). An *indirect* mention (costophrenic angle blunting for Pleural
  Effusion) counts only when the same sentence has no direct mention of the label, so "blunting of
  the angle, which may represent a small effusion" is uncertain, not positive.
- Lung Opacity is the parent of Edema, Consolidation, Pneumonia, Atelectasis and Lung Lesion in
  the CheXpert ontology: when Lung Opacity is not itself positive, a positive child makes it
  positive and an uncertain child makes it uncertain. (The phantom labels and the MeSH-derived
  labels of :mod:`model_training.openi` follow the same rule, so all three are comparable.)
- No Finding is ``1`` when no pathology label (all but No Finding and Support Devices) is
  positive or uncertain, and ``None`` otherwise, as CheXpert does. A statement such as
  "no acute cardiopulmonary abnormality" therefore sets no label itself; it is the absence of
  positive findings that makes No Finding positive.

Sections: ``FINDINGS`` and ``IMPRESSION`` (and ``CONCLUSION``, or untitled text) are read;
``INDICATION``, ``COMPARISON``, ``HISTORY``, ``TECHNIQUE``, ``EXAMINATION`` and similar headers
are dropped, because they describe the request ("rule out pneumonia"), not the image.

De-identification: Open-i replaces removed words with ``XXXX`` (also inside words:
"x-XXXX"). Both extractors read it as the neutral word ``xxxx``: never a trigger, never a
boundary, allowed where a noun was removed ("costophrenic XXXX are sharp", "sternotomy XXXX").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from models.labels import LABELS, OPACITY_CHILDREN, PATHOLOGIES  # noqa: F401 (PATHOLOGIES: re-exported)

Value = int | None
Labels = dict[str, Value]

POSITIVE, NEGATIVE, UNCERTAIN = 1, 0, -1

# Higher wins when one label is mentioned several times.
_RANK = {None: 0, NEGATIVE: 1, UNCERTAIN: 2, POSITIVE: 3}

KEPT_SECTIONS = frozenset({"FINDINGS", "IMPRESSION", "CONCLUSION", "CONCLUSIONS", "OPINION", ""})
_HEADER_WORDS = (
    "FINDINGS", "FINDING", "IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "OPINION",
    "INDICATION", "INDICATIONS", "COMPARISON", "COMPARISONS", "HISTORY", "CLINICAL HISTORY",
    "CLINICAL INDICATION", "CLINICAL INFORMATION", "REASON FOR EXAM", "REASON FOR STUDY",
    "TECHNIQUE", "EXAMINATION", "EXAM", "PROCEDURE", "RECOMMENDATION", "RECOMMENDATIONS",
    "NOTIFICATION", "ADDENDUM",
)
_HEADER_ALT = "|".join(sorted((re.escape(h).replace(r"\ ", r"\s+") for h in _HEADER_WORDS), key=len, reverse=True))
# Upper-case headers anywhere; any-case headers only at the start of a line.
_HEADER = re.compile(rf"(?:\b(?P<up>{_HEADER_ALT})\s*:)|(?:(?m:^)[ \t]*(?P<any>(?i:{_HEADER_ALT}))\s*:)")
_CANON = {"FINDING": "FINDINGS", "IMPRESSIONS": "IMPRESSION", "CONCLUSIONS": "CONCLUSION"}

_XXXX = re.compile(r"x{4,}", re.IGNORECASE)
_LIST_NUMBER = re.compile(r"(?:(?<=^)|(?<=[\s(]))\d{1,2}[.)](?=\s+[A-Za-z])")
# Sentence ends: . ! ? (not inside numbers such as 1.5 cm) and line breaks.
_SENTENCE_END = re.compile(r"(?<!\d)[.!?]+(?!\d)|\.(?=\s)|\n+")


def sections(text: str) -> list[tuple[str, str]]:
    """``[(HEADER, body), ...]`` in order; text before the first header has header ``""``."""
    out: list[tuple[str, str]] = []
    pos, name = 0, ""
    for m in _HEADER.finditer(text):
        out.append((name, text[pos:m.start()]))
        raw = (m.group("up") or m.group("any")).upper()
        raw = re.sub(r"\s+", " ", raw)
        name = _CANON.get(raw, raw)
        pos = m.end()
    out.append((name, text[pos:]))
    return [(h, b.strip()) for h, b in out if b.strip() or h]


def report_body(text: str) -> str:
    """The parts of a report the labelers read: FINDINGS, IMPRESSION and untitled text."""
    return "\n".join(body for head, body in sections(text) if head in KEPT_SECTIONS and body)


def normalise(text: str) -> str:
    """Lower case, ``XXXX`` -> ``xxxx``, list numbers ("1.") turned into sentence breaks."""
    text = _XXXX.sub("xxxx", text)
    text = _LIST_NUMBER.sub("\n", text)
    return text.lower()


def split_sentences(text: str, keep_end: bool = False) -> list[str]:
    """The one sentence splitter (the labelers' and the drafts'): a sentence ends at . ! ? (not inside
    numbers such as 1.5 cm) or a line break; semicolons and colons stay inside. keep_end keeps each
    sentence's closing punctuation, for text that is shown (index.draft); pieces that are only
    punctuation are dropped."""
    out, pos = [], 0
    for m in [*_SENTENCE_END.finditer(text), None]:
        start, end = (m.start(), m.end()) if m is not None else (len(text), len(text))
        core = text[pos:start]
        if core and core.strip(" ,;:"):
            out.append((text[pos:end] if keep_end else core).strip())
        pos = end
    return out


def sentences(text: str) -> list[str]:
    """Sentences of a normalised report body, without their closing punctuation."""
    return split_sentences(text)


def report_sentences(text: str) -> list[str]:
    """Sections dropped, normalised, split: what each extractor parses."""
    return sentences(normalise(report_body(text)))


def merge(a: Value, b: Value) -> Value:
    """The stronger of two mentions of one label (positive > uncertain > negative > none)."""
    return a if _RANK[a] >= _RANK[b] else b


class SentenceVotes:
    """Mentions collected from one sentence: direct ones, and indirect evidence kept apart."""

    __slots__ = ("direct", "indirect")

    def __init__(self) -> None:
        self.direct: dict[str, Value] = {}
        self.indirect: dict[str, Value] = {}

    def add(self, label: str, value: Value, indirect: bool = False) -> None:
        store = self.indirect if indirect else self.direct
        store[label] = merge(store.get(label), value)

    def resolved(self) -> dict[str, Value]:
        out = dict(self.indirect)
        out.update(self.direct)  # a direct mention of the label overrides indirect evidence
        return out


def empty() -> Labels:
    return dict.fromkeys(LABELS, None)


def finalize(per_sentence: Iterable[Mapping[str, Value]]) -> Labels:
    """Merge sentence votes into one report's labels; apply the hierarchy and No Finding rules."""
    out = empty()
    for votes in per_sentence:
        for k, v in votes.items():
            out[k] = merge(out[k], v)
    if out["Lung Opacity"] != POSITIVE:
        kids = [out[k] for k in OPACITY_CHILDREN]
        if POSITIVE in kids:
            out["Lung Opacity"] = POSITIVE
        elif UNCERTAIN in kids and out["Lung Opacity"] in (None, NEGATIVE):
            out["Lung Opacity"] = UNCERTAIN
    pathological = any(out[k] in (POSITIVE, UNCERTAIN) for k in PATHOLOGIES)
    out["No Finding"] = None if pathological else POSITIVE
    return out


def binarize(v: Value, uncertain_as: int = 1) -> int:
    """1 for positive (and for uncertain when ``uncertain_as`` is 1), else 0."""
    if v == POSITIVE:
        return 1
    if v == UNCERTAIN:
        return uncertain_as
    return 0
