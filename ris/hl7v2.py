"""HL7 v2.5.1 ORU^R01 for one study's results, built and checked with hl7apy against the 2.5.1 structure.

Segments: MSH (MSH-10 derived from the study, the same for every target, so a retransmission
carries the same control id and the RIS can drop it; MSH-18 the study's character set), PID (the DICOM patient module), ORC and
OBR (accession number as filler order number and OBR-18, placer order number when the study has
one, result status P: a draft nobody has verified), NTE (the notices every result carries), TQ1
(priority S stat for an urgent study, R routine; also OBR-27.6), OBX: the Study Instance UID,
then per finding (the study's: the image that shows it most, ris.content.study_findings) a group
sharing its sub-ID: presence coded (CWE, the finding's code from dicom_node/codes.py as OBX-3),
probability (NM, the decision threshold as reference range), confidence tier (CWE), operating
point (ST) and the source image's SOP Instance UID (ST); per image the out-of-distribution verdict,
score and SOP Instance UID; and the draft report as TX lines (Findings, Impressions, Comment).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import textwrap

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message, Segment
from hl7apy.exceptions import HL7apyException
from hl7apy.parser import parse_message
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from dicom_node import codes
from ris.charset import Charset, for_text
from ris.content import NameGroup, ReportContent

VERSION = "2.5.1"
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
OPERATING_POINT = Code("OPPOINT", codes.PRIVATE_SCHEME, "Operating point")
FINDINGS = dcm_codes.LN.Findings  # LN 59776-5
IMPRESSIONS = dcm_codes.LN.Impressions  # LN 19005-8
_PRIORITY = {True: ("S", "Stat"), False: ("R", "Routine")}  # HL7 table 0485
_LANGUAGE = {"en": "English", "ja": "Japanese"}
TX_LINE = 199  # characters of one TX line (OBX-5)


class MessageInvalid(ValueError):
    """The message built does not conform to the HL7 v2.5.1 ORU^R01 structure (a bug here, not the RIS's)."""


def control_id(key: str) -> str:
    """MSH-10 of a study's ORU (``key``: ReportContent.key, the Study Instance UID): the same for
    every attempt, resend and target (at most 20 characters, ST)."""
    return hashlib.sha256(f"medsam2-cxr/oru/study/{key}".encode()).hexdigest()[:20].upper()


def escape(value: object) -> str:
    """A value as HL7 text: the delimiters |^~\\& as escape sequences (2.7.4), line breaks as spaces."""
    s = str(value)
    s = s.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\").replace("&", "\\T\\")
    return " ".join(s.replace("~", "\\R\\").split())


def text_lines(text: str, width: int = TX_LINE) -> list[str]:
    """Text as escaped TX lines of at most ``width`` characters each, one OBX each: hl7apy's strict
    validation reads a varies OBX-5 as ST (199), and a RIS shows one OBX per line."""
    out = []
    for paragraph in text.splitlines():
        chunk = width
        while True:
            lines = [escape(line) for line in textwrap.wrap(paragraph, chunk)]
            if all(len(line) <= width for line in lines) or chunk < 20:
                break
            chunk -= 20  # escape sequences made a line longer
        out += lines
    return out


def _code(code: Code) -> str:
    """A coded concept as CWE/CE: identifier^text^coding system (DICOM designators are HL7's: SCT, DCM, LN, UCUM,
    and the local 99MSCXR)."""
    return "^".join(escape(v) for v in (code.value, code.meaning, code.scheme_designator))


def _ts(t: dt.datetime) -> str:
    t = t.astimezone(dt.UTC)
    return t.strftime("%Y%m%d%H%M%S") + "+0000"


def _xpn(g: NameGroup) -> str:
    # XPN: family ^ given ^ second given ^ suffix ^ prefix ^ degree ^ name type (L legal) ^ representation
    return "^".join([escape(g.family), escape(g.given), escape(g.middle), escape(g.suffix), escape(g.prefix), "",
                     "L", g.representation])


def _set(seg: Segment, name: str, value: str | list[str]) -> None:
    values = [value] if isinstance(value, str) else value
    for v in values:
        if v:
            seg.add_field(name).value = v


def build(content: ReportContent, *, control: str, sending_application: str, sending_facility: str = "",
          receiving_application: str = "", receiving_facility: str = "", processing_id: str = "P",
          sent_at: dt.datetime | None = None) -> tuple[str, Charset]:
    """The ORU^R01 of ``content`` as ER7 text (segments ended by CR) and the character set its bytes use.

    Raises MessageInvalid when hl7apy's strict 2.5.1 validation finds the message wrong.
    """
    issued = content.issued
    sent_at = sent_at or issued
    msg = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    msh = msg.msh
    msh.msh_3 = escape(sending_application)
    _set(msh, "MSH_4", escape(sending_facility))
    _set(msh, "MSH_5", escape(receiving_application))
    _set(msh, "MSH_6", escape(receiving_facility))
    msh.msh_7 = _ts(sent_at)
    msh.msh_9 = "ORU^R01^ORU_R01"
    msh.msh_10 = control
    msh.msh_11 = escape(processing_id)
    msh.msh_12 = VERSION
    msh.msh_15 = "NE"  # accept ack: never (original mode: the application ACK is the answer)
    msh.msh_16 = "AL"  # application ack: always

    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    pid = result.add_group("ORU_R01_PATIENT").pid
    p = content.patient
    pid.pid_1 = "1"
    assigner = escape(p.issuer)
    pid.pid_3 = f"{escape(p.id)}^^^{assigner}^PI" if assigner else f"{escape(p.id)}^^^^PI"
    _set(pid, "PID_5", [_xpn(g) for g in p.names] or ['""'])  # "" is HL7's explicit null: the name is unknown
    _set(pid, "PID_7", p.birth_date)
    _set(pid, "PID_8", p.sex)

    s = content.study
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    placer, filler = escape(s.placer_order), escape(s.filler_order or s.accession)
    orc = order.orc
    orc.orc_1 = "RE"  # observations to follow
    _set(orc, "ORC_2", placer)
    _set(orc, "ORC_3", filler)
    orc.orc_5 = "CM"
    orc.orc_9 = _ts(issued)
    obr = order.obr
    obr.obr_1 = "1"
    _set(obr, "OBR_2", placer)
    _set(obr, "OBR_3", filler)
    obr.obr_4 = _code(s.procedure or codes.PLAIN_CHEST_XRAY)
    if s.date:
        _set(obr, "OBR_7", (s.date + s.time.split(".")[0])[:14])
    _set(obr, "OBR_18", escape(s.accession))
    _set(obr, "OBR_19", escape(s.requested_procedure_id))
    obr.obr_22 = _ts(issued)
    obr.obr_24 = "RAD"
    obr.obr_25 = "P"  # preliminary: a draft for a radiologist to correct
    priority, priority_text = _PRIORITY[bool(content.urgent)]
    obr.obr_27 = f"^^^^^{priority}"  # TQ.6 priority, for receivers that read 2.4-style timing
    for i, line in enumerate(content.notices, 1):
        nte = order.add_segment("NTE")
        nte.nte_1 = str(i)
        nte.nte_2 = "O"  # source: other system
        nte.nte_3 = escape(line)
    tq1 = order.add_group("ORU_R01_TIMING_QTY").tq1
    tq1.tq1_1 = "1"
    tq1.tq1_9 = f"{priority}^{priority_text}^HL70485"

    n = 0

    def obx(kind: str, code: Code, value: str, sub: str = "", units: str = "", reference: str = "",
            flag: str = "", method: str = "") -> None:
        nonlocal n
        n += 1
        seg = order.add_group("ORU_R01_OBSERVATION").obx
        seg.obx_1 = str(n)
        seg.obx_2 = kind
        seg.obx_3 = _code(code)
        _set(seg, "OBX_4", sub)
        seg.obx_5 = value if value else '""'
        _set(seg, "OBX_6", units)
        _set(seg, "OBX_7", reference)
        _set(seg, "OBX_8", flag)
        seg.obx_11 = "P"
        _set(seg, "OBX_17", method)
        seg.obx_19 = _ts(issued)

    obx("ST", STUDY_INSTANCE_UID, escape(s.instance_uid))
    units = _code(codes.UNITLESS)
    algorithm = _code(codes.PROCESSING_ALGORITHM)
    k = 0
    for k, sf in enumerate(content.findings, 1):
        f, sub = sf.finding, str(k)
        finding = codes.LABEL_CODES[f.label]
        flag = ("A" if f.label != "No Finding" else "N") if f.present else "N"
        obx("CWE", finding, _code(codes.PRESENT if f.present else codes.ABSENT), sub, flag=flag, method=algorithm)
        obx("NM", codes.PROBABILITY, f"{f.probability:.4f}", sub, units=units, reference=f">={f.threshold:.4f}")
        obx("CWE", codes.CERTAINTY, _code(codes.TIER_CODES[f.tier]), sub)
        if f.operating_point:
            obx("ST", OPERATING_POINT, escape(f.operating_point), sub)
        obx("ST", codes.SOURCE_IMAGE, escape(content.images[sf.image].sop_instance_uid), sub)
    for j, image in enumerate(content.images, k + 1):
        pred, sub = image.prediction, str(j)
        obx("CWE", codes.OUTSIDE_EXPERIENCE, _code(codes.YES if pred.out_of_distribution else codes.NO), sub,
            flag="A" if pred.out_of_distribution else "N")
        obx("NM", codes.OOD_SCORE, f"{pred.ood_score:.4f}", sub, units=units, reference=f"<={pred.ood_threshold:.4f}")
        obx("ST", codes.SOURCE_IMAGE, escape(image.sop_instance_uid), sub)
    for code, text in ((FINDINGS, content.draft.findings), (IMPRESSIONS, content.draft.impression),
                       (codes.COMMENT, "\n".join(content.draft.notes))):
        for line in text_lines(text):
            obx("TX", code, line)

    er7 = msg.to_er7()
    charset = for_text(content.study.specific_character_set, er7)
    for name in charset.names:
        msh.add_field("MSH_18").value = name
    if charset.scheme:
        msh.msh_20 = charset.scheme
    if content.language in _LANGUAGE:
        msh.msh_19 = f"{content.language}^{_LANGUAGE[content.language]}^ISO639"
    try:
        msg.validate()
    except HL7apyException as exc:
        raise MessageInvalid(f"ORU^R01 for jobs {', '.join(content.job_ids)} is not valid HL7 {VERSION}: {exc}") from exc
    return msg.to_er7() + "\r", charset


def validate(er7: str) -> Message:
    """Parse ER7 text and check it against the 2.5.1 ORU^R01 structure (hl7apy, strict); the message, or MessageInvalid."""
    try:
        msg = parse_message(er7.strip("\r\n").replace("\n", "\r"), validation_level=VALIDATION_LEVEL.STRICT,
                            find_groups=True)
        msg.validate()
    except HL7apyException as exc:
        raise MessageInvalid(f"not a valid HL7 {VERSION} message: {exc}") from exc
    return msg
