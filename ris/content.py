"""What a report to the RIS says about one study, gathered from the spool: the HL7 and FHIR builders
read only this.

Patient and study come from the first image's header (the DICOM patient and study modules, as
received); findings from the predictions of every inferred image of the study (per label the
image that shows it most, naming it; out-of-distribution per image); the draft from each image's
Basic Text SR the PACS got (so the RIS reads the same words), or, without a similar cases index, a
draft from its findings alone.
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
from models.prediction import Finding, ModelIdentity, Prediction

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
class Image:
    """One inferred image of the study, as the report names it."""

    job_id: str
    sop_instance_uid: str
    prediction: Prediction
    urgent: bool
    view: str = ""  # (0018,5101) View Position: PA, AP, LL...


@dataclass(frozen=True)
class StudyFinding:
    """One label for the whole study: the finding of the image that shows it most (``image``: an
    index into ReportContent.images)."""

    finding: Finding
    image: int


@dataclass(frozen=True)
class ReportContent:
    """Everything one ORU^R01 or FHIR Bundle says about one study: every inferred image of it."""

    key: str  # what the message's identifiers derive from: the Study Instance UID (a job's id without one)
    patient: Patient
    study: Study
    images: tuple[Image, ...]
    findings: tuple[StudyFinding, ...]
    model: ModelIdentity
    draft: DraftText
    notices: tuple[str, ...]
    urgent: bool  # any image urgent
    issued: dt.datetime
    language: str = "en"
    identifiers: tuple[str, ...] = field(default=(), repr=False)  # values to redact from peers' answers

    @property
    def job_ids(self) -> list[str]:
        return [i.job_id for i in self.images]


@dataclass(frozen=True)
class Inferred:
    """What gather reads of one inferred image: its job, source in the spool, prediction, and the
    Basic Text SR the PACS got (None or missing: no similar cases index)."""

    job_id: str
    source: Path
    prediction: Prediction
    model: ModelIdentity
    text_sr: Path | None
    urgent: bool


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


def study_findings(predictions: list[Prediction]) -> tuple[StudyFinding, ...]:
    """Per label, the finding of the image that shows it most: present on any image wins, then the
    highest calibrated probability (the first image on a tie); labels in the first image's order."""
    out = []
    for first in predictions[0].findings:
        candidates = [(i, f) for i, p in enumerate(predictions) for f in p.findings if f.label == first.label]
        i, f = max(candidates, key=lambda c: (c[1].present, c[1].probability, -c[0]))
        out.append(StudyFinding(f, i))
    return tuple(out)


def _draft_of(image: Inferred, language: str) -> tuple[DraftText, tuple[str, ...]]:
    """(the draft, the notices) of one image: its text SR's, or written from its findings."""
    if image.text_sr is not None and image.text_sr.exists():
        return draft_from_text_sr(image.text_sr)
    wording = wording_for(language)
    return (draft_from_findings(image.prediction, language),
            (wording.sentence(wording.draft_notice), *notices(image.prediction, image.model, wording)))


def _joined(drafts: list[DraftText], images: tuple[Image, ...]) -> DraftText:
    """One image: its draft as it is. Several: each image's findings and impression under its name,
    and which image is which (its SOP Instance UID) among the notes."""
    if len(drafts) == 1:
        return drafts[0]
    names = [image_name(k, i) for k, i in enumerate(images)]

    def each(part: str) -> str:
        return "\n".join(f"{name}: {getattr(d, part)}" for name, d in zip(names, drafts, strict=True)
                         if getattr(d, part).strip())

    which = (f"{name}: SOP Instance UID {i.sop_instance_uid}" for name, i in zip(names, images, strict=True))
    return DraftText(each("findings"), each("impression"), (*dict.fromkeys(n for d in drafts for n in d.notes), *which))


def gather(images: list[Inferred], issued: dt.datetime, language: str = "en") -> ReportContent:
    """The report of one study from its inferred images (the oldest job first): patient and study
    from the first image's header; per label the finding of the image showing it most; urgent when
    any image is; each image's draft (its text SR when there is one) under its name."""
    from dicom_node.identifiers import identifiers

    if not images:
        raise ValueError("a report needs at least one inferred image of the study")
    headers = [pydicom.dcmread(i.source, stop_before_pixels=True) for i in images]
    patient, study = patient_and_study(headers[0])
    said = tuple(Image(job_id=i.job_id, sop_instance_uid=_str(ds, "SOPInstanceUID"), prediction=i.prediction,
                       urgent=bool(i.urgent), view=_str(ds, "ViewPosition"))
                 for i, ds in zip(images, headers, strict=True))
    drafts: list[DraftText] = []
    notice_lines: list[str] = []
    for image in images:
        draft, lines = _draft_of(image, language)
        drafts.append(draft)
        notice_lines += lines
    return ReportContent(key=study.instance_uid or f"job:{images[0].job_id}", patient=patient, study=study,
                         images=said, findings=study_findings([i.prediction for i in images]),
                         model=images[0].model, draft=_joined(drafts, said), notices=tuple(dict.fromkeys(notice_lines)),
                         urgent=any(i.urgent for i in said), issued=issued, language=language,
                         identifiers=tuple(dict.fromkeys(v for ds in headers for v in identifiers(ds))))


def image_name(index: int, image: Image) -> str:
    """How the report names an image: "Image 1 (PA)"."""
    return f"Image {index + 1}" + (f" ({image.view})" if image.view else "")
