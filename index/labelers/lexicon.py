"""Extractor A, "lexicon": phrase lexicons per label, with NegEx-style trigger scopes.

Method. The whole normalised report is scanned once by one regular expression per label (its
phrase lexicon), one for anatomy phrases, and one for triggers. Each mention then takes its
polarity from the triggers around it inside its clause, as NegEx does:

- a clause ends at a sentence end, a semicolon or colon, a terminator ("but", "however",
  "although", "except", "aside from", "which", "there is/are", ...); commas and "or"/"and" do not
  end it, so "no consolidation, effusion, or pneumothorax" negates all three;
- the nearest *pre* trigger before the mention (or inside it: "heart is *not* enlarged") decides:
  negation ("no", "not", "without", "free of", "negative for", "no evidence of", "absence of",
  "resolution of", "removal of") -> 0; uncertainty ("may", "possible", "question", "concern for",
  "questionable", "suspicious for", "concerning for", "cannot exclude", "versus",
  "differential", "borderline", "upper limits of normal", ...) -> -1; "probable", "likely" -> 1
  (a near-certain reading, which the MeSH indexers tag as present);
- weak uncertainty ("to suggest", "suggesting", "suggestive of", "to indicate") gives -1 only
  when no negation precedes it in the clause: "no opacity to suggest pneumonia" is negative;
- *post* triggers within six words after the mention: "cannot be excluded", "is not excluded",
  "is suspected", "versus" -> -1; "is not seen/identified", "has resolved", "removed" -> 0;
- pseudo-triggers are consumed and ignored: "no change", "no interval change", "not only",
  "without change", "no increase";
- anatomy phrases ("heart size", "lungs", "costophrenic angles", "pleural spaces", "pulmonary
  vascularity", "osseous structures", ...) count only under a normality trigger ("normal",
  "within normal limits", "unremarkable", "clear", "sharp", "intact") -> 0 for their labels, or
  a borderline trigger -> -1: "heart size is normal" -> Cardiomegaly 0, "clear lungs" -> Lung
  Opacity, Consolidation, Pneumonia, Edema 0;
- negative-only phrases ("no acute osseous abnormality" -> Fracture 0) count only when negated.

Vocabulary decisions (the project's conventions; extractor B states them in its own words):
granulomas are benign and not Lung Lesion, but nodules, calcified or not, are (as CheXpert and the
MeSH indexers of Open-i count them); lesions of bone or skin and mediastinal masses are not Lung
Lesion (a mediastinal mass is Enlarged Cardiomediastinum); "density" of bone, breast or soft
tissue is not Lung Opacity; pericardial or joint effusions are not Pleural Effusion; vascular
congestion, Kerley lines, cephalization and heart failure are Edema; infection and aspiration are
Pneumonia; Support Devices covers tubes, lines, catheters, ports, pacemakers/ICDs and leads,
stimulators, monitoring electrodes, drains, stents, prosthetic valves, surgical clips and orthopaedic
hardware, but not sternotomy wires (a post-surgical change; the MeSH indexers do not tag them as a
device); "borderline" grades a finding (positive: "borderline cardiomegaly", as MeSH tags it) while
"upper limits of normal" is uncertain; old, granulomatous or
tuberculous infection is not Pneumonia; a nodule or density given a benign explanation
("consistent with granulomas / nipple shadows / a bone island") is negative; an air-fluid level
in the pleural space is a (hydro)pneumothorax; "probable", "probably", "likely", "most likely" assert
the finding (1), as the MeSH indexers read them, while "possible", "may", "cannot exclude" hedge; fissural thickening is Pleural Other; "in the
appropriate clinical setting", "concern for", "correlate for", "question" hedge.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from typing import NamedTuple, cast

from index.labelers.common import (
    NEGATIVE,
    POSITIVE,
    UNCERTAIN,
    Labels,
    SentenceVotes,
    finalize,
    normalise,
    report_body,
    sentences,
)

NAME = "lexicon"

_INT = r"(?:mildly|slightly|minimally|moderately|markedly|severely|massively|again|still|now|persistently|not)"
_BE = r"(?:is|are|was|were|appears?|remains?|seems?|looks?|has been|have been)"
_CPA = r"(?:costophrenic|cp|costodiaphragmatic)(?: (?:angles?|sulcus|sulci|recess(?:es)?|xxxx))?"
_SIDE = r"(?:(?:left|right|bilateral|both|lateral|posterior|the|of|xxxx) )*"

# label -> list of (phrase regex, kind[, other labels it also means]). kind: "find" (polarity from
# triggers), "indirect" (like find, but loses to a direct mention in the same sentence), "negonly"
# (counts only when negated). All phrases are matched in one pass, leftmost first and, at one
# position, in the order written here; so a phrase that means two labels says so explicitly.
FINDINGS: dict[str, list[tuple]] = {
    "Enlarged Cardiomediastinum": [
        (r"(?:widen(?:ed|ing)|enlarge(?:d|ment)|broaden(?:ed|ing)) (?:of )?(?:the )?(?:superior |upper )?"
         r"(?:cardio)?mediastin(?:um|al)(?: (?:silhouette|contours?|width|shadow))?", "find"),
        (rf"(?:superior |upper )?(?:cardio)?mediastin(?:um|al)(?: (?:silhouette|contours?|width|shadow|structures))? "
         rf"(?:{_BE} )?(?:{_INT} )*(?:widened|enlarged|wide|broadened)", "find"),
        (r"mediastinal (?:widening|enlargement|mass(?:es)?|lymphadenopathy|adenopathy)", "find"),
        (r"(?:widened|wide|enlarged|prominent) (?:upper |superior )?mediastin(?:um|al)"
         r"(?: (?:silhouette|contours?|width))?", "find"),
    ],
    "Cardiomegaly": [
        (r"cardiomegaly", "find"),
        (r"cardiac (?:enlargement|silhouette enlargement)", "find"),
        (r"enlarge(?:d|ment of)(?: the)? (?:heart|cardiac(?: (?:silhouette|shadow|size|contours?))?)", "find"),
        (rf"(?:heart(?: (?:size|silhouette|shadow|contours?))?|cardiac (?:silhouette|shadow|size|contours?)) "
         rf"(?:(?:{_BE}|xxxx) )*(?:{_INT} )*"
         rf"(?:enlarged|increased(?: in size)?|large)", "find"),
    ],
    "Lung Opacity": [
        (r"opacit(?:y|ies)|opacification|opacified", "find"),
        (r"infiltrat(?:e|es|ion|ive)", "find"),
        (r"(?<!bone )(?<!breast )(?<!tissue )(?<!mineral )densit(?:y|ies)", "find"),
        (r"air ?space (?:disease|process|filling)", "find"),
        (r"ground glass", "find"),
    ],
    "Lung Lesion": [
        (r"nodul(?:e|es)", "find"),
        (r"nodular (?:[a-z]+ ){0,4}?(?:densit(?:y|ies)|opacit(?:y|ies)|lesions?)", "find"),
        (r"(?<!tissue )mass(?:es)?(?! effect)", "find"),
        (r"(?<!lytic )(?<!blastic )(?<!bone )(?<!bony )(?<!osseous )(?<!skin )(?<!sclerotic )(?<!expansile )"
         r"(?<!lucent )lesions?", "find"),
        (r"tumou?rs?|neoplasms?|carcinoma|malignan(?:cy|t)|metasta(?:sis|ses|tic)", "find"),
        (r"cavitary (?:lesion|mass|nodule)|cavitation|cavit(?:y|ies)", "find"),
        (r"mass ?like|fibro ?nodular", "find"),
    ],
    "Edema": [
        (r"(?<!tissue )(?<!subcutaneous )(?<!soft )edema", "find"),
        (r"(?:vascular|venous|pulmonary) congestion|congestion|congestive (?:heart )?failure|heart failure|\bchf\b", "find"),
        (r"kerley|cephalization|fluid overload", "find"),
        (r"(?:vascular|vasculature) (?:engorgement|redistribution|prominence|indistinctness|congestive changes?)", "find"),
        (r"prominen(?:ce|t) (?:of )?(?:the )?(?:central )?(?:pulmonary )?(?:vascularity|vasculature|vessels)"
         r"|central (?:pulmonary )?(?:vascular|vasculature) (?:prominence|congestion|engorgement)", "find"),
        (r"(?:prominent|increased|engorged|indistinct|congested) (?:pulmonary )?"
         r"(?:vascularity|vasculature|vascular markings|vessels)", "find"),
        (rf"(?:(?:pulmonary |lung )?(?:vascularity|vasculature)|pulmonary (?:vessels|xxxx)|vascular markings) (?:{_BE} )?"
         rf"(?:{_INT} )*(?:prominent|increased|engorged|indistinct|congested)", "find"),
    ],
    "Consolidation": [
        (r"consolidat(?:ion|ions|ive|ed)", "find"),
    ],
    "Pneumonia": [
        # old or granulomatous infection is a healed process, not a pneumonia: consumed, no vote
        (r"(?:(?:prior|previous|old|remote|healed|past|chronic) (?:[a-z]+ ){0,3}?"
         r"|(?:granulomatous|tuberculous|tuberculosis|histoplasmosis|fungal|mycobacterial) )"
         r"(?:infection|infectious (?:process|disease)|pneumonia|disease|process)", "ignore"),
        (r"(?:broncho)?pneumonia|pneumonitis", "find"),
        (r"infect(?:ion|ious)(?: process)?|aspiration", "find"),
    ],
    "Atelectasis": [
        (r"atelecta(?:sis|ses|tic)", "find"),
        (r"(?:lobe|lobar|lung|segmental) collapse|collapse of the|collapsed (?:lung|lobe)", "find"),
        (r"volume loss|loss of volume", "find"),
        (r"plate ?like|discoid", "find"),
    ],
    "Pneumothorax": [
        (r"pneumothora(?:x|ces)", "find"),
        # an air-fluid level in the pleural space is a hydropneumothorax
        (r"(?:(?<=effusion )|(?<=effusions ))(?:[a-z]+ ){0,3}?air fluid levels?"
         r"|air fluid levels?(?: [a-z]+){0,8} pleural (?:space|cavity)", "indirect"),
        (r"(?:hydro|hemo)pneumothora(?:x|ces)", "find", ("Pleural Effusion",)),
    ],
    "Pleural Effusion": [
        (r"(?<!pericardial )(?<!joint )effusions?", "find"),
        (r"pleural fluid|hydrothorax|hemothorax", "find"),
        (rf"blunt(?:ing|ed)(?: of)? {_SIDE}{_CPA}", "indirect"),
        (rf"{_CPA} (?:{_BE} )?(?:{_INT} )*blunt(?:ed|ing)", "indirect"),
        (r"meniscus", "indirect"),
    ],
    "Pleural Other": [
        (r"pleural (?:thickening|plaques?|calcifications?|scar(?:ring)?|fibrosis)", "find"),
        (r"thickening of the pleura|fibrothorax|calcified pleural plaques?", "find"),
        # a pleural abnormality that is not fluid (MeSH: Pleura/abnormal, Opacity/pleura)
        (r"pleural (?:abnormalit(?:y|ies)|opacit(?:y|ies))", "find"),
        (r"(?:pleuroparenchymal|pleural parenchymal) (?:scar(?:ring)?|thickening|opacit(?:y|ies))", "find"),
        (r"(?:bi)?apical fibro ?nodular (?:pleural )?(?:thickening|scarring)", "find", ("Lung Lesion",)),
        (r"(?:bi)?apical (?:pleural |pleuroparenchymal )?(?:cap|capping|thickening)", "find"),
        # the fissures are pleura: fissural thickening is pleural thickening
        (r"(?:interlobar |minor |major |horizontal )?fissur(?:al|e) thickening"
         r"|thickening of the (?:minor |major |interlobar |horizontal )?fissures?", "find"),
    ],
    "Fracture": [
        # a broken line or lead is a device fault, not a bone fracture
        (r"(?:(?<=catheter )|(?<=line )|(?<=lead )|(?<=wire )|(?<=xxxx ))fracture"
         r"|fractured (?:[a-z]+ ){0,2}(?:lead|wire|catheter|line|xxxx)", "ignore"),
        (r"fractur(?:e|es|ed)|\bfx\b", "find"),
        (r"(?:acute )?(?:osseous|bony|skeletal|bone) (?:abnormalit(?:y|ies)|injur(?:y|ies)|findings?)", "negonly"),
    ],
    "Support Devices": [
        (r"tubes?|\bett\b|tracheostomy|catheters?|\bpicc\b|port ?a ?cath|(?:power|medi|chest|infusion) ?port", "find"),
        (r"(?:central|venous|arterial|midline|dialysis|jugular|subclavian|swan ganz|\bij\b) (?:lines?|catheters?)", "find"),
        (r"pace(?:maker|r)s?|\b(?:aicd|icd)\b|defibrillator|loop recorder", "find"),
        (r"(?:pacing|pacer|transvenous|cardiac|ecg|ekg|monitor|monitoring|telemetry) (?:leads?|wires?|electrodes?)"
         r"|electrodes?|(?:spinal |nerve )?stimulators?|(?:pulse |battery |cardiac (?:xxxx )?)?generator"
         r"|(?:overlying |multiple |epicardial )leads", "find"),
        (r"(?:prosthetic|prosthesis of the) (?:(?:right|left) )?(?:shoulder|hip|humeral head)|arthroplasty", "find"),
        (r"(?:chest |port |picc )?xxxx tip", "find"),
        # sternotomy wires are a post-surgical change, not a support device: consumed, no vote (as
        # the MeSH indexers, who tag lines, tubes and devices but not sternotomy wires)
        (r"(?:median |midline |prior )?sternotomy(?: (?:wires?|sutures?|xxxx))?|(?:sternal|cerclage) (?:wires?|sutures?)",
         "ignore"),
        (r"(?:surgical|vascular|cholecystectomy|axillary) clips?|clips?|stents?", "find"),
        (r"(?:prosthetic|mechanical|replacement|bioprosthetic) (?:aortic |mitral )?valves?"
         r"|valve (?:replacement|prosthesis)", "find"),
        (r"hardware|drains?|(?:orthopedic |fixation |fusion )(?:rods?|plates?|screws?)|screws?|coils?", "find"),
        (r"(?:support|medical|closure|occluder|implanted|cardiac|electronic|monitoring) devices?", "find"),
    ],
}

_LUNG_GROUP = ("Lung Opacity", "Consolidation", "Pneumonia", "Edema")
# anatomy phrase -> labels a normality statement about it makes negative.
ANATOMY: list[tuple[str, tuple[str, ...]]] = [
    (r"cardiomediastinal(?: (?:silhouettes?|contours?|shadow|size|structures))?|cardiopericardial silhouette",
     ("Cardiomegaly", "Enlarged Cardiomediastinum")),
    (r"heart(?: (?:size|silhouette|shadow|contours?))?|cardiac(?: (?:silhouettes?|size|contours?|shadow))?", ("Cardiomegaly",)),
    (r"mediastin(?:um|al(?: (?:silhouettes?|contours?|width|structures))?)", ("Enlarged Cardiomediastinum",)),
    (r"lungs?(?: (?:fields?|parenchyma))?(?! volumes?)|pulmonary parenchyma", _LUNG_GROUP),
    (r"pleural (?:spaces?|surfaces?)|pleurae?", ("Pleural Effusion", "Pneumothorax")),
    (r"(?:costophrenic|cp|costodiaphragmatic) (?:angles?|sulcus|sulci|recess(?:es)?|xxxx)", ("Pleural Effusion",)),
    (r"(?:pulmonary |lung )?(?:vascularity|vasculature)|pulmonary (?:vessels|xxxx)|vascular markings", ("Edema",)),
    (r"(?:osseous|bony|skeletal|bone) (?:structures?|thorax)|bones|ribs|skeleton", ("Fracture",)),
]

TRIGGERS: dict[str, str] = {
    # order matters: earlier groups win at the same start position (longer phrases first)
    "pseudo": r"no (?:significant |interval |appreciable |substantial )?(?:change|increase|decrease|worsening)"
              r"|age indeterminate|of indeterminate age"
              r"|without (?:significant |interval )?change|not (?:necessarily|only)|gram negative",
    "unc_post": r"(?:(?:is|are) )?(?:cannot|can not|could not|not) be (?:entirely |completely )?(?:excluded|ruled out)"
                r"|(?:(?:is|are) )?not (?:entirely |completely )?(?:excluded|ruled out)"
                r"|(?:is|are) (?:suspected|questioned|possible|probable|likely|favou?red|a consideration|considered)"
                r"|may not be (?:demonstrated|seen|visible|detected|apparent)"
                r"|(?:is|are) (?:another|also an?|an?) (?:consideration|possibility)",
    "unc_pre": r"cannot (?:be )?exclude(?:d)?|can not exclude|cannot rule out|may(?: represent| be| reflect| indicate)?"
               r"|might|could(?: represent| be| reflect)?|possibl[ey]|questionable|question of"
               r"|suspicious (?:for|of)|suspect(?:ed)?|concerning for|differential(?: diagnosis)?(?: includes?)?"
               r"|equivocal|indeterminate|presumed|presumably|worrisome for|raises? the possibility(?: of)?"
               r"|favou?r(?:ed|s)?|rule out|r/o|uncertain|(?:raises? )?concerns? (?:for|of)|question"
               r"|(?:clinical(?:ly)? )?correlat(?:e|ion)(?: clinically)?|difficult to (?:completely |entirely )?exclude"
               r"|alternatively|consider(?:ation)?|(?:to )?exclude|(?:for )?evaluat(?:e|ion) (?:of|for)",
    # "borderline cardiomegaly" grades a finding (the MeSH indexers tag Cardiomegaly/borderline);
    # "upper limits of normal" says normal-or-not, a hedge
    "degree": r"borderline",
    "border": r"upper limits? of normal|top (?:of )?normal|high normal|upper normal|upper range of normal",
    "prob": r"(?:most )?(?:probabl[ey]|likely)",
    "both": r"versus|vs|in the (?:appropriate|correct|right|proper) clinical (?:setting|context)",
    # a benign explanation given after a density: "nodular densities consistent with nipple shadows"
    # (not granulomas: a nodule read as a granuloma is still a nodule, as the MeSH indexers tag it)
    "benign": r"(?:(?:is|are) )?(?:(?:most )?(?:likely|probably) |consistent with |compatible with |representing |due to "
              r"|related to |from )(?:a |an |the )?(?:patient s )?(?:nipple (?:shadows?|markers?|xxxx)|nipples|bone islands?)",
    "weak": r"to suggest|suggest(?:s|ing|ive of)?|to indicate|indicating|to represent",
    "neg_post": r"(?:(?:is|are|was|were|has been|have been) )?(?:not|no longer) (?:definitely |clearly |well )?(?:seen|identified|visualized|present|evident"
                r"|demonstrated|appreciated|noted|visible|detected|apparent)"
                r"|(?:has|have) (?:resolved|cleared)|resolved|(?:(?:is|are|has been|have been) )?removed|(?:(?:is|are) )?absent"
                r"|(?:is|are|appears?) (?:within (?:the )?(?:normal limits|limits of normal)|normal)(?! in)",
    "neg_pre": r"no evidence of|no signs? of|no|not|without|free of|negative for|absence of|resolution of|removal of"
               r"|clear of|nor|no longer",
    "normal": r"within (?:the )?(?:normal limits|limits of normal)|normal(?: in (?:size|caliber|contour|appearance))?"
              r"|unremarkable|clear|intact|sharp",
    "term": r"but|however|although|though|except(?: for)?|aside from|apart from|which|whereas|while|yet"
            r"|there (?:is|are|was|were|has been|have been)|[;:]",
}
_PRE = {"prob": POSITIVE, "degree": POSITIVE, "unc_pre": UNCERTAIN, "border": UNCERTAIN, "both": UNCERTAIN, "neg_pre": NEGATIVE, "weak": UNCERTAIN}
_POST = {"unc_post": UNCERTAIN, "both": UNCERTAIN, "neg_post": NEGATIVE, "benign": NEGATIVE}
_POST_WINDOW_WORDS = 6


def _compile(alt: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w-])(?:{alt})(?![\w-])")


_TRIGGER_RE = re.compile(r"(?<![\w/])(?:" + "|".join(rf"(?P<{k}>{v})" for k, v in TRIGGERS.items()) + r")(?![\w/])")

def _combined() -> tuple[re.Pattern[str], dict[str, tuple[tuple[str, ...], str]]]:
    """All finding phrases in one pattern; group name -> (labels, kind)."""
    groups: dict[tuple[tuple[str, ...], str], list[str]] = {}
    for label, entries in FINDINGS.items():
        for rx, kind, *also in entries:
            labels = (label, *(also[0] if also else ()))
            groups.setdefault((labels, kind), []).append(rx)
    names: dict[str, tuple[tuple[str, ...], str]] = {}
    parts = []
    for n, ((labels, kind), rxs) in enumerate(groups.items()):
        names[f"g{n}"] = (labels, kind)
        parts.append(f"(?P<g{n}>" + "|".join(f"(?:{r})" for r in rxs) + ")")
    return _compile("|".join(parts)), names


_FIND_RE, _FIND_GROUPS = _combined()
_ANAT_RE = _compile("|".join(f"(?P<a{n}>{rx})" for n, (rx, _) in enumerate(ANATOMY)))
_ANAT_GROUPS = {f"a{n}": labels for n, (_, labels) in enumerate(ANATOMY)}
_WORD = re.compile(r"\S+")


class _Trigger(NamedTuple):
    start: int
    end: int
    kind: str


class _Doc:
    """One report body as a single string, with its sentence and clause boundaries."""

    def __init__(self, sents: list[str]) -> None:
        parts, starts, pos = [], [], 0
        for s in sents:
            starts.append(pos)
            parts.append(s)
            pos += len(s) + 3
        self.text = " . ".join(parts)
        self.sentence_starts = starts
        self.triggers = [_Trigger(m.start(), m.end(), cast(str, m.lastgroup)) for m in _TRIGGER_RE.finditer(self.text)]
        self.trigger_starts = [t.start for t in self.triggers]
        self.terms = [t.end for t in self.triggers if t.kind == "term"]

    def sentence_of(self, pos: int) -> int:
        return bisect_right(self.sentence_starts, pos) - 1

    def clause_bounds(self, start: int, end: int) -> tuple[int, int]:
        """Clause around [start, end): from the last boundary before to the next one after."""
        si = self.sentence_of(start)
        lo = self.sentence_starts[si]
        hi = self.sentence_starts[si + 1] - 3 if si + 1 < len(self.sentence_starts) else len(self.text)
        for t in self.triggers:
            if t.kind != "term":
                continue
            if lo <= t.start and t.end <= start:
                lo = t.end
            elif t.start >= end and t.start < hi:
                hi = t.start
                break
        return lo, hi

    def polarity(self, start: int, end: int) -> tuple[int, bool]:
        """(value, touched by a trigger) of a mention spanning [start, end)."""
        lo, hi = self.clause_bounds(start, end)
        i = bisect_right(self.trigger_starts, end) - 1
        pre: _Trigger | None = None
        negated_before = False
        j = i
        while j >= 0 and self.triggers[j].start >= lo:
            t = self.triggers[j]
            if t.end <= end and t.kind in _PRE:
                if pre is None:
                    pre = t
                elif t.kind == "neg_pre":
                    negated_before = True
            j -= 1
        if pre is not None and pre.kind == "weak" and negated_before:
            return NEGATIVE, True
        # post triggers: within a few words after the mention, same clause
        window_end = end
        for n, m in enumerate(_WORD.finditer(self.text, end, hi)):
            window_end = m.end()
            if n + 1 >= _POST_WINDOW_WORDS:
                break
        post: _Trigger | None = None
        for t in self.triggers[i + 1:]:
            if t.start >= min(hi, window_end + 1):
                break
            if t.start >= end and t.kind in _POST:
                post = t
                break
        if post is not None and _POST[post.kind] == UNCERTAIN:
            return UNCERTAIN, True
        if pre is not None:
            return _PRE[pre.kind], True
        if post is not None:
            return _POST[post.kind], True
        return POSITIVE, False

    def normality(self, start: int, end: int) -> int | None:
        """0 / -1 when a normality / borderline trigger shares the clause with an anatomy phrase."""
        lo, hi = self.clause_bounds(start, end)
        best: tuple[int, int] | None = None  # (distance, value)
        for t in self.triggers:
            if t.start >= hi:
                break
            if t.end <= lo or not (t.kind in ("normal", "border", "degree") or
                                   (t.kind == "neg_post" and "normal" in self.text[t.start:t.end])):
                continue
            d = start - t.end if t.end <= start else t.start - end
            if d < 0:
                continue
            v = UNCERTAIN if t.kind == "border" else POSITIVE if t.kind == "degree" else NEGATIVE
            if best is None or d < best[0]:
                best = (d, v)
        return None if best is None else best[1]


def label_report(text: str) -> Labels:
    """The 14 labels of one report (see :mod:`index.labelers.common` for the output rules)."""
    sents = [s.replace("-", " ").replace(";", " ; ").replace(":", " : ")
             for s in sentences(normalise(report_body(text)))]
    if not sents:
        return finalize([])
    doc = _Doc(sents)
    votes = [SentenceVotes() for _ in sents]
    for m in _FIND_RE.finditer(doc.text):
        labels, kind = _FIND_GROUPS[cast(str, m.lastgroup)]
        value, touched = doc.polarity(m.start(), m.end())
        if kind == "ignore" or (kind == "negonly" and not (touched and value == NEGATIVE)):
            continue
        sv = votes[doc.sentence_of(m.start())]
        for label in labels:
            sv.add(label, value, indirect=(kind == "indirect"))
    for m in _ANAT_RE.finditer(doc.text):
        normal = doc.normality(m.start(), m.end())
        if normal is None:
            continue
        sv = votes[doc.sentence_of(m.start())]
        for label in _ANAT_GROUPS[cast(str, m.lastgroup)]:
            sv.add(label, normal, indirect=True)
    return finalize(v.resolved() for v in votes)


def label_reports(texts: list[str]) -> list[Labels]:
    return [label_report(t) for t in texts]
