"""What a report to the RIS says, gathered once per job from the spool: the HL7 and FHIR builders
read only this.

Patient and study come from the source image's header (the DICOM patient and study modules, as
received); findings from the job's prediction; the draft from the Basic Text SR the PACS got (so
the RIS reads the same words), or, without a similar cases index, a draft from the findings alone.
Values here are patient identifiers: nothing in this module logs them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.valuerep import PersonName

from dicom_node import codes
from dicom_node.codes import GUIDELINE_REFERENCES, SIMILAR_CASES
from dicom_node.encoders.common import notices
from dicom_node.encoders.text import NOTICES
from index.wording import wording_for
from models.prediction import ModelIdentity, Prediction

_FINDINGS, _IMPRESSIONS = "121070", "121072"  # DCM Findings, Impressions (the text SR's sections)


@dataclass(frozen=True)
class NameGroup:
    """One component group of a DICOM PN (alphabetic, ideographic or phonetic) as HL7 XPN parts."""

    family: str = ""
    given: str = ""
    middle: str = ""
    prefix: str = ""
    suffix: str = ""
    representation: str = "A"  # HL7 table 4000: A alphabetic, I ideographic, P phonetic

    @property
    def empty(self) -> bool:
        return not (self.family or self.given or self.middle or self.prefix or self.suffix)


@dataclass(frozen=True)
class Patient:
    id: str
    issuer: str = ""
    names: tuple[NameGroup, ...] = ()
    birth_date: str = ""  # YYYYMMDD as DICOM DA
    sex: str = ""  # M, F, O or ""


@dataclass(frozen=True)
class Study:
    instance_uid: str
    accession: str = ""
    placer_order: str = ""  # (0040,2016) Placer Order Number / Imaging Service Request
    filler_order: str = ""  # (0040,2017)
    requested_procedure_id: str = ""
    date: str = ""  # DA
    time: str = ""  # TM
    description: str = ""
    procedure: codes.Code | None = None  # the first Procedure Code Sequence item, when there is one
    specific_character_set: tuple[str, ...] = ()


@dataclass(frozen=True)
class DraftText:
    findings: str
    impression: str
    notes: tuple[str, ...] = ()  # the draft's own notes, guideline references, similar cases


@dataclass(frozen=True)
class ReportContent:
    """Everything one ORU^R01 or FHIR Bundle says about one job."""

    job_id: str
    patient: Patient
    study: Study
    prediction: Prediction
    model: ModelIdentity
    draft: DraftText
    notices: tuple[str, ...]
    urgent: bool
    issued: dt.datetime
    language: str = "en"
    source_sop_instance_uid: str = ""
    identifiers: tuple[str, ...] = field(default=(), repr=False)  # values to redact from peers' answers


def _str(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _names(value: object) -> tuple[NameGroup, ...]:
    if not value:
        return ()
    pn = value if isinstance(value, PersonName) else PersonName(str(value))
    out = []
    for group, rep in ((pn.alphabetic, "A"), (pn.ideographic, "I"), (pn.phonetic, "P")):
        parts = (str(group or "").split("^") + [""] * 5)[:5]
        g = NameGroup(family=parts[0].strip(), given=parts[1].strip(), middle=parts[2].strip(),
                      prefix=parts[3].strip(), suffix=parts[4].strip(), representation=rep)
        if not g.empty:
            out.append(g)
    return tuple(out)


def patient_and_study(ds: Dataset) -> tuple[Patient, Study]:
    """The DICOM patient and study modules of a source header, as the RIS message carries them."""
    sex = _str(ds, "PatientSex").upper()
    patient = Patient(id=_str(ds, "PatientID"), issuer=_str(ds, "IssuerOfPatientID"),
                      names=_names(ds.get("PatientName")), birth_date=_str(ds, "PatientBirthDate"),
                      sex=sex if sex in ("M", "F", "O") else "")
    procedure = None
    seq = ds.get("ProcedureCodeSequence")
    if seq:
        item = seq[0]
        if item.get("CodeValue") and item.get("CodingSchemeDesignator"):
            procedure = codes.Code(str(item.CodeValue), str(item.CodingSchemeDesignator),
                                   str(item.get("CodeMeaning", "")))
    charset = ds.get("SpecificCharacterSet", "")
    charset = (charset,) if isinstance(charset, str) else tuple(str(v) for v in charset)
    study = Study(instance_uid=_str(ds, "StudyInstanceUID"), accession=_str(ds, "AccessionNumber"),
                  placer_order=_str(ds, "PlacerOrderNumberImagingServiceRequest"),
                  filler_order=_str(ds, "FillerOrderNumberImagingServiceRequest"),
                  requested_procedure_id=_str(ds, "RequestedProcedureID"), date=_str(ds, "StudyDate"),
                  time=_str(ds, "StudyTime"), description=_str(ds, "StudyDescription"), procedure=procedure,
                  specific_character_set=charset)
    return patient, study


def _code_value(item: Dataset) -> str:
    seq = item.get("ConceptNameCodeSequence")
    return str(seq[0].CodeValue) if seq else ""


def _texts(container: Dataset) -> list[str]:
    return [str(c.TextValue) for c in container.get("ContentSequence", []) if c.get("ValueType") == "TEXT"]


def draft_from_text_sr(path: Path) -> tuple[DraftText, tuple[str, ...]]:
    """(the draft, the notices) of a Basic Text SR written by dicom_node/encoders/text.py."""
    ds = pydicom.dcmread(path)
    findings, impression, notes, notice_lines = [], [], [], []
    extra = {GUIDELINE_REFERENCES.value, SIMILAR_CASES.value}
    for item in ds.get("ContentSequence", []):
        if item.get("ValueType") != "CONTAINER":
            continue
        code = _code_value(item)
        if code == _FINDINGS:
            findings += _texts(item)
        elif code == _IMPRESSIONS:
            impression += _texts(item)
        elif code == NOTICES.value:
            notice_lines += _texts(item)
        elif code in extra:
            notes += _texts(item)
    return DraftText("\n".join(findings), "\n".join(impression), tuple(notes)), tuple(notice_lines)


def draft_from_findings(prediction: Prediction, language: str) -> DraftText:
    """A draft written from the findings alone (no similar cases index is configured)."""
    from index.draft import Drafter
    from index.labelers import get_extractor

    draft = Drafter(get_extractor("lexicon"), wording=language).draft(prediction, None)
    return DraftText(draft.findings, draft.impression, tuple(draft.notes))


def gather(job_id: str, source: Path, prediction: Prediction, model: ModelIdentity, text_sr: Path | None,
           urgent: bool, issued: dt.datetime, language: str = "en") -> ReportContent:
    """The report of one job: source header, prediction, and the draft (text SR when there is one)."""
    from dicom_node.identifiers import identifiers

    ds = pydicom.dcmread(source, stop_before_pixels=True)
    patient, study = patient_and_study(ds)
    wording = wording_for(language)
    if text_sr is not None and text_sr.exists():
        draft, notice_lines = draft_from_text_sr(text_sr)
    else:
        draft = draft_from_findings(prediction, language)
        notice_lines = (wording.sentence(wording.draft_notice), *notices(prediction, model, wording))
    return ReportContent(job_id=job_id, patient=patient, study=study, prediction=prediction, model=model,
                         draft=draft, notices=tuple(dict.fromkeys(notice_lines)), urgent=urgent, issued=issued,
                         language=language, source_sop_instance_uid=_str(ds, "SOPInstanceUID"),
                         identifiers=tuple(identifiers(ds)))
