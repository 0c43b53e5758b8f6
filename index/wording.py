"""Report language: every string the draft report and the result notices use, one table per language.

`ENGLISH` is the default and reproduces the node's English output exactly. `JAPANESE` is written as
a Japanese radiologist writes a chest radiograph report: である調, 所見 / 診断, "胸水を認める。",
"明らかな気胸は認めない。", hedges "〜を疑う。" (probable) and "〜の可能性を否定できない。" (possible),
and in the impression "胸水の疑い（確信度: 中）". Its terms, one per CheXpert label:

================================  ====================================
CheXpert label                    Japanese term
================================  ====================================
No Finding                        異常所見なし
Enlarged Cardiomediastinum        縦隔拡大
Cardiomegaly                      心拡大
Lung Opacity                      肺野透過性低下
Lung Lesion                       結節・腫瘤影
Edema                             肺水腫
Consolidation                     浸潤影
Pneumonia                         肺炎
Atelectasis                       無気肺
Pleural Effusion                  胸水
Pneumothorax                      気胸
Pleural Other                     胸膜肥厚
Fracture                          肋骨骨折
Support Devices                   医療デバイス（チューブ・カテーテル類）
================================  ====================================

Both tables are instances of one frozen dataclass, so a missing string fails when this module is
imported; `_check` also compares their mapping keys and the placeholders of every format string,
so a Japanese template that lost "{score}" fails at import too, not in a report. Citations are
never translated (they stay as published); the reason each guideline applies is
(`reference_notes`, keyed by (label, guideline key) as in index/guidelines.py).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType

from dicom_node.encoders import notices as _notices
from dicom_node.encoders.notices import Notices, notice_fields
from index.guidelines import reference_notes as _english_reference_notes
from models.labels import LABELS
from models.prediction import ALL_TIERS, NOT_VALIDATED  # noqa: F401 - NOT_VALIDATED: index.draft and tests read it here

# Tiers the wording covers: the calibrated ones and "not validated" (phantom-trained bundles).
TIER_KEYS: tuple[str, ...] = ALL_TIERS
HEDGES = ("present", "probable", "possible")  # draft statuses a positive statement can have


@dataclass(frozen=True)
class Template:
    present: str  # a plain positive sentence
    noun: str  # for hedged wording and the impression
    absent: str  # a normal statement, "" where absence is not reported (devices)


@dataclass(frozen=True)
class Wording(Notices):
    """Every string of the draft report, for one language, and the result notices it extends
    (dicom_node/encoders/notices.py: the notices are written there, once)."""

    sentence_join: str  # between FINDINGS sentences
    list_join: str  # between key findings of a similar case

    # -- findings and impression
    labels: Mapping[str, str]  # CheXpert label -> the term a reader sees (similar cases, references)
    templates: Mapping[str, Template]  # every label but No Finding
    probable_sentence: str  # {noun}
    possible_sentence: str  # {noun}
    impression_status: Mapping[str, str]  # HEDGES -> {noun} / {Noun} (capitalised)
    impression_extra: Mapping[str, str]  # label -> what follows its noun in the impression
    impression_item: str  # {text} {tier}
    impression_plain: str  # {text}, for the baseline without tiers
    impression_numbered: str  # {n} {text}
    impression_join: str
    normal_cardiomediastinal: str
    normal_lungs: str
    normal_pleural: str  # no effusion and no pneumothorax
    normal_impression: str
    no_findings: str  # FINDINGS when nothing is stated
    ood_line: str  # {score} {threshold}

    # -- why there are no similar cases (draft notes; no_index is a notice)
    index_mismatch: str
    index_unreadable: str
    index_unopenable: str  # {folder}
    alone_note: str  # {why} {Why}

    # -- sections of Draft.text() and the lines under them
    findings_title: str
    impression_title: str
    references_title: str
    similar_title: str
    notes_title: str
    section_line: str  # {title} {body}, FINDINGS and IMPRESSION
    section_block: str  # {title} {body}, the listed sections
    reference_line: str  # {i} {label} {note} {citation}
    reference_notes: Mapping[tuple[str, str], str]  # (label, guideline key) -> why it applies
    similar_line: str  # {rank} {case_id} {source} {similarity} {findings}


ENGLISH = Wording(
    **notice_fields(_notices.ENGLISH),
    sentence_join=" ",
    list_join=", ",
    labels=MappingProxyType({k: k for k in LABELS}),
    templates=MappingProxyType({
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
    }),
    probable_sentence="Probable {noun}.",
    possible_sentence="Possible {noun}.",
    impression_status=MappingProxyType({"present": "{Noun}", "probable": "Probable {noun}",
                                        "possible": "Possible {noun}"}),
    impression_extra=MappingProxyType({"Lung Lesion": "; CT recommended for further characterization"}),
    impression_item="{text} ({tier}).",
    impression_plain="{text}.",
    impression_numbered="{n}. {text}",
    impression_join=" ",
    normal_cardiomediastinal="The cardiomediastinal silhouette is within normal limits.",
    normal_lungs="The lungs are clear.",
    normal_pleural="No pleural effusion or pneumothorax.",
    normal_impression="No acute cardiopulmonary abnormality.",
    no_findings="No findings stated.",
    ood_line=("Note: this image is outside the model's experience (out-of-distribution score {score:.2f} above "
              "{threshold:.2f}); the statements above are unreliable and need a full read."),
    index_mismatch="similar cases index built with another model bundle",
    index_unreadable="similar cases index could not be read",
    index_unopenable="similar cases index at {folder} could not be opened",
    alone_note="{Why}: the draft is written from the model's findings alone.",
    findings_title="FINDINGS",
    impression_title="IMPRESSION",
    references_title="GUIDELINE REFERENCES",
    similar_title="SIMILAR PRIOR CASES",
    notes_title="NOTES",
    section_line="{title}: {body}",
    section_block="{title}:\n{body}",
    reference_line="[{i}] {label} ({note}): {citation}",
    reference_notes=MappingProxyType(dict(_english_reference_notes())),
    similar_line="{rank}. case {case_id} ({source}), similarity {similarity:.2f}: {findings}",
)

JAPANESE = Wording(
    **notice_fields(_notices.JAPANESE),
    sentence_join="",
    list_join="、",
    labels=MappingProxyType({
        "No Finding": "異常所見なし",
        "Enlarged Cardiomediastinum": "縦隔拡大",
        "Cardiomegaly": "心拡大",
        "Lung Opacity": "肺野透過性低下",
        "Lung Lesion": "結節・腫瘤影",
        "Edema": "肺水腫",
        "Consolidation": "浸潤影",
        "Pneumonia": "肺炎",
        "Atelectasis": "無気肺",
        "Pleural Effusion": "胸水",
        "Pneumothorax": "気胸",
        "Pleural Other": "胸膜肥厚",
        "Fracture": "肋骨骨折",
        "Support Devices": "医療デバイス（チューブ・カテーテル類）",
    }),
    templates=MappingProxyType({
        "Enlarged Cardiomediastinum": Template("縦隔陰影の拡大を認める。", "縦隔拡大", "縦隔陰影に異常を認めない。"),
        "Cardiomegaly": Template("心拡大を認める。", "心拡大", "心拡大は認めない。"),
        "Lung Opacity": Template("肺野に透過性低下を認める。", "肺野透過性低下", "明らかな肺野透過性低下は認めない。"),
        "Lung Lesion": Template("肺野に結節・腫瘤影を認める。", "結節・腫瘤影", "明らかな結節・腫瘤影は認めない。"),
        "Edema": Template("肺水腫を認める。", "肺水腫", "肺水腫を示唆する所見は認めない。"),
        "Consolidation": Template("浸潤影を認める。", "浸潤影", "明らかな浸潤影は認めない。"),
        "Pneumonia": Template("肺炎を示唆する浸潤影を認める。", "肺炎", "肺炎を示唆する所見は認めない。"),
        "Atelectasis": Template("無気肺を認める。", "無気肺", "明らかな無気肺は認めない。"),
        "Pleural Effusion": Template("胸水を認める。", "胸水", "胸水は認めない。"),
        "Pneumothorax": Template("気胸を認める。", "気胸", "明らかな気胸は認めない。"),
        "Pleural Other": Template("胸膜肥厚を認める。", "胸膜肥厚", "明らかな胸膜肥厚は認めない。"),
        "Fracture": Template("肋骨骨折を認める。", "肋骨骨折", "明らかな転位を伴う肋骨骨折は認めない。"),
        "Support Devices": Template("医療デバイス（チューブ・カテーテル類）が留置されている。",
                                    "医療デバイス（チューブ・カテーテル類）", ""),
    }),
    probable_sentence="{noun}を疑う。",
    possible_sentence="{noun}の可能性を否定できない。",
    impression_status=MappingProxyType({"present": "{noun}", "probable": "{noun}の疑い", "possible": "{noun}の可能性"}),
    impression_extra=MappingProxyType({"Lung Lesion": "、CTによる精査を推奨"}),
    impression_item="{text}（確信度: {tier}）。",
    impression_plain="{text}。",
    impression_numbered="{n}. {text}",
    impression_join="\n",
    normal_cardiomediastinal="心縦隔陰影に異常を認めない。",
    normal_lungs="両肺野に明らかな異常影を認めない。",
    normal_pleural="明らかな胸水・気胸は認めない。",
    normal_impression="異常所見なし。",
    no_findings="所見の記載なし。",
    ood_line=("注: 本画像はモデルの学習範囲外である（分布外スコア {score:.2f}、閾値 {threshold:.2f} を超える）。"
              "上記の記載は信頼性が低いため、全体の読影を要する。"),
    index_mismatch="類似症例インデックスが別のモデルバンドルで作成されている",
    index_unreadable="類似症例インデックスを読み込めない",
    index_unopenable="類似症例インデックス（{folder}）を開けない",
    alone_note="{why}ため、モデルの所見のみから下書きを作成した。",
    findings_title="所見",
    impression_title="診断",
    references_title="参考ガイドライン",
    similar_title="類似症例",
    notes_title="備考",
    section_line="【{title}】\n{body}",
    section_block="【{title}】\n{body}",
    reference_line="[{i}] {label}（{note}）: {citation}",
    reference_notes=MappingProxyType({
        ("Lung Lesion", "fleischner-2017"): "単純写真で指摘された結節はCTで精査し、Fleischnerの指針に従い経過観察する",
        ("Pleural Effusion", "bts-pleural-2023"): "胸水の精査",
        ("Pneumothorax", "bts-pleural-2023"): "気胸の管理",
        ("Pneumonia", "ats-idsa-cap-2019"): "成人の市中肺炎",
        ("Consolidation", "fleischner-glossary-2008"): "浸潤影（コンソリデーション）の定義",
        ("Consolidation", "ats-idsa-cap-2019"): "感染が疑われる場合",
        ("Lung Opacity", "fleischner-glossary-2008"): "陰影の定義",
        ("Atelectasis", "fleischner-glossary-2008"): "無気肺の定義",
        ("Pleural Other", "fleischner-glossary-2008"): "胸膜プラークおよび胸膜肥厚の定義",
        ("Cardiomegaly", "esc-hf-2021"): "心不全の評価",
        ("Edema", "esc-hf-2021"): "心不全における肺うっ血",
        ("Support Devices", "asa-cva-2020"): "中心静脈カテーテル先端位置の確認",
    }),
    similar_line="{rank}. 症例 {case_id}（{source}）、類似度 {similarity:.2f}: {findings}",
)

WORDINGS: Mapping[str, Wording] = MappingProxyType({w.language: w for w in (ENGLISH, JAPANESE)})
LANGUAGES: tuple[str, ...] = tuple(WORDINGS)


def wording_for(language: str | Wording) -> Wording:
    """The wording of a report language.

    Raises
    ------
    ValueError
        An unknown language; the message names the allowed ones.
    """
    if isinstance(language, Wording):
        return language
    try:
        return WORDINGS[language]
    except KeyError:
        raise ValueError(f"unknown report language {language!r}: choose one of "
                         f"{', '.join(repr(k) for k in LANGUAGES)}") from None


_JAPANESE_SCRIPT = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")


def script_language(text: str) -> str:
    """"ja" when the text has kana or kanji, else "en" (the only other language reports come in)."""
    return "ja" if _JAPANESE_SCRIPT.search(text) else "en"


def _placeholders(value: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}


def _check(reference: Wording, other: Wording) -> None:
    """Raises ImportError where `other` lacks a key or a placeholder that `reference` has."""
    problems = []
    for f in fields(Wording):
        a, b = getattr(reference, f.name), getattr(other, f.name)
        if isinstance(a, Mapping):
            if set(a) != set(b):
                problems.append(f"{f.name}: keys differ {sorted(map(str, set(a) ^ set(b)))}")
                continue
            for k in a:
                if isinstance(a[k], Template):
                    for part in ("present", "noun", "absent"):
                        if bool(getattr(a[k], part)) != bool(getattr(b[k], part)):
                            problems.append(f"{f.name}[{k}].{part}: empty in one language only")
                elif _placeholders(a[k]) != _placeholders(b[k]) and f.name != "impression_status":
                    problems.append(f"{f.name}[{k}]: placeholders differ")
        elif isinstance(a, str) and f.name not in ("alone_note",):
            if _placeholders(a) != _placeholders(b):
                problems.append(f"{f.name}: placeholders {_placeholders(a)} vs {_placeholders(b)}")
    # {Noun} / {noun} and {Why} / {why} are the same value capitalised or not: one of each suffices.
    for name, pair in (("impression_status", {"noun", "Noun"}), ("alone_note", {"why", "Why"})):
        values = getattr(other, name).values() if name == "impression_status" else [getattr(other, name)]
        if any(not (_placeholders(v) & pair) or _placeholders(v) - pair for v in values):
            problems.append(f"{name}: needs one of {sorted(pair)}")
    if problems:
        raise ImportError(f"report wording {other.language!r} does not match {reference.language!r}: "
                          + "; ".join(problems))


def _check_coverage(w: Wording) -> None:
    missing = ([k for k in LABELS if k not in w.labels] + [k for k in LABELS if k != "No Finding"
                                                           and k not in w.templates]
               + [t for t in TIER_KEYS if t not in w.tiers] + [h for h in HEDGES if h not in w.impression_status])
    if missing:
        raise ImportError(f"report wording {w.language!r} lacks {missing}")


for _w in WORDINGS.values():
    _check_coverage(_w)
    _check(ENGLISH, _w)
