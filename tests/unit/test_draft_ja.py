"""Japanese drafts ([report] language = "ja"): radiology wording, no English sentence, tiers, OOD, cases."""

from __future__ import annotations

import re

import numpy as np
import pytest

from index.draft import Draft, DraftConfig, Drafter, Reporter, template_sentence
from index.labelers import get_extractor
from index.retrieval import CaseIndex, Retriever
from index.store import new_case
from index.wording import ENGLISH, JAPANESE, NOT_VALIDATED
from models.labels import LABELS
from tests.unit.test_draft import CARDIO_CASE, DIGEST, EFFUSION_CASE, NORMAL_CASE, _prediction, _similar

label = get_extractor("lexicon")
JA_EFFUSION_CASE = ("FINDINGS: 右胸水を認める。心拡大は認めない。\nIMPRESSION: 右胸水。", {"Pleural Effusion": 1, "Cardiomegaly": 0})
ALLOWED = {"CT"}  # as Japanese reports write it (胸部CT); not a translation left undone


def _ja(**kw) -> Drafter:
    return Drafter(label, wording="ja", **kw)


def foreign_words(draft: Draft) -> list[str]:
    """ASCII-letter words of the whole draft other than citations, case ids, site names and CT."""
    text = draft.text()
    for r in draft.references:
        text = text.replace(r.guideline.cite(), " ")
    cited = {w for r in draft.references for w in re.findall(r"[A-Za-z]+", r.guideline.cite())}
    for s in draft.similar:
        text = text.replace(s.case.case_id, " ").replace(s.case.source, " ")
    return [w for w in re.findall(r"[A-Za-z]+", text) if w not in ALLOWED | cited]


def test_a_normal_study_reads_normal_in_japanese() -> None:
    draft = _ja().draft(_prediction({}), _similar([NORMAL_CASE]))
    assert draft.findings == ("心縦隔陰影に異常を認めない。両肺野に明らかな異常影を認めない。明らかな胸水・気胸は認めない。"
                              "明らかな胸膜肥厚は認めない。明らかな転位を伴う肋骨骨折は認めない。")
    assert draft.impression == "異常所見なし。"
    assert "The lungs are clear." not in draft.text()  # the case's sentence is English: never copied
    assert draft.text().startswith("【所見】\n心縦隔陰影に異常を認めない。")
    assert "【診断】\n異常所見なし。" in draft.text() and "【類似症例】\n1. 症例 " in draft.text()
    assert "、類似度 0.90: 異常所見なし" in draft.text()
    assert not draft.references and not foreign_words(draft)


def test_one_present_finding_with_similar_cases() -> None:
    pred = _prediction({"Pleural Effusion": (0.95, "high")})
    cases = _similar([EFFUSION_CASE, CARDIO_CASE])
    draft = _ja().draft(pred, cases)
    assert draft.findings.startswith("胸水を認める。心縦隔陰影に異常を認めない。")
    assert "両肺野に明らかな異常影を認めない。" in draft.findings and "明らかな気胸は認めない。" in draft.findings
    assert "meniscus" not in draft.text()  # English sentences of similar cases stay out
    assert all(s.origin == "template" for s in draft.statements)
    assert draft.impression == "胸水（確信度: 高）。"
    assert draft.reference_lines() == ["[1] 胸水（胸水の精査）: Roberts ME, et al. British Thoracic Society Guideline "
                                       "for pleural disease. Thorax. 2023;78(Suppl 3):s1-s42."]
    assert draft.similar_lines()[0] == (f"1. 症例 {cases[0].case.case_id}（Site A）、類似度 0.90: "
                                        "胸水、医療デバイス（チューブ・カテーテル類）")
    assert draft.similar_lines()[1].endswith("、類似度 0.80: 心拡大、胸水")
    assert "【参考ガイドライン】\n[1] 胸水（胸水の精査）" in draft.text()
    assert not foreign_words(draft)
    # Retrieval informs the status in every language: the same calls as the English draft.
    assert draft.status == Drafter(label).draft(pred, cases).status


def test_probable_and_possible_are_hedged_with_their_confidence() -> None:
    calls = {"Pleural Effusion": (0.7, "medium"), "Pneumothorax": (0.55, "low"), "Cardiomegaly": (0.45, "low")}
    similar = _similar([CARDIO_CASE, CARDIO_CASE, EFFUSION_CASE])
    draft = _ja(config=DraftConfig(k=3)).draft(_prediction(calls), similar)
    stated = {k: v for k, v in draft.status.items() if v != "absent"}
    assert stated == {"Cardiomegaly": "possible", "Pleural Effusion": "probable"}  # pneumothorax: dropped
    assert "心拡大の可能性を否定できない。" in draft.findings and "胸水を疑う。" in draft.findings
    assert draft.impression == "1. 心拡大の可能性（確信度: 低）。\n2. 胸水の疑い（確信度: 中）。"
    assert [r.split("（")[0] for r in draft.reference_lines()] == ["[1] 心拡大", "[2] 胸水"]
    assert "[1] 心拡大（心不全の評価）: McDonagh TA" in draft.text()
    assert not foreign_words(draft)


def test_nodule_impression_recommends_ct() -> None:
    draft = _ja().draft(_prediction({"Lung Lesion": (0.9, "medium")}), [])
    assert "結節・腫瘤影を疑う。" in draft.findings
    assert draft.impression == "結節・腫瘤影の疑い、CTによる精査を推奨（確信度: 中）。"
    assert "Fleischnerの指針に従い経過観察する" in draft.text()
    assert not foreign_words(draft)


def test_out_of_distribution_and_no_similar_cases() -> None:
    draft = _ja().draft(_prediction({"Pneumothorax": (0.9, "high")}, ood=1.5), None)
    assert "気胸を認める。" in draft.findings
    assert draft.findings.endswith("注: 本画像はモデルの学習範囲外である（分布外スコア 1.50、閾値 1.00 を超える）。"
                                   "上記の記載は信頼性が低いため、全体の読影を要する。")
    assert draft.notes == ("類似症例インデックスが設定されていないため、モデルの所見のみから下書きを作成した。",)
    assert "【備考】\n類似症例インデックスが設定されていないため" in draft.text()
    assert not draft.similar and "【類似症例】" not in draft.text()
    assert draft.impression == "気胸（確信度: 高）。" and "[1] 気胸（気胸の管理）" in draft.text()
    assert not foreign_words(draft)


def test_not_validated_tiers_are_hedged_and_say_so() -> None:
    calls = {k: (0.05, NOT_VALIDATED) for k in LABELS}
    calls.update({"Pleural Effusion": (0.9, NOT_VALIDATED), "Cardiomegaly": (0.8, NOT_VALIDATED)})
    pred = _prediction(calls)
    for similar in (None, _similar([NORMAL_CASE])):  # no similar case supports them: still stated
        draft = _ja().draft(pred, similar)
        assert draft.findings == "心拡大の可能性を否定できない。胸水の可能性を否定できない。"  # no normal statement
        assert draft.impression == "1. 心拡大の可能性（確信度: 未検証）。\n2. 胸水の可能性（確信度: 未検証）。"
        assert not foreign_words(draft)
    english = Drafter(label).draft(pred, None)
    assert english.impression == ("1. Possible cardiomegaly (confidence not validated). "
                                  "2. Possible pleural effusion (confidence not validated).")
    assert _ja().draft(_prediction(dict.fromkeys(LABELS, (0.05, NOT_VALIDATED))), None).findings == "所見の記載なし。"


def test_a_japanese_case_sentence_is_not_copied_unchecked() -> None:
    """The English labelers cannot judge a Japanese sentence: templates in Japanese, nothing in English."""
    pred = _prediction({"Pleural Effusion": (0.95, "high")})
    ja = _ja().draft(pred, _similar([JA_EFFUSION_CASE]))
    assert ja.findings.startswith("胸水を認める。") and "右胸水" not in ja.findings
    en = Drafter(label).draft(pred, _similar([JA_EFFUSION_CASE, EFFUSION_CASE]))
    assert "Moderate right pleural effusion with a meniscus." in en.findings and "右胸水" not in en.text()
    # A labeler that read Japanese would let a Japanese case's sentence in (the seam for one).
    ja_labeler = Drafter(lambda s: {"Pleural Effusion": 1} if "胸水を認める" in s else {}, wording="ja",
                         labeler_language="ja")
    assert ja_labeler.draft(pred, _similar([JA_EFFUSION_CASE])).findings.startswith("右胸水を認める。心拡大は認めない。")


def test_reporter_notes_in_japanese_for_another_bundle(tmp_path) -> None:
    index = CaseIndex.create(tmp_path / "idx", DIGEST, 4)
    index.add([new_case(EFFUSION_CASE[0], EFFUSION_CASE[1], np.full(4, 0.1), np.full(4, 0.5), "Site A")])
    reporter = Reporter(Retriever(index), _ja())
    pred = _prediction({"Pleural Effusion": (0.95, "high")})
    assert len(reporter(pred, DIGEST).similar) == 1
    other = reporter(pred, "ef" * 32)
    assert other.notes == ("類似症例インデックスが別のモデルバンドルで作成されているため、モデルの所見のみから下書きを作成した。",)


def test_every_japanese_template_is_japanese() -> None:
    for k in JAPANESE.templates:
        for st in ("present", "probable", "possible", "absent"):
            s = template_sentence(k, st, JAPANESE)
            assert s == "" or (s.endswith("。") and not re.search(r"[A-Za-z]", s)), (k, st, s)


def test_unknown_language_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"'fr'.*'en', 'ja'"):
        Drafter(label, wording="fr")
    assert Drafter(label).wording is ENGLISH
