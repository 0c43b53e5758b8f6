"""The notices every result object carries, one table per report language.

The encoders (SR, SC, text SR) print these sentences; the report wording (index/wording.py) is a
`Notices` too, adding the strings of the draft report, so each notice is written once, here, and
the DICOM layer never imports the index to find it. The SC's burned-in text always uses `ENGLISH`
(its overlay font has Latin glyphs only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any

from models.prediction import NOT_VALIDATED


@dataclass(frozen=True)
class Notices:
    """The sentences a result must carry, for one language; index.wording.Wording extends it."""

    language: str  # its code in `[report] language`
    full_stop: str  # ends a notice: "." / "。"
    tiers: Mapping[str, str]  # models.prediction.ALL_TIERS -> how the confidence reads
    no_index: str  # why a result has no similar cases (and no draft)
    not_for_diagnosis: str
    synthetic_notice: str
    ood_notice: str
    not_validated_notice: str  # tiers read "not validated" (a bundle not validated on real images)
    operating_points_line: str  # {ops}: models.operating_points.summary, in English like the criteria
    draft_notice: str
    model_line: str  # {name} {version}
    intended_use_line: str  # {text}: the model card's own words
    training_data_line: str  # {text}: the model card's own words

    def sentence(self, text: str) -> str:
        """A notice as a sentence: "AI result, not for primary diagnosis."."""
        return text + self.full_stop

    def capitalised(self, text: str) -> str:
        """First letter upper case (a no-op for Japanese)."""
        return text[:1].upper() + text[1:]


def notice_fields(notices: Notices) -> dict[str, Any]:
    """The `Notices` fields of a table as keywords, for a subclass (index.wording.Wording) to extend."""
    return {f.name: getattr(notices, f.name) for f in fields(Notices)}


ENGLISH = Notices(
    language="en",
    full_stop=".",
    tiers=MappingProxyType({"high": "high confidence", "medium": "medium confidence", "low": "low confidence",
                            NOT_VALIDATED: "confidence not validated"}),
    no_index="no similar cases index configured",
    not_for_diagnosis="AI result, not for primary diagnosis",
    synthetic_notice="Trained on synthetic phantom radiographs only - not clinically validated",
    ood_notice="Image outside the model's experience - interpret with care",
    not_validated_notice="Confidence not stated: the model was not validated on real radiographs",
    operating_points_line="Operating points: {ops}.",
    draft_notice="Draft report written by the AI for a radiologist to correct; not a signed report",
    model_line="Model: {name} {version}.",
    intended_use_line="Intended use: {text}",
    training_data_line="Training data: {text}",
)

JAPANESE = Notices(
    language="ja",
    full_stop="。",
    tiers=MappingProxyType({"high": "高", "medium": "中", "low": "低", NOT_VALIDATED: "未検証"}),
    no_index="類似症例インデックスが設定されていない",
    not_for_diagnosis="AIによる解析結果であり、一次診断には用いないこと",
    synthetic_notice="合成ファントム画像のみで学習したモデルであり、臨床的に検証されていない",
    ood_notice="モデルの学習範囲外の画像であり、解釈には注意を要する",
    not_validated_notice="実際の胸部X線写真で検証されていないモデルのため、確信度は示さない",
    operating_points_line="判定閾値の基準: {ops}。",
    draft_notice="AIが作成した報告書の下書きであり、放射線科医による確認・修正を要する。確定した報告書ではない",
    model_line="モデル: {name} {version}。",
    intended_use_line="使用目的（モデルカード原文）: {text}",
    training_data_line="学習データ（モデルカード原文）: {text}",
)

# The English notices under short names: the SC and the header attributes always use these.
NOT_FOR_DIAGNOSIS = ENGLISH.not_for_diagnosis
SYNTHETIC_NOTICE = ENGLISH.synthetic_notice
OOD_NOTICE = ENGLISH.ood_notice

