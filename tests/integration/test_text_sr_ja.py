"""A Japanese draft in the results: the text SR and the TID 1500 SR's text items take the Japanese wording."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pydicom
import pytest

from dicom_node.encoders.common import notices, software_version
from dicom_node.encoders.notices import NOT_FOR_DIAGNOSIS, OOD_NOTICE, SYNTHETIC_NOTICE
from dicom_node.encoders.sr import encode_sr
from dicom_node.encoders.text import encode_text_sr
from dicom_node.uids import ResultUIDs
from index.draft import Drafter, Reporter
from index.labelers import get_extractor
from index.retrieval import CaseIndex, Retriever
from index.store import new_case
from index.wording import JAPANESE
from tests.conftest import dciodvfy_errors
from tests.integration.test_text_sr import _texts
from tests.unit.test_encoders import _model, _prediction, _synthetic_dx

NOW = dt.datetime(2025, 3, 4, 5, 6, 7)
JA_NOTICES = ["AIによる解析結果であり、一次診断には用いないこと。",
              "合成ファントム画像のみで学習したモデルであり、臨床的に検証されていない。",
              "モデルの学習範囲外の画像であり、解釈には注意を要する。"]
JA_DRAFT_NOTICE = "AIが作成した報告書の下書きであり、放射線科医による確認・修正を要する。確定した報告書ではない。"


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    """A Japanese draft with similar cases (English reports), guideline references and an OOD line."""
    model = _model()
    index = CaseIndex.create(tmp_path_factory.mktemp("idx") / "idx", model.digest, 16)
    reports = [
        ("FINDINGS: Small right pleural effusion with a meniscus. Patchy lung opacity.\nIMPRESSION: Small effusion.",
         {"Pleural Effusion": 1, "Lung Opacity": 1}),
        ("FINDINGS: Central venous catheter with tip in the superior vena cava. The lungs are clear.\nIMPRESSION: Line.",
         {"Support Devices": 1}),
    ]
    index.add([new_case(r, lab, np.full(16, 0.05 * i), np.full(16, 0.1), "Site A") for i, (r, lab) in enumerate(reports)])
    return Reporter(Retriever(index), Drafter(get_extractor("lexicon"), wording="ja"))(_prediction(ood=True), model.digest)


def _results(draft):
    source, model = _synthetic_dx(), _model()
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, model.digest)
    return (encode_sr(source, _prediction(ood=True), model, uids, NOW, draft=draft, wording=JAPANESE),
            encode_text_sr(source, _prediction(ood=True), model, draft, uids, NOW, wording=JAPANESE),
            encode_sr(source, _prediction(ood=True), model, uids, NOW, wording=JAPANESE))


def test_the_results_carry_the_japanese_wording(draft) -> None:
    """Which strings go where, before encoding."""
    with_draft, text_sr, without = _results(draft)
    model = _model()
    for ds in (with_draft, text_sr):
        texts = _texts(ds)
        assert draft.findings in texts and draft.impression in texts
        assert all(n in texts for n in JA_NOTICES) and JA_DRAFT_NOTICE in texts
        assert f"モデル: {model.name} {software_version(model)}。" in texts
        assert set(draft.similar_lines()) <= set(texts) and set(draft.reference_lines()) <= set(texts)
        assert not any(english in t for t in texts for english in (NOT_FOR_DIAGNOSIS, SYNTHETIC_NOTICE, OOD_NOTICE))
    assert "\n3. 胸水の疑い（確信度: 中）。" in draft.impression  # 0.64 at a medium tier (the fixture's)
    assert any(t.startswith("1. 症例 C") and "、類似度 " in t for t in _texts(text_sr))
    assert "類似症例インデックスが設定されていない。" in _texts(without) and draft.findings not in _texts(without)
    # Nothing English but the model card's own words, the model name, citations, case ids and sites.
    quoted = {model.name, software_version(model), model.intended_use, model.training_data, "Site A",
              *(r.guideline.cite() for r in draft.references), *(s.case.case_id for s in draft.similar)}
    shown = [*notices(_prediction(ood=True), model, JAPANESE), JA_DRAFT_NOTICE, draft.findings,
             draft.impression, *draft.similar_lines(), *draft.reference_lines(), *draft.notes]
    assert set(shown) <= set(_texts(text_sr))
    for t in shown:
        for q in sorted(quoted, key=len, reverse=True):
            t = t.replace(q, " ")
        assert not [w for w in re.findall(r"[A-Za-z]+", t) if w not in ("AI", "CT", "Fleischner")], t


def test_a_japanese_text_sr_survives_encoding(draft, tmp_path) -> None:
    """A Japanese draft in a study without a character set: the results switch to ISO_IR 192, pass
    dciodvfy and read back to the same strings (encoders.header)."""
    for i, ds in enumerate(_results(draft)[:2]):
        path = tmp_path / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        assert back.SpecificCharacterSet == "ISO_IR 192"
        assert not dciodvfy_errors(path)
        texts = _texts(back)
        assert draft.findings in texts and draft.impression in texts and JA_NOTICES[0] in texts
        assert set(draft.similar_lines()) <= set(texts) and set(draft.reference_lines()) <= set(texts)


def test_encode_results_takes_the_language(draft) -> None:
    """worker.pipeline.encode_results (the node and `infer`): the language reaches both SRs."""
    from models.preprocess import read_image
    from worker.pipeline import encode_results

    source, model = _synthetic_dx(), _model()
    sr, sc, text_sr, *_ = encode_results(source, read_image(source), _prediction(ood=True), model, NOW,
                                     lambda p, digest: draft, language="ja")
    assert JA_NOTICES[0] in _texts(sr) and JA_DRAFT_NOTICE in _texts(text_sr)
    assert draft.findings in _texts(sr) and draft.findings in _texts(text_sr)
    no_index = encode_results(source, read_image(source), _prediction(ood=True), model, NOW, None, language="ja")
    assert len(no_index) == len(encode_results(source, read_image(source), _prediction(ood=True), model, NOW,
                                               lambda p, digest: draft)) - 1 and "類似症例インデックスが設定されていない。" in _texts(no_index[0])
    assert sc.ImageComments.startswith(NOT_FOR_DIAGNOSIS)  # the saliency image stays English
    english = encode_results(source, read_image(source), _prediction(ood=True), model, NOW, None)
    assert "No similar cases index configured." in _texts(english[0]) and NOT_FOR_DIAGNOSIS + "." in _texts(english[0])
