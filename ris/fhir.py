"""FHIR R4 results of one study: a transaction Bundle of one DiagnosticReport, one Observation per
finding (the study's: the image that shows it most, named by a component) and one
out-of-distribution Observation per image.

Every resource is checked with fhir.resources before it goes out. fhir.resources 7 and later
carry R5 (default), R4B (4.3.0) and STU3, not R4 (4.0.1), and the 6.x line that did needs
pydantic 1; the R4B models are used, and the resources use only elements R4 has with the same
meaning (DiagnosticReport, Observation and Bundle did not change between R4 and R4B).

Each entry is a conditional create (``ifNoneExist`` on an identifier derived from the study, the
same for every target: a name-based UUID), so a retry after a lost response, a duplicate task or a resend makes no second
report: the server finds the first one and answers 200 instead of 201. The ImagingStudy is
referenced by its Study Instance UID (identifier ``urn:dicom:uid``), the patient by the DICOM
Patient ID, the order by the accession number; nothing is created for them.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import uuid

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.observation import Observation
from pydantic import ValidationError
from pydicom.sr.coding import Code

from dicom_node import codes
from dicom_node.encoders.text import REPORT_TITLE
from ris.content import ReportContent

FHIR_VERSION = "4.0"  # the fhirVersion MIME parameter (R4)
MEDIA_TYPE = "application/fhir+json"
URI = "urn:ietf:rfc:3986"  # identifier system: the value is itself a URI
DICOM_UID = "urn:dicom:uid"
_NAMESPACE = uuid.UUID("6f1d7d0e-3f4c-5b8a-9c52-6d2f1b0c9e41")  # this node's name-based UUIDs
SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
    "UMLS": "http://www.nlm.nih.gov/research/umls",
    codes.PRIVATE_SCHEME: "urn:medsam2-cxr:codes",  # the private scheme of dicom_node/codes.py
}
_OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
_V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
OPERATING_POINT = Code("OPPOINT", codes.PRIVATE_SCHEME, "Operating point")
_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


class BundleInvalid(ValueError):
    """A resource built does not validate against the FHIR models (a bug here, not the server's)."""


def resource_uuid(key: str, part: str = "report") -> str:
    """The name-based UUID of one resource of a study's report (``key``: ReportContent.key, the
    Study Instance UID): the same on every attempt, resend and server."""
    return str(uuid.uuid5(_NAMESPACE, f"study/{key}/{part}"))


def coding(code: Code) -> dict:
    return {"system": SYSTEMS.get(code.scheme_designator, f"urn:medsam2-cxr:scheme:{code.scheme_designator}"),
            "code": code.value, "display": code.meaning}


def concept(code: Code, text: str | None = None) -> dict:
    out: dict = {"coding": [coding(code)]}
    if text:
        out["text"] = text
    return out


def _instant(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _date(da: str) -> str | None:
    return f"{da[:4]}-{da[4:6]}-{da[6:8]}" if len(da) == 8 and da.isdigit() else None


def _subject(content: ReportContent) -> dict | None:
    p = content.patient
    if not p.id:
        return None
    ident: dict = {"type": {"coding": [{"system": _V2_0203, "code": "MR"}]}, "value": p.id}
    if _OID.match(p.issuer):
        ident["system"] = f"urn:oid:{p.issuer}"
    elif p.issuer:
        ident["assigner"] = {"display": p.issuer}
    return {"type": "Patient", "identifier": ident}


def _quantity(value: float) -> dict:
    return {"value": round(float(value), 4), "unit": "1", "system": SYSTEMS["UCUM"], "code": "1"}


def draft_text(content: ReportContent) -> str:
    """The draft as plain text, as presentedForm carries it: notices, findings, impression, notes."""
    d = content.draft
    parts = ["\n".join(content.notices), f"FINDINGS: {d.findings}", f"IMPRESSION: {d.impression}"]
    if d.notes:
        parts.append("\n".join(d.notes))
    return "\n\n".join(p for p in parts if p.strip()) + "\n"


def _validate(model, resource: dict) -> dict:
    try:
        return json.loads(model.model_validate(resource).model_dump_json(exclude_none=True))
    except ValidationError as exc:
        raise BundleInvalid(f"{resource.get('resourceType')} of the report does not validate: {exc}") from exc


def build_bundle(content: ReportContent) -> dict:
    """The transaction Bundle of one study's report, each resource validated (fhir.resources, R4B models)."""
    study = content.study
    subject = _subject(content)
    effective = _date(study.date)
    issued = _instant(content.issued)
    imaging_study = {"type": "ImagingStudy", "identifier": {"system": DICOM_UID, "value": f"urn:oid:{study.instance_uid}"}}
    common: dict = {"status": "preliminary", "issued": issued}
    if subject:
        common["subject"] = subject
    if effective:
        common["effectiveDateTime"] = effective
    method = concept(codes.PROCESSING_ALGORITHM, codes.ALGORITHM_NAME)
    device = {"display": f"{content.model.name} {content.model.version} ({content.model.short_digest})"}
    category = [{"coding": [{"system": _OBSERVATION_CATEGORY, "code": "imaging", "display": "Imaging"}]}]

    entries: list[dict] = []

    def add(model, part: str, resource: dict) -> str:
        rid = resource_uuid(content.key, part)
        resource = {**resource, "identifier": [{"system": URI, "value": f"urn:uuid:{rid}"}]}
        entries.append({"fullUrl": f"urn:uuid:{rid}", "resource": _validate(model, resource),
                        "request": {"method": "POST", "url": resource["resourceType"],
                                    "ifNoneExist": f"identifier={URI}|urn:uuid:{rid}"}})
        return f"urn:uuid:{rid}"

    def source(image: int) -> dict:
        return {"code": concept(codes.SOURCE_IMAGE), "valueString": content.images[image].sop_instance_uid}

    results = []
    for sf in content.findings:
        f = sf.finding
        components = [
            {"code": concept(codes.PROBABILITY), "valueQuantity": _quantity(f.probability),
             "referenceRange": [{"low": _quantity(f.threshold), "text": "decision threshold"}]},
            {"code": concept(codes.CERTAINTY), "valueCodeableConcept": concept(codes.TIER_CODES[f.tier], f.tier)},
        ]
        if f.operating_point:
            components.append({"code": concept(OPERATING_POINT), "valueString": f.operating_point})
        components.append(source(sf.image))
        abnormal = f.present and f.label != "No Finding"
        results.append(add(Observation, f"finding/{f.label}", {
            "resourceType": "Observation", **common, "category": category,
            "code": concept(codes.LABEL_CODES[f.label], f.label),
            "valueCodeableConcept": concept(codes.PRESENT if f.present else codes.ABSENT),
            "interpretation": [{"coding": [{"system": _INTERPRETATION, "code": "A" if abnormal else "N"}]}],
            "method": method, "device": device, "derivedFrom": [imaging_study], "component": components}))
    for i, image in enumerate(content.images):
        pred = image.prediction
        results.append(add(Observation, f"out-of-distribution/{image.sop_instance_uid}", {
            "resourceType": "Observation", **common, "category": category, "code": concept(codes.OUTSIDE_EXPERIENCE),
            "valueCodeableConcept": concept(codes.YES if pred.out_of_distribution else codes.NO),
            "method": method, "device": device, "derivedFrom": [imaging_study],
            "component": [{"code": concept(codes.OOD_SCORE), "valueQuantity": _quantity(pred.ood_score),
                           "referenceRange": [{"high": _quantity(pred.ood_threshold)}]}, source(i)]}))

    report: dict = {
        "resourceType": "DiagnosticReport", **common,
        "category": [{"coding": [{"system": _V2_0074, "code": "RAD", "display": "Radiology"}]}],
        "code": concept(REPORT_TITLE),
        "imagingStudy": [imaging_study],
        "result": [{"reference": r} for r in results],
        "conclusion": content.draft.impression or None,
        "conclusionCode": [concept(codes.LABEL_CODES[sf.finding.label], sf.finding.label) for sf in content.findings
                           if sf.finding.present and sf.finding.label != "No Finding"] or None,
        "presentedForm": [{"contentType": "text/plain; charset=utf-8", "language": content.language,
                           "title": "Draft report (AI result, not for primary diagnosis)",
                           "creation": issued,
                           "data": base64.b64encode(draft_text(content).encode("utf-8")).decode("ascii")}],
    }
    if study.accession:
        report["basedOn"] = [{"type": "ServiceRequest", "identifier": {
            "type": {"coding": [{"system": _V2_0203, "code": "ACSN"}]}, "value": study.accession}}]
    add(DiagnosticReport, "report", {k: v for k, v in report.items() if v is not None})
    return _validate(Bundle, {"resourceType": "Bundle", "type": "transaction", "entry": entries})


class FhirRefused(Exception):
    """The server answered the transaction with a client error (4xx) or a failed entry: trying
    again sends the same Bundle and gets the same answer."""


class FhirUnavailable(Exception):
    """No answer, or a server error (5xx, 429): worth another attempt."""


def _outcome(response) -> str:
    """The diagnostics of an OperationOutcome answer, or the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return " ".join(response.text.split())[:300]
    issues = body.get("issue", []) if isinstance(body, dict) else []
    text = "; ".join(str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code", ""))
                     for i in issues if isinstance(i, dict))
    return text[:300] or " ".join(json.dumps(body).split())[:300]


def post_bundle(url: str, bundle: dict, token: str = "", verify=True, timeout: float = 30.0) -> list[str]:
    """POST the transaction to the FHIR base ``url``; the status of each entry (e.g. "201 Created").

    Raises FhirRefused (4xx other than 408/429, or an entry that did not succeed) or
    FhirUnavailable (no connection, a timeout, 5xx, 408, 429).
    """
    import httpx

    headers = {"Content-Type": f"{MEDIA_TYPE}; fhirVersion={FHIR_VERSION}", "Accept": MEDIA_TYPE}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.post(url.rstrip("/") or url, content=json.dumps(bundle).encode("utf-8"), headers=headers,
                              timeout=timeout, verify=verify)
    except httpx.HTTPError as exc:  # connect, read, TLS, protocol errors
        raise FhirUnavailable(f"{type(exc).__name__}: {exc}") from exc
    code = response.status_code
    if code >= 500 or code in (408, 429):
        raise FhirUnavailable(f"HTTP {code}: {_outcome(response)}")
    if code >= 300:
        raise FhirRefused(f"HTTP {code}: {_outcome(response)}")
    try:
        answer = response.json()
        statuses = [str(e.get("response", {}).get("status", "")) for e in answer.get("entry", [])]
    except (ValueError, AttributeError) as exc:
        raise FhirRefused(f"HTTP {code} but no transaction-response Bundle: {exc}") from exc
    failed = [s for s in statuses if not s.strip().startswith("2")]
    if len(statuses) != len(bundle["entry"]) or failed:
        raise FhirRefused(f"transaction-response has {len(statuses)} entries for {len(bundle['entry'])}, "
                          f"not succeeded: {failed}")
    return statuses
