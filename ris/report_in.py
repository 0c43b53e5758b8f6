"""A first reader's report as it reaches the node: read from an HL7 v2 ORU^R01 (the RIS, over MLLP)
or a Basic Text SR (the PACS), into one :class:`IncomingReport` per order.

Where the values are read from an ORU^R01 (IHE Radiology conventions, and the node's own ORU):

- Study Instance UID: an OBX whose OBX-3 identifier is DCM 110180 ("Study Instance UID", as
  ris/hl7v2.py writes it) or DCM 113014 ("DICOM Study", IHE), else ZDS-1; first component.
- Accession number: OBR-18 (IHE), else OBR-3 (filler order number). Only its keyed hash is kept.
- Text: every TX, FT or ST OBX other than the UID, in order, one line each; an OBX-3 of LOINC
  59776-5 (Findings) or 19005-8 (Impressions) starts a ``FINDINGS:`` / ``IMPRESSION:`` section,
  the sections the report labelers read (index.labelers.common).
- Result status: OBR-25 (F final, C corrected, P preliminary, ...); OBX-11 when OBR-25 is empty.

Each OBR starts one report: a message may carry several orders.
"""

from __future__ import annotations

from dataclasses import dataclass

import hl7
from pydicom.dataset import Dataset

from dicom_node.sop import BASIC_TEXT_SR

STUDY_UID_CODES = ("110180", "113014")  # DCM Study Instance UID, DCM DICOM Study
SECTION_CODES = {"59776-5": "FINDINGS", "19005-8": "IMPRESSION"}  # LOINC Findings, Impressions
TEXT_TYPES = ("TX", "FT", "ST")
FINAL_STATUSES = ("F", "C")  # the statuses a second read compares with: final, corrected
# HL7 table 0211 name (MSH-18, first repetition) -> Python codec of the message bytes
_CODECS = {"": "ascii", "ASCII": "ascii", "8859/1": "latin-1", "8859/15": "iso8859_15",
           "UNICODE UTF-8": "utf-8", "ISO IR87": "iso2022_jp", "ISO IR6": "iso2022_jp", "ISO IR14": "shift_jis"}


class ReportUnreadable(ValueError):
    """The message cannot be read as a report; the text says why (sent back in the ACK, MSA-3 and
    ERR-8) and ``code`` is the HL7 table 0357 error code (ERR-3)."""

    def __init__(self, message: str, code: str = "101") -> None:  # 101: required field missing
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class IncomingReport:
    """One first reader's report: where it came from and what it is about, never a patient identifier
    besides the accession number, which the store keeps only as its keyed hash."""

    source: str  # "hl7" or "sr"
    message_id: str  # MSH-10 (with the OBR's set id when a message holds several), or the SR's SOP Instance UID
    study_instance_uid: str
    accession: str
    status: str  # OBR-25, "F" for an SR whose CompletionFlag is COMPLETE and VerificationFlag VERIFIED
    text: str

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


def decode(raw: bytes) -> str:
    """The message's text, decoded by its MSH-18 (read from the ASCII MSH segment itself)."""
    msh = raw.split(b"\r", 1)[0].decode("ascii", "replace")
    fields = msh.split("|")
    charset = fields[17].split("~")[0].strip() if len(fields) > 17 else ""
    codec = _CODECS.get(charset.upper())
    if codec is None:
        raise ReportUnreadable(f"MSH-18 character set {charset!r} is not one this node reads "
                               f"({', '.join(sorted(k for k in _CODECS if k))})", "103")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise ReportUnreadable(f"the message bytes are not {charset or 'ASCII'} as MSH-18 says: {exc.reason} at "
                               f"byte {exc.start}", "102") from exc


def parse_message(text: str) -> hl7.Message:
    """python-hl7's parse, with its errors as ReportUnreadable."""
    text = text.strip("\r\n\x0b\x1c").replace("\r\n", "\r").replace("\n", "\r")
    if not text.startswith("MSH"):
        raise ReportUnreadable("the message does not start with an MSH segment", "100")
    try:
        return hl7.parse(text)
    except (ValueError, IndexError, KeyError) as exc:
        raise ReportUnreadable(f"not an HL7 v2 message: {type(exc).__name__}: {exc}", "102") from exc


def _raw(segment, n: int) -> str:
    """Field n as sent (escapes kept)."""
    try:
        return str(segment[n]).strip()
    except IndexError:
        return ""


def _get(segment, n: int) -> str:
    """The first component of the first repetition of field n (escapes kept)."""
    return _raw(segment, n).split("~")[0].split("^")[0].strip()


def from_oru(msg: hl7.Message) -> list[IncomingReport]:
    """The reports of one ORU^R01; ReportUnreadable names what is missing."""
    msh = msg.segment("MSH")
    kind = _raw(msh, 9)
    if not kind.startswith("ORU^R01"):
        raise ReportUnreadable(f"MSH-9 is {kind!r}: this node takes reports as ORU^R01", "200")
    control = _raw(msh, 10)
    if not control:
        raise ReportUnreadable("MSH-10 (message control id) is empty")
    orders: list[dict] = []
    zds_uid = ""
    for seg in msg:
        name = str(seg[0])
        if name == "OBR":
            orders.append({"set": _raw(seg, 1) or str(len(orders) + 1), "acc": msg.unescape(_get(seg, 18) or _get(seg, 3)),
                           "status": _raw(seg, 25).upper(), "uid": "", "lines": [], "obx_status": ""})
        elif name == "ZDS":
            zds_uid = msg.unescape(_get(seg, 1))
        elif name == "OBX":
            if not orders:
                raise ReportUnreadable("an OBX comes before any OBR", "100")
            o = orders[-1]
            code = _get(seg, 3)
            if code in STUDY_UID_CODES:
                o["uid"] = msg.unescape(_get(seg, 5))
                continue
            value = msg.unescape(_raw(seg, 5)) if _raw(seg, 5) != '""' else ""
            o["obx_status"] = o["obx_status"] or _raw(seg, 11).upper()
            if _raw(seg, 2).upper() in TEXT_TYPES:
                section = SECTION_CODES.get(code)
                if section and o.get("section") != section:
                    o["section"] = section
                    o["lines"].append(f"{section}:")
                o["lines"].append(value.replace("\\.br\\", "\n"))
    if not orders:
        raise ReportUnreadable("the ORU^R01 has no OBR segment: no order to match the report to")
    out = []
    for o in orders:
        uid = o["uid"] or zds_uid
        if not uid and not o["acc"]:
            raise ReportUnreadable(f"OBR {o['set']}: no Study Instance UID (OBX 110180 or 113014, ZDS-1) and no "
                                   "accession number (OBR-18, OBR-3): the report cannot be matched to a study")
        text = "\n".join(o["lines"]).strip()
        if not text:
            raise ReportUnreadable(f"OBR {o['set']}: no report text (OBX of type TX, FT or ST)")
        mid = control if len(orders) == 1 else f"{control}/{o['set']}"
        out.append(IncomingReport("hl7", mid, uid, o["acc"], o["status"] or o["obx_status"] or "F", text))
    return out


def _sr_text(items, out: list[str], section: str = "") -> None:
    for item in items or []:
        kind = str(item.get("ValueType", ""))
        name = ""
        seq = item.get("ConceptNameCodeSequence")
        if seq:
            name = str(seq[0].get("CodeMeaning", ""))
            code = str(seq[0].get("CodeValue", ""))
            if code in SECTION_CODES:
                name = SECTION_CODES[code]
        if kind == "TEXT":
            out.append(str(item.get("TextValue", "")))
        elif kind == "CONTAINER" and name:
            out.append(f"{name.upper()}:")
        _sr_text(item.get("ContentSequence"), out, name or section)


def from_text_sr(ds: Dataset) -> IncomingReport:
    """A Basic Text SR from the PACS as a report; ReportUnreadable when it is none."""
    if str(ds.get("SOPClassUID", "")) != BASIC_TEXT_SR:
        raise ReportUnreadable(f"SOP class {ds.get('SOPClassUID', '')} is not Basic Text SR")
    lines: list[str] = []
    _sr_text(ds.get("ContentSequence"), lines)
    text = "\n".join(x for x in lines if x.strip()).strip()
    if not text:
        raise ReportUnreadable("the Basic Text SR holds no TEXT content item")
    uid, acc = str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("AccessionNumber", "") or "")
    if not uid and not acc:
        raise ReportUnreadable("the SR has neither Study Instance UID nor Accession Number")
    complete = str(ds.get("CompletionFlag", "")).upper() == "COMPLETE"
    verified = str(ds.get("VerificationFlag", "")).upper() == "VERIFIED"
    return IncomingReport("sr", str(ds.SOPInstanceUID), uid, acc, "F" if complete and verified else "P", text)
