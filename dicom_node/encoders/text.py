"""Draft report -> Basic Text SR (TID 2000): what any PACS viewer shows as a text report.

Sections, in reading order: notices (AI result, not a signed report, synthetic training, out of
distribution), Findings, Impressions, Guideline references, Similar prior cases. Basic Text SR
allows only CONTAINER, TEXT, CODE, UIDREF, DATE/TIME, PNAME, COMPOSITE, IMAGE and WAVEFORM items
and no by-reference relationships; the content is checked against that before encoding.

highdicom 0.28 has no Basic Text SR class, so `BasicTextSR` reuses its abstract SR base (the SR
Document General module: completion and verification flags, performed procedure codes,
evidence), pinned with highdicom < 0.29 in pyproject.toml.
"""

from __future__ import annotations

import datetime
from typing import Any

import highdicom as hd
from highdicom.sr.sop import _SR
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from dicom_node import codes
from dicom_node.encoders.common import (
    DraftLines,
    device_observer,
    equipment_and_dates,
    finish,
    notices,
    series_description,
)
from dicom_node.encoders.header import clean_header
from dicom_node.encoders.notices import Notices
from dicom_node.sop import BASIC_TEXT_SR
from dicom_node.uids import ResultUIDs
from models.prediction import ModelIdentity, Prediction

TEXT_SERIES_NUMBER = 9903
REPORT_TITLE = dcm_codes.LN.DiagnosticImagingReport  # LN 18748-4
NOTICES = Code("NOTICES", codes.PRIVATE_SCHEME, "Notices about this AI result")
ALLOWED_VALUE_TYPES = frozenset({"CONTAINER", "TEXT", "CODE", "DATETIME", "DATE", "TIME", "UIDREF", "PNAME",
                                 "COMPOSITE", "IMAGE", "WAVEFORM"})
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


class BasicTextSR(_SR):
    """SOP class for a Basic Text SR document (1.2.840.10008.5.1.4.1.1.88.11).

    Raises
    ------
    ValueError
        Content with a value type Basic Text SR does not allow (NUM, SCOORD, ...) or a
        by-reference relationship.
    """

    def __init__(self, evidence: list[Dataset], content: Dataset, series_instance_uid: str, series_number: int,
                 sop_instance_uid: str, instance_number: int, **kwargs: Any) -> None:
        _check_basic_text(content)
        super().__init__(evidence=evidence, content=content, series_instance_uid=series_instance_uid,
                         series_number=series_number, sop_instance_uid=sop_instance_uid,
                         sop_class_uid=BASIC_TEXT_SR, instance_number=instance_number, **kwargs)


def _check_basic_text(item: Dataset, path: str = "root") -> None:
    for i, child in enumerate(item.get("ContentSequence", []), 1):
        where = f"{path}/{i}"
        if "ReferencedContentItemIdentifier" in child:
            raise ValueError(f"{where}: Basic Text SR does not allow by-reference relationships")
        if child.ValueType not in ALLOWED_VALUE_TYPES:
            raise ValueError(f"{where}: value type {child.ValueType} is not allowed in a Basic Text SR")
        _check_basic_text(child, where)


def _section(name: Code, items: list[tuple[Code, str]]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=name, relationship_type=_CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(name=n, value=v, relationship_type=_CONTAINS) for n, v in items])
    return container


def report_content(prediction: Prediction, model: ModelIdentity, draft: DraftLines,
                   wording: Notices | None = None) -> hd.sr.ContainerContentItem:
    """The TID 2000 tree: observation context (the device), then one container per section.

    wording: the language of the notices (encoders/notices.py); None: the draft's.
    """
    w = wording or draft.wording
    root = hd.sr.ContainerContentItem(name=REPORT_TITLE, template_id="2000")
    context = device_observer(model)
    lines = [w.sentence(w.draft_notice), *notices(prediction, model, w), *draft.notes]
    sections = [
        _section(NOTICES, [(codes.COMMENT, line) for line in dict.fromkeys(lines)]),
        _section(dcm_codes.DCM.Findings, [(dcm_codes.DCM.Finding, draft.findings)]),
        _section(dcm_codes.DCM.Impressions, [(dcm_codes.DCM.Impression, draft.impression)]),
    ]
    if references := draft.reference_lines():
        sections.append(_section(codes.GUIDELINE_REFERENCES, [(codes.GUIDELINE_REFERENCE, line)
                                                             for line in references]))
    if similar := draft.similar_lines():
        sections.append(_section(codes.SIMILAR_CASES, [(codes.SIMILAR_CASE, line) for line in similar]))
    root.ContentSequence = hd.sr.ContentSequence([*context, *sections])
    return root


def encode_text_sr(source: Dataset, prediction: Prediction, model: ModelIdentity, draft: DraftLines,
                   uids: ResultUIDs, now: datetime.datetime, wording: Notices | None = None) -> BasicTextSR:
    """Encode the draft report as a Basic Text SR in the source's study, in the model's text series.

    wording: the language of the notices (encoders/notices.py); None: the draft's.
    """
    header = clean_header(source)
    sr = BasicTextSR(
        evidence=[header.dataset],
        content=report_content(prediction, model, draft, wording),
        series_instance_uid=uids.text_series,
        series_number=TEXT_SERIES_NUMBER,
        sop_instance_uid=uids.text_instance,
        instance_number=1,
        is_complete=True,
        is_final=False,
        is_verified=False,
        performed_procedure_codes=[codes.PLAIN_CHEST_XRAY],
        coding_schemes=[codes.CODING_SCHEME_IDENTIFICATION],
        series_description=series_description(model, "draft report"),
        **equipment_and_dates(model, now),
    )
    finish(sr, model, now, header)
    return sr
