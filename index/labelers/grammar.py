"""Extractor B, "grammar": a sentence-level clause grammar over chunked words.

Method (no phrase regexes: it reads words, not strings):

1. Tokens. Each sentence is split into words and the punctuation ``, ; : /``; "air space" is
   joined to "airspace".
2. Chunks. A longest-match pass over a word table turns the tokens into items: NEG ("no",
   "not", "without", "free of", "negative for", "no evidence of", ...), HEDGE ("may",
   "possible", "probable", "likely", "questionable", "cannot exclude", "suspicious for", ...),
   POSTHEDGE ("cannot be excluded", "not excluded", "suspected"), VERSUS, WEAK ("suggest",
   "to indicate"), COP ("is", "are", "appears", "remains", ...), EVID ("seen", "identified",
   "present", ...), RESOLVED ("resolved", "removed", "absent"), STATE ("normal", "within normal
   limits", "clear", "intact", "sharp" = normal; "enlarged", "widened", "blunted", "prominent",
   "increased" = abnormal; "borderline", "upper limits of normal" = border), CONJ ("and", "or",
   ",", "/"), EXIST ("there"), SPLIT ("but", "however", "although", "except", "which", "with",
   ";", ":"), NEUTRAL ("no change", "no interval change"). Every other run of words is a noun
   phrase (NP); "X of (the) Y" stays one NP when X is relational ("blunting of the costophrenic
   angle", "enlargement of the cardiac silhouette", "areas of consolidation", "XXXX of effusion").
3. NP meaning. An NP means findings by the head-noun rules of :data:`HEADS` (a head word, the
   modifiers it needs, the modifiers that cancel it: "effusion" but not "pericardial effusion",
   "thickening" only with "pleural", "collapse" only with "lobe"/"lung", "mass" but not
   "mediastinal mass", which is Enlarged Cardiomediastinum), or an anatomical subject (:data:`ANATOMY`: heart, cardiomediastinal
   silhouette, mediastinum, lungs, pleural spaces, costophrenic angles, pulmonary vasculature,
   bones).
4. Clauses. A sentence is cut into clauses at SPLIT items, before "without", before EXIST, and
   at a comma or "and" that is followed by NEG, HEDGE or EXIST.
5. Clause rules. Inside a clause:
   - a finding NP after a NEG is negative ("no effusion or pneumothorax" -> both 0), after a
     HEDGE or a border state uncertain, after WEAK uncertain unless a NEG came first ("no
     opacity to suggest pneumonia" -> 0);
   - predicates after NPs act on them: ``[COP] NEG EVID`` ("is not seen") and RESOLVED -> 0,
     POSTHEDGE or ``COP HEDGE`` ("is likely") -> -1, ``[COP] normal`` right after a finding
     ("vascular engorgement is within normal limits") -> 0; VERSUS makes the NPs on both sides
     uncertain; otherwise a finding NP is positive (existential "there is X", bare "mild
     cardiomegaly.", "X is present");
   - subject-state pairs: anatomy NPs followed by ``[COP] [NEG] STATE`` ("heart size is normal",
     "heart is not enlarged", "heart and mediastinum normal"), or a STATE before them ("normal
     heart size and mediastinal contours", "clear lungs", "blunted costophrenic angles"), give
     labels by :data:`STATE_TABLE` (heart + normal -> Cardiomegaly 0, heart + enlarged -> 1,
     heart + border -> -1, lungs + normal -> Lung Opacity, Consolidation, Pneumonia, Edema 0,
     costophrenic angles + blunted -> Pleural Effusion 1, bones + intact -> Fracture 0, ...).
     A negated abnormal state counts as normal. Anatomy statements and costophrenic blunting
     are indirect evidence: a direct finding in the same sentence overrides them.

The vocabulary here is written separately from extractor A's and decides the same questions the
same way where the project has a stated convention (granulomas, bone lesions, pericardial
effusions, bone densities excluded; nodules, calcified or not, included; congestion and heart failure are Edema;
clips, stents, hardware and monitoring electrodes are Support Devices, sternotomy wires are not;
old, granulomatous or tuberculous infection is not Pneumonia; "in the appropriate clinical setting"
hedges).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from index.labelers.common import NEGATIVE, POSITIVE, UNCERTAIN, Labels, SentenceVotes, finalize, report_sentences

NAME = "grammar"

_TOKEN = re.compile(r"[a-z0-9]+|[,;:/]")

# ---- chunk vocabulary ---------------------------------------------------------------------------
_WORDS: dict[str, tuple[str, str]] = {}
for _w in ("no", "not", "without", "nor", "negative"):
    _WORDS[_w] = ("NEG", _w)
for _w in ("may", "might", "could", "possible", "possibly", "questionable",
           "suspect", "presumed", "presumably", "equivocal", "indeterminate", "differential",
           "favor", "favored", "favour", "uncertain", "question", "alternatively", "consider", "exclude",
           "correlate", "correlation", "potential"):
    _WORDS[_w] = ("HEDGE", _w)
for _w in ("suspected", "questioned"):
    _WORDS[_w] = ("POSTHEDGE", _w)
for _w in ("versus", "vs"):
    _WORDS[_w] = ("VERSUS", _w)
for _w in ("suggest", "suggests", "suggesting", "suggestive", "indicate", "indicating", "indicates"):
    _WORDS[_w] = ("WEAK", _w)
for _w in ("is", "are", "was", "were", "be", "been", "being", "appears", "appear", "appeared", "remains", "remain",
           "remained", "seems", "seem", "looks", "look", "has", "have", "had"):
    _WORDS[_w] = ("COP", _w)
for _w in ("seen", "identified", "noted", "present", "visualized", "demonstrated", "evident", "appreciated",
           "visible", "detected", "observed", "apparent", "shown", "found", "demonstrable", "noticed"):
    _WORDS[_w] = ("EVID", _w)
for _w in ("resolved", "cleared", "removed", "absent", "gone"):
    _WORDS[_w] = ("RESOLVED", _w)
for _w in ("normal", "unremarkable", "preserved"):
    _WORDS[_w] = ("STATE", "normal")
for _w in ("clear", "intact", "sharp"):
    _WORDS[_w] = ("STATE", _w)
for _w in ("enlarged", "widened", "wide", "blunted", "prominent", "increased", "large", "engorged", "congested",
           "indistinct"):
    _WORDS[_w] = ("STATE", _w)
# "borderline cardiomegaly" grades a finding (MeSH: Cardiomegaly/borderline); "upper limits of
# normal" hedges between normal and not
_WORDS["borderline"] = ("STATE", "borderline")
for _w in ("and", "or", ",", "/", "plus"):
    _WORDS[_w] = ("CONJ", _w)
_WORDS["there"] = ("EXIST", "there")
for _w in ("but", "however", "although", "though", "except", "whereas", "while", "which", "yet", "with",
           ";", ":", "who"):
    _WORDS[_w] = ("SPLIT", _w)
for _w in ("the", "a", "an", "this", "these", "those", "its", "their", "both", "any", "some", "his", "her"):
    _WORDS[_w] = ("DET", _w)
for _w in ("in", "at", "on", "to", "of", "over", "along", "from", "for", "by", "into", "than", "as", "after",
           "since", "due", "per", "about", "below", "above", "under", "through", "throughout", "across", "between",
           "within", "towards", "toward", "beneath", "behind", "near", "overlying", "projecting", "involving",
           "where", "when", "if", "whether", "that"):
    _WORDS[_w] = ("PREP", _w)
for _w in ("again", "also", "still", "now", "otherwise", "currently", "well", "bilaterally", "mildly", "slightly",
           "minimally", "moderately", "markedly", "severely", "significantly", "grossly", "essentially",
           "stably", "somewhat", "very", "quite", "definitely", "clearly", "definite", "definitive",
           # a near-certain reading asserts the finding, as the MeSH indexers read it
           "probable", "probably", "likely", "most"):
    _WORDS[_w] = ("SKIP", _w)

_PHRASES: dict[tuple[str, ...], tuple[str, str]] = {
    ("no", "evidence", "of"): ("NEG", "no"), ("no", "signs", "of"): ("NEG", "no"),
    ("no", "sign", "of"): ("NEG", "no"), ("free", "of"): ("NEG", "free"), ("negative", "for"): ("NEG", "no"),
    ("absence", "of"): ("NEG", "no"), ("resolution", "of"): ("NEG", "no"), ("removal", "of"): ("NEG", "no"),
    ("clear", "of"): ("NEG", "no"), ("no", "longer"): ("NEG", "no"),
    ("no", "change"): ("NEUTRAL", ""), ("no", "interval", "change"): ("NEUTRAL", ""),
    ("no", "significant", "change"): ("NEUTRAL", ""), ("no", "significant", "interval", "change"): ("NEUTRAL", ""),
    ("without", "change"): ("NEUTRAL", ""), ("without", "interval", "change"): ("NEUTRAL", ""),
    ("without", "significant", "change"): ("NEUTRAL", ""), ("no", "increase"): ("NEUTRAL", ""),
    ("no", "decrease"): ("NEUTRAL", ""), ("not", "only"): ("NEUTRAL", ""), ("not", "necessarily"): ("NEUTRAL", ""),
    ("cannot", "exclude"): ("HEDGE", ""), ("can", "not", "exclude"): ("HEDGE", ""),
    ("cannot", "rule", "out"): ("HEDGE", ""), ("rule", "out"): ("HEDGE", ""), ("question", "of"): ("HEDGE", ""),
    ("suspicious", "for"): ("HEDGE", ""), ("concerning", "for"): ("HEDGE", ""), ("worrisome", "for"): ("HEDGE", ""),
    ("suspicious", "of"): ("HEDGE", ""), ("concern", "for"): ("HEDGE", ""), ("raises", "concern", "for"): ("HEDGE", ""),
    ("difficult", "to", "exclude"): ("HEDGE", ""), ("difficult", "to", "completely", "exclude"): ("HEDGE", ""),
    ("evaluation", "of"): ("HEDGE", ""), ("evaluation", "for"): ("HEDGE", ""),
    # "... compatible with pneumonia in the appropriate clinical setting": a hedge on either side
    ("appropriate", "clinical", "setting"): ("SETTING", ""), ("correct", "clinical", "setting"): ("SETTING", ""),
    ("proper", "clinical", "setting"): ("SETTING", ""), ("right", "clinical", "setting"): ("SETTING", ""),
    ("evaluate", "for"): ("HEDGE", ""), ("another", "consideration"): ("POSTHEDGE", ""),
    ("also", "a", "consideration"): ("POSTHEDGE", ""), ("a", "consideration"): ("POSTHEDGE", ""),
    ("age", "indeterminate"): ("NEUTRAL", ""), ("indeterminate", "age"): ("NEUTRAL", ""),
    ("raises", "the", "possibility", "of"): ("HEDGE", ""), ("differential", "diagnosis"): ("HEDGE", ""),
    ("cannot", "be", "excluded"): ("POSTHEDGE", ""), ("can", "not", "be", "excluded"): ("POSTHEDGE", ""),
    ("could", "not", "be", "excluded"): ("POSTHEDGE", ""), ("not", "be", "excluded"): ("POSTHEDGE", ""),
    ("not", "excluded"): ("POSTHEDGE", ""), ("not", "ruled", "out"): ("POSTHEDGE", ""),
    ("cannot", "be", "ruled", "out"): ("POSTHEDGE", ""), ("not", "entirely", "excluded"): ("POSTHEDGE", ""),
    ("cannot", "be", "entirely", "excluded"): ("POSTHEDGE", ""),
    ("within", "normal", "limits"): ("STATE", "normal"), ("normal", "in", "size"): ("STATE", "normal"),
    ("within", "limits", "of", "normal"): ("STATE", "normal"), ("within", "the", "limits", "of", "normal"): ("STATE", "normal"),
    ("normal", "in", "caliber"): ("STATE", "normal"), ("normal", "in", "contour"): ("STATE", "normal"),
    ("normal", "in", "appearance"): ("STATE", "normal"),
    ("upper", "limits", "of", "normal"): ("STATE", "border"), ("upper", "limit", "of", "normal"): ("STATE", "border"),
    ("top", "normal"): ("STATE", "border"), ("top", "of", "normal"): ("STATE", "border"),
    ("high", "normal"): ("STATE", "border"), ("upper", "normal"): ("STATE", "border"),
    ("top", "normal", "limits"): ("STATE", "border"), ("upper", "range", "of", "normal"): ("STATE", "border"),
    ("consistent", "with"): ("PREP", "with"), ("compatible", "with"): ("PREP", "with"),
    ("in", "keeping", "with"): ("PREP", "with"), ("along", "with"): ("PREP", "with"),
    ("aside", "from"): ("SPLIT", ""), ("apart", "from"): ("SPLIT", ""), ("except", "for"): ("SPLIT", ""),
    ("to", "suggest"): ("WEAK", ""), ("to", "indicate"): ("WEAK", ""), ("suggestive", "of"): ("WEAK", ""),
    ("status", "post"): ("PREP", ""),
}
_BY_FIRST: dict[str, list[tuple[tuple[str, ...], tuple[str, str]]]] = {}
for _p, _v in sorted(_PHRASES.items(), key=lambda kv: -len(kv[0])):
    _BY_FIRST.setdefault(_p[0], []).append((_p, _v))

# NP heads that take an "of" complement into the same NP.
_RELATIONAL = frozenset({"blunting", "enlargement", "widening", "thickening", "area", "areas", "evidence", "signs",
                         "sign", "xxxx", "foci", "focus", "amount", "degree", "component", "collapse", "loss",
                         "opacification", "calcification", "calcifications", "findings", "finding", "volume",
                         "prominence"})

# ---- NP meaning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """A head word means ``labels`` when the NP has one of ``needs`` (if any) and none of ``cancels``."""

    labels: tuple[str, ...]
    needs: frozenset[str] = frozenset()
    cancels: frozenset[str] = frozenset()
    indirect: bool = False
    negonly: bool = False


def _h(labels, needs=(), cancels=(), **kw) -> Head:
    return Head(tuple(labels) if not isinstance(labels, str) else (labels,), frozenset(needs), frozenset(cancels), **kw)


_MEDIASTINAL = ("mediastinal", "mediastinum", "cardiomediastinal")
_DEVICE_LINE = ("central", "venous", "picc", "arterial", "midline", "dialysis", "jugular", "subclavian", "ij",
                "swan", "ganz", "port")
HEADS: dict[str, list[Head]] = {}


def _add(words: str, head: Head) -> None:
    for w in words.split():
        HEADS.setdefault(w, []).append(head)


_add("effusion effusions", _h("Pleural Effusion", cancels=("pericardial", "joint")))
_add("fluid", _h("Pleural Effusion", needs=("pleural",)))
_add("hydrothorax hemothorax", _h("Pleural Effusion"))
_add("hydropneumothorax hemopneumothorax", _h(("Pleural Effusion", "Pneumothorax")))
_add("blunting", _h("Pleural Effusion", needs=("costophrenic", "cp", "costodiaphragmatic"), indirect=True))
_add("meniscus", _h("Pleural Effusion", indirect=True))
_add("pneumothorax pneumothoraces", _h("Pneumothorax"))
_add("cardiomegaly", _h("Cardiomegaly"))
_add("enlargement", _h("Cardiomegaly", needs=("cardiac", "heart")))
_add("enlargement widening adenopathy lymphadenopathy", _h("Enlarged Cardiomediastinum", needs=_MEDIASTINAL))
_add("opacity opacities opacification infiltrate infiltrates infiltration haziness density densities",
     _h("Lung Opacity", cancels=("bone", "breast", "tissue", "mineral", "osseous")))
_add("opacity opacities density densities", _h("Lung Lesion", needs=("nodular",)))
_add("opacity opacities", _h("Consolidation", needs=("consolidative",)))
_add("disease process filling", _h("Lung Opacity", needs=("airspace",)))
_add("glass", _h("Lung Opacity", needs=("ground",)))
_add("consolidation consolidations", _h("Consolidation"))
# old or granulomatous infection is a healed process, not a pneumonia
_OLD_INFECTION = ("granulomatous", "tuberculous", "tuberculosis", "histoplasmosis", "fungal", "mycobacterial", "prior",
                  "previous", "old", "remote", "healed", "chronic")
_add("pneumonia bronchopneumonia pneumonitis infection aspiration", _h("Pneumonia", cancels=_OLD_INFECTION))
_add("process", _h("Pneumonia", needs=("infectious",), cancels=_OLD_INFECTION))
_add("atelectasis atelectases", _h("Atelectasis"))
_add("change changes", _h("Atelectasis", needs=("atelectatic",)))
_add("collapse", _h("Atelectasis", needs=("lobe", "lobar", "lung", "lobes", "segmental", "lingula", "lingular")))
_add("loss", _h("Atelectasis", needs=("volume",)))
_add("edema", _h("Edema", cancels=("tissue", "subcutaneous", "soft")))
_add("congestion", _h("Edema"))
_add("engorgement redistribution prominence indistinctness", _h("Edema", needs=("vascular", "vasculature",
                                                                           "vascularity")))
_add("changes", _h("Edema", needs=("congestive",)))
_add("failure", _h("Edema", needs=("heart", "congestive")))
_add("chf kerley cephalization overload", _h("Edema"))
_add("nodule nodules", _h("Lung Lesion"))
_add("mass masses", _h("Lung Lesion", cancels=("tissue", "effect", "mediastinal")))
_add("mass masses", _h("Enlarged Cardiomediastinum", needs=("mediastinal",)))
_add("disease", _h("Lung Lesion", needs=("metastatic",)))
_add("lesion lesions", _h("Lung Lesion", cancels=("lytic", "blastic", "bone", "bony", "osseous", "skin", "sclerotic",
                                                  "expansile", "lucent")))
_add("tumor tumors tumour neoplasm neoplasms carcinoma malignancy metastasis metastases cavitation cavity cavities "
     "cavitary masslike fibronodular", _h("Lung Lesion"))
_add("thickening plaque plaques calcification calcifications scarring scar fibrosis",
     _h("Pleural Other", needs=("pleural", "pleura", "pleuroparenchymal")))
# the fissures are pleura; apical thickening is an apical pleural cap
_add("thickening", _h("Pleural Other", needs=("fissural", "fissure", "fissures", "apical", "biapical")))
_add("fibrothorax", _h("Pleural Other"))
# a pleural abnormality that is not fluid (MeSH: Pleura/abnormal, Opacity/pleura)
_add("abnormality abnormalities", _h("Pleural Other", needs=("pleural",)))
_add("opacity opacities", _h("Pleural Other", needs=("pleural",), cancels=("parenchymal", "pleuroparenchymal")))
_add("cap capping", _h("Pleural Other", needs=("apical",)))
# a broken line or lead is a device fault, not a bone fracture
_add("fracture fractures fractured fx", _h("Fracture", cancels=("catheter", "lead", "leads", "wire", "wires", "line")))
_add("abnormality abnormalities injury injuries findings",
     _h("Fracture", needs=("osseous", "bony", "skeletal", "bone"), negonly=True))
_add("tube tubes ett tracheostomy catheter catheters picc portacath pacemaker pacemakers pacer aicd icd "
     "defibrillator lead leads electrode electrodes clip clips stent stents hardware drain drains "
     "coil coils screw screws stimulator stimulators generator arthroplasty", _h("Support Devices"))
_add("tip", _h("Support Devices", needs=("xxxx",)))
# sternotomy wires are a post-surgical change, not a support device (as the MeSH indexers read them)
_add("wire wires", _h("Support Devices", cancels=("guide", "sternotomy", "sternal", "cerclage")))
_add("line lines", _h("Support Devices", needs=_DEVICE_LINE))
_add("port", _h("Support Devices", needs=("chest", "power", "infusion", "mediport", "venous", "right", "left")))
_add("valve valves", _h("Support Devices", needs=("prosthetic", "mechanical", "replacement", "bioprosthetic")))
_add("replacement", _h("Support Devices", needs=("valve",)))
_add("rod rods plate plates", _h("Support Devices", needs=("fixation", "fusion", "orthopedic", "spinal")))
_add("device devices", _h("Support Devices", needs=("support", "medical", "closure", "occluder", "implanted", "cardiac",
                                                   "electronic", "monitoring")))

# Anatomical subjects: class -> test on the NP's words (set) and its last word.
_LUNG_GROUP = {"Lung Opacity": NEGATIVE, "Consolidation": NEGATIVE, "Pneumonia": NEGATIVE, "Edema": NEGATIVE}
_NO_EFFUSION = {"Pleural Effusion": NEGATIVE}
_NO_PLEURAL = {"Pleural Effusion": NEGATIVE, "Pneumothorax": NEGATIVE}
STATE_TABLE: dict[str, dict[str, dict[str, int]]] = {
    "heart": {"normal": {"Cardiomegaly": NEGATIVE}, "enlarged": {"Cardiomegaly": POSITIVE},
              "large": {"Cardiomegaly": POSITIVE}, "increased": {"Cardiomegaly": POSITIVE},
              "border": {"Cardiomegaly": UNCERTAIN}, "borderline": {"Cardiomegaly": POSITIVE}},
    "cardiomediastinal": {"normal": {"Cardiomegaly": NEGATIVE, "Enlarged Cardiomediastinum": NEGATIVE},
                          "enlarged": {"Enlarged Cardiomediastinum": POSITIVE},
                          "widened": {"Enlarged Cardiomediastinum": POSITIVE},
                          "border": {"Cardiomegaly": UNCERTAIN, "Enlarged Cardiomediastinum": UNCERTAIN},
                          "borderline": {"Cardiomegaly": POSITIVE}},
    "mediastinum": {"normal": {"Enlarged Cardiomediastinum": NEGATIVE},
                    "enlarged": {"Enlarged Cardiomediastinum": POSITIVE},
                    "widened": {"Enlarged Cardiomediastinum": POSITIVE},
                    "wide": {"Enlarged Cardiomediastinum": POSITIVE},
                    "border": {"Enlarged Cardiomediastinum": UNCERTAIN},
                    "borderline": {"Enlarged Cardiomediastinum": POSITIVE}},
    "lungs": {"normal": _LUNG_GROUP, "clear": _LUNG_GROUP},
    "pleura": {"normal": _NO_PLEURAL, "clear": _NO_PLEURAL},
    "costophrenic": {"normal": _NO_EFFUSION, "clear": _NO_EFFUSION, "sharp": _NO_EFFUSION,
                     "blunted": {"Pleural Effusion": POSITIVE}},
    "vasculature": {"normal": {"Edema": NEGATIVE}, "prominent": {"Edema": POSITIVE},
                    "increased": {"Edema": POSITIVE}, "engorged": {"Edema": POSITIVE},
                    "congested": {"Edema": POSITIVE}, "indistinct": {"Edema": POSITIVE}},
    "bones": {"normal": {"Fracture": NEGATIVE}, "intact": {"Fracture": NEGATIVE}},
}
_ABNORMAL_STATES = frozenset({"enlarged", "widened", "wide", "blunted", "prominent", "increased", "large",
                              "engorged", "congested", "indistinct"})


def _anatomy(words: frozenset[str], last: str) -> str | None:
    if words & {"cardiomediastinal", "cardiopericardial"}:
        return "cardiomediastinal"
    if words & {"heart", "cardiac"}:
        return "heart"
    if words & {"mediastinum", "mediastinal"} and not words & {"nodes", "lymph", "node"}:
        return "mediastinum"
    if words & {"costophrenic", "cp", "costodiaphragmatic"} and last in {"angle", "angles", "sulcus", "sulci",
                                                                         "recess", "recesses", "xxxx"}:
        return "costophrenic"
    if last in {"vascularity", "vasculature", "vessels"} or (last == "xxxx" and "pulmonary" in words):
        return "vasculature"
    if words & {"pleura", "pleurae"} or ("pleural" in words and last in {"space", "spaces", "surfaces"}):
        return "pleura"
    if last in {"lungs", "lung", "parenchyma", "fields"} or (last == "xxxx" and "lung" in words):
        return "lungs"
    if last in {"bones", "ribs", "skeleton"} or (words & {"osseous", "bony", "skeletal", "bone"} and
                                                 last in {"structures", "structure", "thorax"}):
        return "bones"
    return None


@dataclass
class NP:
    words: tuple[str, ...]
    findings: list[tuple[str, Head]] = field(default_factory=list)
    anatomy: str | None = None
    pre: int | None = None  # value decided by what precedes it (NEG / HEDGE / WEAK)
    post: int | None = None  # value decided by the predicate after it
    versus: bool = False

    @classmethod
    def of(cls, words: list[str]) -> NP:
        ws = frozenset(words)
        found: list[tuple[str, Head]] = []
        for w in words:
            for head in HEADS.get(w, ()):
                if head.needs and not (ws & head.needs):
                    continue
                if ws & head.cancels:
                    continue
                found.extend((label, head) for label in head.labels)
        return cls(tuple(words), found, None if found else _anatomy(ws, words[-1]))


@dataclass
class Item:
    kind: str
    value: str = ""
    np: NP | None = None


# A density explained by one of these is not a lung finding (not granulomas: a nodule read as a
# granuloma is still a nodule, as the MeSH indexers tag it).
_BENIGN = frozenset({"nipple", "nipples", "island", "islands"})


def _chunk(tokens: list[str]) -> list[Item]:
    items: list[Item] = []
    words: list[str] = []

    def close() -> None:
        if words:
            items.append(Item("NP", np=NP.of(list(words))))
            words.clear()

    i, n = 0, len(tokens)
    while i < n:
        tok = tokens[i]
        match = None
        for phrase, kv in _BY_FIRST.get(tok, ()):
            if tuple(tokens[i:i + len(phrase)]) == phrase:
                match = (phrase, kv)
                break
        if match is not None:
            close()
            items.append(Item(*match[1]))
            i += len(match[0])
            continue
        kind = _WORDS.get(tok)
        if kind is None:
            words.append(tok)
            i += 1
            continue
        k, v = kind
        if k == "PREP" and tok == "of" and words and words[-1] in _RELATIONAL:
            i += 1  # "blunting of the costophrenic angle" stays one NP
            while i < n and _WORDS.get(tokens[i], ("",))[0] == "DET":
                i += 1
            continue
        if k in ("DET", "SKIP"):
            i += 1
            continue
        close()
        items.append(Item(k, v))
        i += 1
    close()
    return items


def _clauses(items: list[Item]) -> list[list[Item]]:
    out: list[list[Item]] = [[]]
    for j, it in enumerate(items):
        nxt = items[j + 1] if j + 1 < len(items) else None
        if it.kind == "SPLIT":
            out.append([])
            continue
        if (it.kind == "NEG" and it.value == "without") or it.kind == "EXIST":
            out.append([])
        if it.kind == "CONJ" and it.value in (",", "and") and nxt is not None and nxt.kind in ("NEG", "HEDGE", "EXIST"):
            out.append([])
            continue
        out[-1].append(it)
    return [c for c in out if c]


def _next_kind(clause: list[Item], j: int, skip=("COP",)) -> tuple[int, Item | None]:
    j += 1
    while j < len(clause) and clause[j].kind in skip:
        j += 1
    return (j, clause[j]) if j < len(clause) else (j, None)


def _read_clause(clause: list[Item], votes: SentenceVotes) -> None:
    nps: list[NP] = []
    pending: list[NP] = []  # NPs since the last predicate: the subjects of the next one
    prestate: tuple[str, bool] | None = None
    neg = hedge = weak = versus_next = setting = False
    state_neg_at: set[int] = set()

    def apply_state(np_: NP, state: str, negated: bool) -> None:
        if np_.anatomy is None:
            return
        if negated:
            if state not in _ABNORMAL_STATES:
                return
            state = "normal"
        for label, v in STATE_TABLE[np_.anatomy].get(state, {}).items():
            votes.add(label, v, indirect=True)

    for j, it in enumerate(clause):
        k = it.kind
        if k == "NEG":
            nj, nxt = _next_kind(clause, j)
            if nxt is not None and nxt.kind == "STATE" and pending:  # "heart is not enlarged"
                state_neg_at.add(nj)
                continue
            if nxt is not None and nxt.kind in ("EVID", "RESOLVED") and pending:
                for p in pending:
                    p.post = NEGATIVE if p.post is None else p.post
                pending = []
                continue
            neg = True
        elif k == "HEDGE":
            if j > 0 and clause[j - 1].kind == "COP" and pending:  # "X is likely", "it would be difficult to exclude Y"
                for p in pending:
                    p.post = UNCERTAIN
                pending = []
            hedge = True
        elif k == "SETTING":  # "in the appropriate clinical setting": every finding of the clause hedged
            setting = True
        elif k == "POSTHEDGE":
            for p in pending:
                p.post = UNCERTAIN
            pending = []
        elif k == "VERSUS":  # "X versus Y": both X and Y uncertain
            if nps:
                nps[-1].versus = True
            versus_next = True
        elif k == "WEAK":
            weak = True
        elif k == "RESOLVED":
            for p in pending:
                p.post = NEGATIVE if p.post is None else p.post
            pending = []
        elif k == "STATE":
            negated = j in state_neg_at
            subjects = [p for p in pending if p.anatomy]
            if (it.value == "normal" and not negated and pending and pending[-1].findings
                    and clause[j - 1].kind in ("COP", "NP")):  # "vascular engorgement is within normal limits"
                pending[-1].post = NEGATIVE if pending[-1].post is None else pending[-1].post
            if subjects:
                for p in subjects:
                    apply_state(p, it.value, negated)
                pending = []
                prestate = None
            elif j > 0 and clause[j - 1].kind == "STATE" and prestate and prestate[0] in ("border", "borderline"):
                pass  # "borderline enlarged heart" stays borderline
            else:
                prestate = (it.value, negated)
            if it.value == "border":
                hedge = True
        elif k == "NP":
            np_ = it.np
            if np_ is None:
                continue
            if neg:
                np_.pre = NEGATIVE
            elif hedge or weak:
                np_.pre = UNCERTAIN
            if versus_next:
                np_.versus, versus_next = True, False
            if np_.anatomy and prestate is not None:
                apply_state(np_, *prestate)
            if (_BENIGN & set(np_.words) and nps and j > 0 and clause[j - 1].kind == "PREP"
                    and clause[j - 1].value == "with"):  # "nodular densities consistent with nipple shadows"
                for prev in nps:
                    if prev.post is None and any(lb in ("Lung Lesion", "Lung Opacity") for lb, _ in prev.findings):
                        prev.post = NEGATIVE
            nps.append(np_)
            pending.append(np_)
        elif k == "COP":
            prestate = None
        elif k == "EXIST":
            pending = []
    for np_ in nps:
        for label, head in np_.findings:
            if np_.pre is not None:
                value = np_.pre
            elif np_.post == UNCERTAIN or np_.versus or (setting and np_.post is None):
                value = UNCERTAIN
            elif np_.post is not None:
                value = np_.post
            else:
                value = POSITIVE
            if head.negonly and value != NEGATIVE:
                continue
            votes.add(label, value, indirect=head.indirect)


def tokens(sentence: str) -> list[str]:
    toks = _TOKEN.findall(sentence)
    out: list[str] = []
    for t in toks:
        if t == "space" and out and out[-1] == "air":
            out[-1] = "airspace"
        else:
            out.append(t)
    return out


def label_report(text: str) -> Labels:
    """The 14 labels of one report (see :mod:`index.labelers.common` for the output rules)."""
    per_sentence = []
    for s in report_sentences(text):
        votes = SentenceVotes()
        toks = tokens(s)
        for clause in _clauses(_chunk(toks)):
            _read_clause(clause, votes)
        if _air_fluid_in_pleura(toks):
            votes.add("Pneumothorax", POSITIVE, indirect=True)
        per_sentence.append(votes.resolved())
    return finalize(per_sentence)


def _air_fluid_in_pleura(toks: list[str]) -> bool:
    """An air-fluid level in the pleural space (or in a pleural effusion) is a hydropneumothorax."""
    at = [i for i in range(len(toks) - 2) if toks[i:i + 3] == ["air", "fluid", "level"]]
    if not at or "no" in toks or "not" in toks:
        return False
    return "pleural" in toks and ("effusion" in toks or "space" in toks)


def label_reports(texts: list[str]) -> list[Labels]:
    return [label_report(t) for t in texts]
