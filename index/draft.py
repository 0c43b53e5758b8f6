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

A finding whose tier is "not validated" (a bundle whose confidence was never validated, such as a
phantom-trained one) is hedged: above threshold it is stated as "possible" with its confidence
written as not validated, below threshold it gets no normal statement; retrieval never drops it.

Language: every string comes from one wording table (index/wording.py, `[report] language`).
Retrieved sentences are copied only when they are written in the report's language and the
labeler reads that language (see `Drafter`); otherwise the templates of that language are used.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from index.guidelines import Reference, for_labels
from index.labelers.common import split_sentences
from index.retrieval import IndexMismatch, Retriever, Similar
from index.store import StoreError
from index.wording import ENGLISH, NOT_VALIDATED, Template, Wording, script_language, wording_for
from models.labels import LABELS, OPACITY_CHILDREN
from models.prediction import TIERS, Prediction

log = structlog.get_logger()

Labeler = Callable[[str], Mapping[str, int | None]]

# Anatomical order in which a radiologist reads a chest film.
ORDER: tuple[str, ...] = (
    "Support Devices", "Cardiomegaly", "Enlarged Cardiomediastinum", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pleural Effusion", "Pneumothorax", "Pleural Other", "Fracture",
)
_OPACITY_CHILDREN = OPACITY_CHILDREN
_LUNG = ("Lung Opacity", *_OPACITY_CHILDREN)

_TIER_STATUS = {"high": "present", "medium": "probable", "low": "possible", NOT_VALIDATED: "possible"}
_STATUS_TIER = {"present": "high", "probable": "medium", "possible": "low"}  # the tier a status reads as
if set(TIERS) - set(_TIER_STATUS):  # a new tier must say how it is worded before a draft meets it
    raise ImportError(f"draft status undefined for tiers {set(TIERS) - set(_TIER_STATUS)}")

# The English templates of the Bootstrapping-style baseline (the tables live in index/wording.py).
TEMPLATES: Mapping[str, Template] = ENGLISH.templates

def sentences(text: str) -> list[str]:
    """Sentences of a report section, with their punctuation (index.labelers.common.split_sentences,
    the labelers' own splitter, so a retrieved sentence is the unit its labels were read from);
    decimals ("1.5 cm") and numbered lists ("1. ...") stay in one piece."""
    out: list[str] = []
    for s in split_sentences(" ".join(text.split()), keep_end=True):
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
    wording: Wording = field(default=ENGLISH, repr=False)  # the language it is written in

    def reference_lines(self) -> list[str]:
        return [reference_line(i, r, self.wording) for i, r in enumerate(self.references, 1)]

    def similar_lines(self) -> list[str]:
        return [similar_line(s, self.wording) for s in self.similar]

    def text(self) -> str:
        """The whole draft as a reader sees it: report, references, similar cases, notes."""
        w = self.wording
        parts = [w.section_line.format(title=w.findings_title, body=self.findings),
                 w.section_line.format(title=w.impression_title, body=self.impression)]
        for title, lines in ((w.references_title, self.reference_lines()), (w.similar_title, self.similar_lines()),
                             (w.notes_title, list(self.notes))):
            if lines:
                parts.append(w.section_block.format(title=title, body="\n".join(lines)))
        return "\n\n".join(parts)

    def report(self) -> str:
        """Only FINDINGS and IMPRESSION, as a reference report is written (for label-F1)."""
        w = self.wording
        return (w.section_line.format(title=w.findings_title, body=self.findings) + "\n"
                + w.section_line.format(title=w.impression_title, body=self.impression))


def key_findings(s: Similar, wording: Wording = ENGLISH) -> str:
    pos = s.case.positive(uncertain=True)
    return wording.list_join.join(wording.labels[k] for k in pos) if pos else wording.labels["No Finding"]


def reference_line(i: int, r: Reference, wording: Wording = ENGLISH) -> str:
    """One guideline reference: the finding and why it applies in the report's language, the citation as published.

    A curated note (index/guidelines.py) is translated, and every language has all of them
    (index/wording.py checks it at import); a note given by another references function is kept.
    """
    key = (r.label, r.guideline.key)
    note = wording.reference_notes[key] if ENGLISH.reference_notes.get(key) == r.note else r.note
    return wording.reference_line.format(i=i, label=wording.labels.get(r.label, r.label), note=note,
                                         citation=r.guideline.cite())


def similar_line(s: Similar, wording: Wording = ENGLISH) -> str:
    return wording.similar_line.format(rank=s.rank, case_id=s.case.case_id, source=s.case.source,
                                       similarity=s.similarity, findings=key_findings(s, wording))


@dataclass(frozen=True)
class DraftConfig:
    k: int = 5  # similar cases used as evidence
    drop_unsupported: float = 0.0  # a low-tier positive is dropped when at most this share of cases has it
    add_supported: float = 0.6  # an unsure negative is stated as possible when at least this share has it
    use_retrieval_evidence: bool = True


class Drafter:
    """Prediction + similar cases -> Draft. The labeler judges retrieved sentences (index/labelers).

    wording: the report language (index/wording.py; a language code or a table).
    labeler_language: the language the labeler reads; the project's labelers (lexicon, grammar)
    read English only.

    A similar case's sentence is copied only when it is written in the report's language (judged
    by script) and the labeler reads that language: copying is safe only because the labeler
    checks that the sentence says what the prediction says (same polarity, same certainty, nothing
    contradicted). So a Japanese report never carries an English sentence, and it does not copy a
    Japanese case's sentence either: the English labelers cannot judge a Japanese sentence, so a
    copy would be unchecked, and the Japanese templates are the honest choice. Retrieval still
    informs the status of each finding and the similar-cases list in every language.
    """

    def __init__(self, labeler: Labeler, config: DraftConfig = DraftConfig(),
                 references: Callable[[list[str]], list[Reference]] = for_labels,
                 wording: str | Wording = ENGLISH, labeler_language: str = "en") -> None:
        self.config = config
        self.references = references
        self.wording = wording_for(wording)
        self.labeler_language = labeler_language
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
                if evidence and f.tier == "low" and (share or 0.0) <= self.config.drop_unsupported:
                    continue  # an unsure call no similar case supports
                out[f.label] = st
            elif f.tier == "high":
                if evidence and (share or 0.0) >= self.config.add_supported:
                    continue  # do not assert normal what most similar cases have
                out[f.label] = "absent"
            elif evidence and (share or 0.0) >= self.config.add_supported:
                out[f.label] = "possible"
        return out

    def draft(self, prediction: Prediction, similar: Sequence[Similar] | None, why_none: str | None = None) -> Draft:
        """similar None: no similar cases available (why_none says why, in the notes); []: none found.

        why_none: in the drafter's language (its wording's no_index, index_mismatch, ...); None: no_index.
        """
        w = self.wording
        cases = list(similar or [])[: self.config.k]
        status = self.status(prediction, cases if similar is not None else None)
        positives = [k for k in ORDER if status.get(k) in ("present", "probable", "possible")]
        stmts = self._positive_statements(positives, status, cases)
        stmts += normal_statements(status, w)
        notes = []
        if prediction.out_of_distribution:
            line = w.ood_line.format(score=prediction.ood_score, threshold=prediction.ood_threshold)
            stmts.append(Statement("", "note", line, "model"))
        if similar is None:
            why = w.no_index if why_none is None else why_none
            notes.append(w.alone_note.format(why=why, Why=w.capitalised(why)))
        stated = [k for k in positives if not (k == "Lung Opacity" and any(c in positives for c in _OPACITY_CHILDREN))]
        unvalidated = frozenset(f.label for f in prediction.findings if f.tier == NOT_VALIDATED)
        return _assemble(stmts, positives, status, self.references(stated), tuple(cases), tuple(notes),
                         "box-latent RAG", wording=w, unvalidated=unvalidated)

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
                out.append(Statement(label, st, template_sentence(label, st, self.wording), "template"))
        return out

    def _retrieved_sentence(self, label: str, st: str, status: Mapping[str, str],
                            cases: Sequence[Similar]) -> tuple[str, str, dict] | None:
        if self.labeler_language != self.wording.language:
            return None  # no labeler can check a sentence in this language: templates (class docstring)
        want = 1 if st == "present" else -1
        for s in cases:
            for sent in sentences(s.case.findings):
                if script_language(sent) != self.wording.language:
                    continue  # never a sentence of another language in the report
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


def template_sentence(label: str, st: str, wording: Wording = ENGLISH) -> str:
    t = wording.templates[label]
    if st == "present":
        return t.present
    if st == "probable":
        return wording.probable_sentence.format(noun=t.noun)
    if st == "possible":
        return wording.possible_sentence.format(noun=t.noun)
    return t.absent


def normal_statements(status: Mapping[str, str], wording: Wording = ENGLISH) -> list[Statement]:
    """Grouped normal statements for confidently absent findings, in reading order."""
    absent = {k for k, v in status.items() if v == "absent"}
    out: list[Statement] = []

    def add(labels: tuple[str, ...], text: str) -> None:
        out.append(Statement(", ".join(labels), "absent", text, "template"))
        absent.difference_update(labels)

    if {"Cardiomegaly", "Enlarged Cardiomediastinum"} <= absent:
        add(("Cardiomegaly", "Enlarged Cardiomediastinum"), wording.normal_cardiomediastinal)
    if set(_LUNG) <= absent:
        add(_LUNG, wording.normal_lungs)
    if {"Pleural Effusion", "Pneumothorax"} <= absent:
        add(("Pleural Effusion", "Pneumothorax"), wording.normal_pleural)
    for k in ORDER:
        if k in absent and wording.templates[k].absent:
            add((k,), wording.templates[k].absent)
    return out


def _impression(positives: list[str], status: Mapping[str, str], tiers: bool = True, wording: Wording = ENGLISH,
                unvalidated: frozenset[str] = frozenset()) -> str:
    """unvalidated: labels whose tier is "not validated": their confidence reads so, whatever the status."""
    w = wording
    items = []
    for k in positives:
        if k == "Lung Opacity" and any(c in positives for c in _OPACITY_CHILDREN):
            continue
        st, noun = status[k], w.templates[k].noun
        text = w.impression_status[st].format(noun=noun, Noun=w.capitalised(noun)) + w.impression_extra.get(k, "")
        tier = NOT_VALIDATED if k in unvalidated else _STATUS_TIER[st]
        items.append(w.impression_item.format(text=text, tier=w.tiers[tier]) if tiers
                     else w.impression_plain.format(text=text))
    if not items:
        return w.normal_impression
    if len(items) == 1:
        return items[0]
    return w.impression_join.join(w.impression_numbered.format(n=i, text=s) for i, s in enumerate(items, 1))


def _assemble(stmts: list[Statement], positives: list[str], status: Mapping[str, str], refs: list[Reference],
              cases: tuple[Similar, ...], notes: tuple[str, ...], method: str, tiers: bool = True,
              wording: Wording = ENGLISH, unvalidated: frozenset[str] = frozenset()) -> Draft:
    findings = wording.sentence_join.join(s.text for s in stmts if s.text) or wording.no_findings
    return Draft(findings=findings, impression=_impression(positives, status, tiers, wording, unvalidated),
                 statements=tuple(stmts), references=tuple(refs), similar=cases, notes=notes, method=method,
                 status={k: status[k] for k in LABELS if k in status}, wording=wording)


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
            return self.drafter.draft(prediction, None, why_none=self.drafter.wording.index_mismatch)
        except (StoreError, sqlite3.Error, OSError, RuntimeError) as exc:  # a damaged index: the draft still comes
            log.error("index.unreadable", folder=str(self.retriever.index.root), error=str(exc))
            return self.drafter.draft(prediction, None, why_none=self.drafter.wording.index_unreadable)
        return self.drafter.draft(prediction, similar)


def open_reporter(folder: Path, extractor: str = "lexicon", config: DraftConfig = DraftConfig(),
                  language: str | Wording = ENGLISH) -> Reporter:
    """A Reporter over an index folder, judging retrieved sentences with one of index.labelers.

    language: the report language (`[report] language`; index/wording.py). The labelers read English.
    """
    from index.labelers import get_extractor
    from index.retrieval import CaseIndex

    return Reporter(Retriever(CaseIndex.open(folder)), Drafter(get_extractor(extractor), config, wording=language))
