"""Draft report: FINDINGS and IMPRESSION from calibrated findings and similar prior cases.

The box-latent RAG drafter (`Drafter`):
1. Status per finding from the calibrated probability, its threshold and its confidence tier:
   above threshold -> "present" (high tier), "probable" (medium) or "possible" (low); below it with
   a high tier -> "absent" (a normal statement); otherwise not mentioned.
2. Retrieval evidence (the share of the k similar cases that have the finding) moves only the
   calls it contradicts: a low-tier positive that no similar case shares is dropped, a
   below-threshold finding that is not confidently absent is written as "possible" when at least
   60% of the similar cases have it, and no normal statement is made for a finding that many of
   them have. (Thresholds in DraftConfig, fixed before the evaluation, not fitted to it.)
3. Sentences: for each finding to state, the first sentence in the similar cases' FINDINGS that the
   report labeler reads with the same polarity and certainty, and that asserts nothing the
   prediction contradicts, is taken verbatim (it brings side, size and the site's own wording);
   otherwise a template sentence. Confident negatives get normal statements.
4. An out-of-distribution line when the OOD score is above its threshold, and the curated
   guideline references of every finding stated as present, probable or possible.

The "Bootstrapping-style" baseline (`bootstrap_draft`) is the paper's comparison without box or
retrieval: generate candidate sentences for every label from templates, rank them by the point
(center-only) probability, refine (keep the best candidate per label, drop unsure negatives,
resolve contradictions, order by anatomy). It has no confidence tiers, because those come from
the box, and no case retrieval.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from pathlib import Path

import structlog
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from index.guidelines import Reference, for_labels
from index.retrieval import NO_INDEX, IndexMismatch, Retriever, Similar
from index.store import StoreError
from models.labels import LABELS
from models.prediction import Prediction

log = structlog.get_logger()

Labeler = Callable[[str], Mapping[str, int | None]]

# Anatomical order in which a radiologist reads a chest film.
ORDER: tuple[str, ...] = (
    "Support Devices", "Cardiomegaly", "Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pleural Effusion", "Pneumothorax", "Pleural Other", "Fracture",
)
_OPACITY_CHILDREN = ("Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis")
_LUNG = ("Lung Opacity", *_OPACITY_CHILDREN)

STATUSES = ("present", "probable", "possible", "absent")
_TIER_STATUS = {"high": "present", "medium": "probable", "low": "possible", "not validated": "possible"}
_TIER_WORD = {"present": "high confidence", "probable": "medium confidence", "possible": "low confidence"}


@dataclass(frozen=True)
class Template:
    present: str  # a plain positive sentence
    noun: str  # for hedged wording and the impression
    absent: str  # a normal statement, "" where absence is not reported (devices)


TEMPLATES: Mapping[str, Template] = {
    "Enlarged Cardiomediastinum": Template("The mediastinum is widened.", "mediastinal widening",
                                           "Mediastinal contours are normal."),
    "Cardiomegaly": Template("The cardiac silhouette is enlarged.", "cardiomegaly", "The heart is normal in size."),
    "Lung Opacity": Template("Patchy lung opacity.", "lung opacity", "No focal lung opacity."),
    "Lung Lesion": Template("There is a pulmonary nodule.", "pulmonary nodule", "No pulmonary nodule or mass."),
    "Edema": Template("There is pulmonary edema.", "pulmonary edema", "No pulmonary edema."),
    "Consolidation": Template("There is airspace consolidation.", "consolidation", "No focal consolidation."),
    "Pneumonia": Template("Focal airspace opacity consistent with pneumonia.", "pneumonia", "No pneumonia."),
    "Atelectasis": Template("There is atelectasis.", "atelectasis", "No atelectasis."),
    "Pleural Effusion": Template("There is a pleural effusion.", "pleural effusion", "No pleural effusion."),
    "Pneumothorax": Template("There is a pneumothorax.", "pneumothorax", "No pneumothorax."),
    "Pleural Other": Template("There is pleural thickening.", "pleural thickening", "No pleural thickening."),
    "Fracture": Template("There is a rib fracture.", "rib fracture", "No displaced rib fracture."),
    "Support Devices": Template("Support devices are present.", "support devices", ""),
}
_IMPRESSION_EXTRA = {"Lung Lesion": "; CT recommended for further characterization"}

OOD_LINE = ("Note: this image is outside the model's experience (out-of-distribution score {score:.2f} above "
            "{threshold:.2f}); the statements above are unreliable and need a full read.")
NORMAL_IMPRESSION = "No acute cardiopulmonary abnormality."

_SPLIT = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9(])")


def sentences(text: str) -> list[str]:
    """Sentences of a report section; decimals ("1.5 cm") and numbered lists stay in one piece."""
    out = []
    for s in _SPLIT.split(" ".join(text.split())):
        s = s.strip()
        if not s:
            continue
        if out and re.fullmatch(r"\d+\.", out[-1]):  # "1." of a numbered impression
            out[-1] = f"{out[-1]} {s}"
        else:
            out.append(s)
    return out


@dataclass(frozen=True)
class Statement:
    label: str  # the finding ("" for a line that is about no single finding)
    status: str  # present | probable | possible | absent | note
    text: str
    origin: str  # "template" | "case <id>" | "model"


@dataclass(frozen=True)
class Draft:
    findings: str
    impression: str
    statements: tuple[Statement, ...]
    references: tuple[Reference, ...]
    similar: tuple[Similar, ...]
    notes: tuple[str, ...] = ()
    method: str = "box-latent RAG"
    status: Mapping[str, str] = field(default_factory=dict)  # label -> status for stated findings

    def text(self) -> str:
        """The whole draft as a reader sees it: report, references, similar cases, notes."""
        parts = [f"FINDINGS: {self.findings}", f"IMPRESSION: {self.impression}"]
        if self.references:
            parts.append("GUIDELINE REFERENCES:\n" + "\n".join(
                reference_line(i, r) for i, r in enumerate(self.references, 1)))
        if self.similar:
            parts.append("SIMILAR PRIOR CASES:\n" + "\n".join(similar_line(s) for s in self.similar))
        if self.notes:
            parts.append("NOTES:\n" + "\n".join(self.notes))
        return "\n\n".join(parts)

    def report(self) -> str:
        """Only FINDINGS and IMPRESSION, as a reference report is written (for label-F1)."""
        return f"FINDINGS: {self.findings}\nIMPRESSION: {self.impression}"


def key_findings(s: Similar) -> str:
    pos = s.case.positive(uncertain=True)
    return ", ".join(pos) if pos else "No Finding"


def reference_line(i: int, r: Reference) -> str:
    return f"[{i}] {r.label} ({r.note}): {r.guideline.cite()}"


def similar_line(s: Similar) -> str:
    return f"{s.rank}. case {s.case.case_id} ({s.case.source}), similarity {s.similarity:.2f}: {key_findings(s)}"


@dataclass(frozen=True)
class DraftConfig:
    k: int = 5  # similar cases used as evidence
    drop_unsupported: float = 0.0  # a low-tier positive is dropped when at most this share of cases has it
    add_supported: float = 0.6  # an unsure negative is stated as possible when at least this share has it
    use_retrieval_evidence: bool = True


class Drafter:
    """Prediction + similar cases -> Draft. The labeler judges retrieved sentences (index/labelers)."""

    def __init__(self, labeler: Labeler, config: DraftConfig = DraftConfig(),
                 references: Callable[[list[str]], list[Reference]] = for_labels) -> None:
        self.config = config
        self.references = references
        self._label = functools.lru_cache(maxsize=65536)(lambda s: dict(labeler(s)))

    def status(self, prediction: Prediction, similar: Sequence[Similar] | None) -> dict[str, str]:
        """label -> present / probable / possible / absent for the findings the draft states."""
        cases = list(similar or [])[: self.config.k]
        out: dict[str, str] = {}
        for f in prediction.findings:
            if f.label == "No Finding":
                continue
            share = (sum(s.case.labels.get(f.label) in (1, -1) for s in cases) / len(cases)) if cases else None
            evidence = self.config.use_retrieval_evidence and share is not None
            if f.present:
                st = _TIER_STATUS[f.tier]
                if evidence and st == "possible" and share <= self.config.drop_unsupported:
                    continue  # an unsure call no similar case supports
                out[f.label] = st
            elif f.tier == "high":
                if evidence and share >= self.config.add_supported:
                    continue  # do not assert normal what most similar cases have
                out[f.label] = "absent"
            elif evidence and share >= self.config.add_supported:
                out[f.label] = "possible"
        return out

    def draft(self, prediction: Prediction, similar: Sequence[Similar] | None, why_none: str = NO_INDEX) -> Draft:
        """similar None: no similar cases available (why_none says why, in the notes); []: none found."""
        cases = list(similar or [])[: self.config.k]
        status = self.status(prediction, cases if similar is not None else None)
        positives = [k for k in ORDER if status.get(k) in ("present", "probable", "possible")]
        stmts = self._positive_statements(positives, status, cases)
        stmts += normal_statements(status)
        notes = []
        if prediction.out_of_distribution:
            line = OOD_LINE.format(score=prediction.ood_score, threshold=prediction.ood_threshold)
            stmts.append(Statement("", "note", line, "model"))
        if similar is None:
            notes.append(why_none[:1].upper() + why_none[1:] + ": the draft is written from the model's findings alone.")
        stated = [k for k in positives if not (k == "Lung Opacity" and any(c in positives for c in _OPACITY_CHILDREN))]
        return _assemble(stmts, positives, status, self.references(stated), tuple(cases), tuple(notes),
                         "box-latent RAG")

    def _positive_statements(self, positives: list[str], status: Mapping[str, str],
                             cases: Sequence[Similar]) -> list[Statement]:
        stated = set(positives)
        covered: set[str] = set()
        out: list[Statement] = []
        for label in positives:
            if label in covered:
                continue
            if label == "Lung Opacity" and any(k in stated for k in _OPACITY_CHILDREN):
                covered.add(label)  # the specific opacity says it, as reports do
                continue
            st = status[label]
            found = self._retrieved_sentence(label, st, status, cases)
            if found is not None:
                text, case_id, labels = found
                covers = {k for k, v in labels.items() if v in (1, -1) and k in stated}
                covered |= covers
                out.append(Statement(label, st, text, f"case {case_id}"))
            else:
                covered.add(label)
                out.append(Statement(label, st, template_sentence(label, st), "template"))
        return out

    def _retrieved_sentence(self, label: str, st: str, status: Mapping[str, str],
                            cases: Sequence[Similar]) -> tuple[str, str, dict] | None:
        want = 1 if st == "present" else -1
        for s in cases:
            for sent in sentences(s.case.findings):
                labels = self._label(sent)
                if labels.get(label) != want or not _agrees(labels, status):
                    continue
                return sent, s.case.case_id, labels
        return None


def _agrees(labels: Mapping[str, int | None], status: Mapping[str, str]) -> bool:
    """A sentence agrees when each finding it mentions is stated the same way by the prediction.

    No Finding is derived by the labelers (no pathology mentioned), and Lung Opacity is implied by
    a mentioned opacity child (CheXpert hierarchy), so neither is judged on its own here.
    """
    child_mentioned = any(labels.get(k) in (1, -1) for k in _OPACITY_CHILDREN)
    for k, v in labels.items():
        if v is None or k == "No Finding" or (k == "Lung Opacity" and child_mentioned):
            continue
        st = status.get(k)
        if v == 1 and st != "present":
            return False
        if v == -1 and st not in ("probable", "possible"):
            return False
        if v == 0 and st != "absent":
            return False
    return True


def template_sentence(label: str, st: str) -> str:
    t = TEMPLATES[label]
    if st == "present":
        return t.present
    if st == "probable":
        return f"Probable {t.noun}."
    if st == "possible":
        return f"Possible {t.noun}."
    return t.absent


def normal_statements(status: Mapping[str, str]) -> list[Statement]:
    """Grouped normal statements for confidently absent findings, in reading order."""
    absent = {k for k, v in status.items() if v == "absent"}
    out: list[Statement] = []

    def add(labels: tuple[str, ...], text: str) -> None:
        out.append(Statement(", ".join(labels), "absent", text, "template"))
        absent.difference_update(labels)

    if {"Cardiomegaly", "Enlarged Cardiomediastinum"} <= absent:
        add(("Cardiomegaly", "Enlarged Cardiomediastinum"), "The cardiomediastinal silhouette is within normal limits.")
    if set(_LUNG) <= absent:
        add(_LUNG, "The lungs are clear.")
    if {"Pleural Effusion", "Pneumothorax"} <= absent:
        add(("Pleural Effusion", "Pneumothorax"), "No pleural effusion or pneumothorax.")
    for k in ORDER:
        if k in absent and TEMPLATES[k].absent:
            add((k,), TEMPLATES[k].absent)
    return out


def _impression(positives: list[str], status: Mapping[str, str], tiers: bool = True) -> str:
    items = []
    for k in positives:
        if k == "Lung Opacity" and any(c in positives for c in _OPACITY_CHILDREN):
            continue
        noun = TEMPLATES[k].noun + _IMPRESSION_EXTRA.get(k, "")
        st = status[k]
        prefix = {"present": "", "probable": "Probable ", "possible": "Possible "}[st]
        text = (prefix + noun) if prefix else noun[:1].upper() + noun[1:]
        items.append(f"{text} ({_TIER_WORD[st]})." if tiers else f"{text}.")
    if not items:
        return NORMAL_IMPRESSION
    if len(items) == 1:
        return items[0]
    return " ".join(f"{i}. {s}" for i, s in enumerate(items, 1))


def _assemble(stmts: list[Statement], positives: list[str], status: Mapping[str, str], refs: list[Reference],
              cases: tuple[Similar, ...], notes: tuple[str, ...], method: str, tiers: bool = True) -> Draft:
    findings = " ".join(s.text for s in stmts if s.text) or "No findings stated."
    return Draft(findings=findings, impression=_impression(positives, status, tiers), statements=tuple(stmts),
                 references=tuple(refs), similar=cases, notes=notes, method=method,
                 status={k: status[k] for k in LABELS if k in status})


def bootstrap_draft(probabilities: Mapping[str, float], thresholds: Mapping[str, float],
                    max_positive: int = 6, negative_below: float = 0.5) -> Draft:
    """The Bootstrapping-style baseline: templates -> rank by point probability -> refine.

    probabilities: center-only (point) probabilities, no box sampling; thresholds: the bundle's.
    negative_below: a negative is stated only when p < negative_below * threshold (confident by
    probability alone, as there are no box-based tiers).
    """
    cands: list[tuple[float, str, str]] = []  # (score, label, polarity)
    for k in ORDER:  # generate: one positive and one negative candidate per label
        p, t = float(probabilities[k]), float(thresholds[k])
        cands.append((p / max(t, 1e-6), k, "present"))
        cands.append(((t - p) / max(t, 1e-6), k, "absent"))
    cands.sort(key=lambda c: -c[0])  # rank
    status: dict[str, str] = {}
    n_pos = 0
    for score, k, pol in cands:  # refine: best candidate per label, caps, thresholds
        if k in status:
            continue
        if pol == "present" and score >= 1.0 and n_pos < max_positive:
            status[k] = "present"
            n_pos += 1
        elif pol == "absent" and score >= 1.0 - negative_below:
            status[k] = "absent"
    positives = [k for k in ORDER if status.get(k) == "present"]
    stmts = []
    for k in positives:
        if k == "Lung Opacity" and any(c in positives for c in _OPACITY_CHILDREN):
            continue
        stmts.append(Statement(k, "present", TEMPLATES[k].present, "template"))
    stmts += normal_statements(status)
    return _assemble(stmts, positives, status, [], (), (), "Bootstrapping-style baseline", tiers=False)


class Reporter:
    """Retrieval then drafting for one prediction: the one call the pipeline makes.

    An index built with another bundle is not an error for the reader: the draft is still written
    from the findings, and its notes say why there are no similar cases (the log says it louder).
    """

    def __init__(self, retriever: Retriever, drafter: Drafter) -> None:
        self.retriever, self.drafter = retriever, drafter

    def __call__(self, prediction: Prediction, digest: str) -> Draft:
        try:
            similar = self.retriever.search(prediction.center, prediction.radius, digest, k=self.drafter.config.k)
        except IndexMismatch as exc:
            log.error("index.bundle_mismatch", error=str(exc))
            return self.drafter.draft(prediction, None, why_none="similar cases index built with another model bundle")
        except (StoreError, sqlite3.Error, OSError, RuntimeError) as exc:  # a damaged index: the draft still comes
            log.error("index.unreadable", folder=str(self.retriever.index.root), error=str(exc))
            return self.drafter.draft(prediction, None, why_none="similar cases index could not be read")
        return self.drafter.draft(prediction, similar)


def open_reporter(folder: Path, extractor: str = "lexicon", config: DraftConfig = DraftConfig()) -> Reporter:
    """A Reporter over an index folder, judging retrieved sentences with one of index.labelers."""
    from index.labelers import get_extractor
    from index.retrieval import CaseIndex

    return Reporter(Retriever(CaseIndex.open(folder)), Drafter(get_extractor(extractor), config))
