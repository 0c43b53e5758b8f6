"""Report wording tables: the same keys in every language, and the `[report] language` setting."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import pytest

from index import guidelines, wording
from index.wording import ENGLISH, JAPANESE, LANGUAGES, NOT_VALIDATED, WORDINGS, Wording, script_language, wording_for
from models.labels import LABELS
from models.prediction import TIERS
from worker.errors import ConfigError
from worker.settings import load_settings


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_wording_key_exists_in_every_language(language: str) -> None:
    w = WORDINGS[language]
    for f in dataclasses.fields(Wording):
        value, english = getattr(w, f.name), getattr(ENGLISH, f.name)
        assert type(value) is type(english), f.name
        if isinstance(english, Mapping):
            assert set(value) == set(english), f.name
        elif isinstance(english, str) and f.name not in ("sentence_join",):
            assert value, f.name
    assert set(w.labels) == set(LABELS)
    assert set(w.templates) == set(LABELS) - {"No Finding"}
    assert set(TIERS) | {NOT_VALIDATED} <= set(w.tiers)  # the models' tiers and "not validated"
    assert set(w.reference_notes) == set(guidelines.reference_notes())


def test_english_reference_notes_are_the_curated_ones() -> None:
    for label in LABELS:
        for r in guidelines.for_label(label):
            assert ENGLISH.reference_notes[(r.label, r.guideline.key)] == r.note


def test_a_table_missing_a_placeholder_fails_at_import() -> None:
    broken = dataclasses.replace(JAPANESE, ood_line="注: 本画像はモデルの学習範囲外である。")
    with pytest.raises(ImportError, match="ood_line"):
        wording._check(ENGLISH, broken)
    missing = dataclasses.replace(JAPANESE, labels={k: v for k, v in JAPANESE.labels.items() if k != "Fracture"})
    with pytest.raises(ImportError, match="labels"):
        wording._check(ENGLISH, missing)


def test_script_detection() -> None:
    assert script_language("右胸水を認める。") == "ja" and script_language("カテーテル") == "ja"
    assert script_language("Small right pleural effusion.") == "en" and script_language("Müller") == "en"


def test_wording_for() -> None:
    assert wording_for("ja") is JAPANESE and wording_for(ENGLISH) is ENGLISH
    with pytest.raises(ValueError, match="unknown report language 'jp': choose one of 'en', 'ja'"):
        wording_for("jp")


# ---------------------------------------------------------------- settings

def test_report_language_defaults_to_english_and_parses(tmp_path, monkeypatch) -> None:
    assert load_settings(None).report.language == "en"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[report]\nlanguage = "ja"\n')
    assert load_settings(cfg).report.language == "ja"
    monkeypatch.setenv("MEDSAM2_CXR_REPORT__LANGUAGE", "en")
    assert load_settings(cfg).report.language == "en"  # the environment wins


def test_an_unknown_report_language_names_the_key_and_the_choices(tmp_path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[report]\nlanguage = "jp"\n')
    with pytest.raises(ConfigError, match=r"(?s)bad\.toml.*report\.language.*'jp'.*'en', 'ja'"):
        load_settings(cfg)


def test_runtime_passes_the_language_to_the_drafter_and_the_encoders(tmp_path) -> None:
    from worker.reporter import LazyReporter
    from worker.runtime import Runtime

    (tmp_path / "idx").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[paths]\nspool = "{tmp_path / "var"}"\n[index]\npath = "{tmp_path / "idx"}"\n'
                   '[report]\nlanguage = "ja"\n')
    rt = Runtime.from_settings(load_settings(cfg))
    assert rt.ctx.language == "ja"
    assert isinstance(rt.ctx.reporter, LazyReporter) and rt.ctx.reporter.wording is JAPANESE
    # An index that cannot be opened: the draft still comes, in Japanese, and says why.
    from tests.unit.test_draft import _prediction

    draft = rt.ctx.reporter(_prediction({}), "cd" * 32)
    assert draft.wording is JAPANESE and draft.impression == "異常所見なし。"
    assert draft.notes == (f"類似症例インデックス（{tmp_path / 'idx'}）を開けないため、モデルの所見のみから下書きを作成した。",)
