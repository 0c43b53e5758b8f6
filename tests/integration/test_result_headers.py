"""Results from real-world headers: every character set and dirty value of tests/header_corpus.py,
and the real CR chests of pydicom-data, give a TID 1500 SR, an SC and a Basic Text SR that pass
dciodvfy with no Error line and whose identity decodes equal to the source's."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicom_node.encoders.header import UTF8, HeaderError, clean_header, normalise_character_set
from dicom_node.encoders.sc import encode_sc
from dicom_node.encoders.sr import encode_sr
from dicom_node.encoders.text import encode_text_sr
from dicom_node.uids import ResultUIDs
from index.draft import Drafter
from index.labelers import get_extractor
from models.preprocess import read_image
from tests.conftest import dciodvfy_errors
from tests.header_corpus import CORPUS, IDENTITY, KEEP, Case, received
from tests.unit.test_encoders import _model, _prediction

NOW = dt.datetime(2026, 12, 2, 4, 5, 6)
REAL_CR = ("RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")


def _encode_all(source: Dataset, out: Path) -> dict[str, Path]:
    model, prediction = _model(), _prediction(ood=True)
    uids = ResultUIDs.for_source(str(source.StudyInstanceUID).strip(" \0"), str(source.SOPInstanceUID).strip(" \0"),
                                 model.digest)
    draft = Drafter(get_extractor("lexicon")).draft(prediction, None)
    objects = {"sr": encode_sr(source, prediction, model, uids, NOW, draft=draft),
               "sc": encode_sc(source, read_image(source), prediction, model, uids, NOW),
               "text": encode_text_sr(source, prediction, model, draft, uids, NOW)}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, ds in objects.items():
        paths[kind] = out / f"{kind}.dcm"
        ds.save_as(paths[kind], enforce_file_format=True)
    return paths


_errors = dciodvfy_errors  # the Error lines of dciodvfy; a missing dciodvfy skips, or fails under CI=true


def _value(ds: Dataset, keyword: str) -> object:
    if keyword not in ds:
        return None
    v = ds[keyword].value
    if isinstance(v, (list, MultiValue)):
        return tuple(str(x) for x in v)
    return "" if v is None else str(v)


def _expected(case: Case, source: Dataset, keyword: str) -> object:
    want = case.expect.get(keyword, KEEP)
    return _value(source, keyword) if want == KEEP else want


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_results_are_valid_and_carry_the_identity(case: Case, tmp_path: Path) -> None:
    source = received(case)
    if case.fails:
        with pytest.raises(HeaderError, match=case.fails):
            _encode_all(source, tmp_path)
        return
    paths = _encode_all(source, tmp_path)
    kept = [k for k, v in case.expect.items() if v == KEEP]
    for kind, path in paths.items():
        errors = _errors(path)
        if kept:  # a PACS key kept invalid: dciodvfy may say so, about that attribute alone
            named = [e for e in errors if e != "Error - Dicom dataset contains invalid data values for Value Representations"]
            assert named and all(any(k in e or _spaced(k) in e for k in kept) for e in named), (kind, errors)
        else:
            assert not errors, (case.name, kind, errors)
        back = pydicom.dcmread(path)
        for keyword in IDENTITY:
            assert _value(back, keyword) == _expected(case, source, keyword), (case.name, kind, keyword)
        charset = back.get("SpecificCharacterSet")
        charset = list(charset) if isinstance(charset, MultiValue) else charset
        assert charset in (normalise_character_set(source.get("SpecificCharacterSet")), UTF8), (kind, charset)


def _spaced(keyword: str) -> str:
    """dciodvfy names attributes by their words: PatientID -> "PatientID" or "Patient ID"."""
    return {"PatientID": "Patient ID", "AccessionNumber": "Accession Number",
            "StudyInstanceUID": "Study Instance UID"}[keyword]


@pytest.mark.parametrize("name", REAL_CR)
def test_real_cr_results_are_valid(name: str, tmp_path: Path) -> None:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available: install the test extras (pydicom-data)")
    source = pydicom.dcmread(path)
    for kind, out in _encode_all(source, tmp_path).items():
        assert not _errors(out), (name, kind, _errors(out))
        back = pydicom.dcmread(out)
        for keyword in IDENTITY:
            assert _value(back, keyword) == _value(source, keyword), (name, kind, keyword)


def test_the_corpus_covers_every_category() -> None:
    counts = Counter(c.category for c in CORPUS)
    for category in ("character set", "character set (real file)", "age string", "date", "time", "length",
                     "empty type 1", "multi-value", "code string", "uid padding", "kept for matching"):
        assert counts[category] >= 1, category
    assert len(CORPUS) >= 30


def test_japanese_identity_keeps_the_source_character_set(tmp_path: Path) -> None:
    case = next(c for c in CORPUS if c.name == "japanese \\ISO 2022 IR 87")
    source = received(case)
    back = pydicom.dcmread(_encode_all(source, tmp_path)["sr"])
    assert list(back.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert str(back.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert back.PatientName.ideographic == "山田^太郎" and back.PatientName.phonetic == "やまだ^たろう"
    assert back.InstitutionName == "博多中央病院" and back.StudyDescription == "胸部単純X線 正面"
    raw = _encode_all(source, tmp_path / "again")["sr"].read_bytes()
    assert b"\x1b$B" in raw  # JIS X 0208 switched in by its ISO 2022 escape sequence, as the PACS expects


def test_text_the_source_set_cannot_hold_switches_the_result_to_utf8(tmp_path: Path) -> None:
    """A Latin-1 study whose result holds Japanese: ISO_IR 192, identity decoding to the same strings."""
    case = next(c for c in CORPUS if c.name == "latin-1")
    source = received(case)
    model, prediction = _model(), _prediction(ood=False)
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, model.digest)
    draft = Drafter(get_extractor("lexicon")).draft(prediction, None)
    draft = type(draft)(**{**draft.__dict__, "findings": "右胸水を認める。"})
    sr = encode_text_sr(source, prediction, model, draft, uids, NOW)
    path = tmp_path / "text.dcm"
    sr.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.SpecificCharacterSet == UTF8
    assert str(back.PatientName) == "Buc^Jérôme" and back.InstitutionName == "Hôpital Saint-Éloi"
    english = encode_text_sr(source, prediction, model, Drafter(get_extractor("lexicon")).draft(prediction, None),
                             uids, NOW)
    assert english.SpecificCharacterSet == "ISO_IR 100"  # English fits the study's own set: kept


def test_repairs_name_the_attribute_never_the_value() -> None:
    case = next(c for c in CORPUS if c.name == "impossible birth date")
    header = clean_header(received(case))
    (repair,) = [r for r in header.repairs if r.keyword == "PatientBirthDate"]
    assert repair.action == "emptied" and "(0010,0030)" in str(repair) and "19551345" not in str(repair)


def test_a_japanese_draft_in_a_japanese_study_stays_in_iso_2022_ir_87(tmp_path: Path) -> None:
    """The draft's kanji and kana are all in JIS X 0208: the PACS gets the character set it sent."""
    source = received(next(c for c in CORPUS if c.name == "japanese \\ISO 2022 IR 87"))
    model, prediction = _model(), _prediction(ood=True)
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, model.digest)
    draft = Drafter(get_extractor("lexicon"), wording="ja").draft(prediction, None)
    for kind, ds in (("text", encode_text_sr(source, prediction, model, draft, uids, NOW)),
                     ("sr", encode_sr(source, prediction, model, uids, NOW, draft=draft))):
        path = tmp_path / f"{kind}.dcm"
        ds.save_as(path, enforce_file_format=True)
        back = pydicom.dcmread(path)
        assert list(back.SpecificCharacterSet) == ["", "ISO 2022 IR 87"], kind
        assert not _errors(path), kind
        texts = {item.TextValue for item in _items(back) if "TextValue" in item}
        assert draft.findings in texts and draft.impression in texts and str(back.PatientName) == str(source.PatientName)


def _items(ds: Dataset):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)
