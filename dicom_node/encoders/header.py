"""What a result copies from its source header, checked value by value, and its character set.

Real headers are dirty: ages without a unit, ACR-NEMA dates, times with colons, names and
descriptions over their length, odd multi-values, UIDs padded with spaces or NULs, character
sets highdicom refuses. A result must still be valid, so nothing is copied blindly:

- `clean_header` builds a small dataset holding only the attributes the result encoders read
  (patient and study identity, the references to the source image, what the SC's acquisition
  equipment item and the SR's image library take), each one judged by its VR and VM and by its
  type in the result IODs (PS3.3): a lossless repair where one exists (padding stripped from UIDs,
  "1955.11.05" -> "19551105", "10:15:00" -> "101500", lower-case code strings upper-cased, a
  decimal string re-written in 16 characters); otherwise a Type 3 attribute is left out, a
  Type 2 is emptied, and a Type 1 that cannot be repaired raises `HeaderError` with the tag and
  what to do. Patient ID, Study Instance UID and Accession Number are what a PACS matches the
  result on: they are kept exactly as received (padding aside) even when invalid, since a
  "repaired" one would file the result in the wrong place; dciodvfy then names them.
- `set_character_set` gives each finished result a Specific Character Set that encodes every
  string in it. The rule (PS3.5 6.1, PS3.3 C.12.1.1.2): keep the source's character set when
  every text value of the result encodes in it and decodes back to the same string; otherwise use
  ISO_IR 192 (UTF-8), which holds any text, so the copied identity still decodes to exactly the
  source's strings (a Japanese draft in a Latin-1 study, a name highdicom's enumeration cannot
  express). The source's value is normalised first: an empty first value means the default
  repertoire with code extensions ("ISO 2022 IR 6"), which highdicom 0.28 does not accept as "".

Repairs are returned as `Repair` records naming the attribute and the reason, never the value
(values are patient data), so the caller can log them.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

from pydicom import Dataset
from pydicom.charset import convert_encodings, decode_bytes, encode_string, python_encoding
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import VALIDATORS, PersonName, format_number_as_ds

UTF8 = "ISO_IR 192"
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


class Kind(Enum):
    """How a result treats an attribute it copies (PS3.3 attribute types, plus the PACS keys)."""

    TYPE1 = "1"  # must hold a valid value: fails the job when it cannot be repaired
    TYPE2 = "2"  # present, empty when the source's value is invalid
    TYPE3 = "3"  # left out when the source's value is invalid
    MATCH = "match"  # a PACS matches results on it: kept as received, valid or not


# Every attribute a result encoder reads from its source (the SR and SC through highdicom, the
# Basic Text SR, our own SC and SR code). Types are those of the result IODs, not the source's.
COPIED: dict[str, Kind] = {
    # Patient module (Type 2 in every result IOD)
    "PatientName": Kind.TYPE2, "PatientID": Kind.MATCH, "PatientBirthDate": Kind.TYPE2, "PatientSex": Kind.TYPE2,
    # General Study module
    "StudyInstanceUID": Kind.MATCH, "StudyDate": Kind.TYPE2, "StudyTime": Kind.TYPE2,
    "ReferringPhysicianName": Kind.TYPE2, "StudyID": Kind.TYPE2, "AccessionNumber": Kind.MATCH,
    "StudyDescription": Kind.TYPE3,
    # References to the source image (evidence, source image and measurement group references)
    "SOPClassUID": Kind.TYPE1, "SOPInstanceUID": Kind.TYPE1, "SeriesInstanceUID": Kind.TYPE1,
    # What the SR's image library and the SC's orientation, laterality and body part take
    "Modality": Kind.TYPE3, "Rows": Kind.TYPE3, "Columns": Kind.TYPE3, "FrameOfReferenceUID": Kind.TYPE3,
    "PatientOrientation": Kind.TYPE3, "ImagerPixelSpacing": Kind.TYPE3, "ViewPosition": Kind.TYPE3,
    "Laterality": Kind.TYPE3, "ImageLaterality": Kind.TYPE3, "BodyPartExamined": Kind.TYPE3,
    # General Equipment, and the SC's "acquisition equipment" Contributing Equipment item
    "InstitutionName": Kind.TYPE3, "Manufacturer": Kind.TYPE3, "ManufacturerModelName": Kind.TYPE3,
    "SoftwareVersions": Kind.TYPE3, "DeviceSerialNumber": Kind.TYPE3, "InstitutionalDepartmentName": Kind.TYPE3,
    "InstitutionAddress": Kind.TYPE3, "StationName": Kind.TYPE3, "AcquisitionDateTime": Kind.TYPE3,
    "AcquisitionDate": Kind.TYPE3, "AcquisitionTime": Kind.TYPE3,
}
# Identity a result carries beyond what highdicom copies (both Type 3 in the result IODs).
EXTRA_IDENTITY = ("StudyDescription", "InstitutionName")
_ALLOWED = {"PatientSex": {"M", "F", "O"}}


class HeaderError(ValueError):
    """A Type 1 attribute the results need is missing or invalid in the source: no result can be made."""


@dataclass(frozen=True)
class Repair:
    keyword: str
    action: str  # "repaired" | "emptied" | "left out" | "kept invalid"
    why: str  # the rule broken, never the value

    def __str__(self) -> str:
        return f"{_tag(self.keyword)} {self.action}: {self.why}"


@dataclass(frozen=True)
class SourceHeader:
    dataset: Dataset  # what the encoders may read: every value valid, except kept MATCH values
    repairs: tuple[Repair, ...]
    character_set: str | list[str] | None  # the source's Specific Character Set, normalised


def clean_header(source: Dataset) -> SourceHeader:
    """The attributes results copy from `source`, each valid for its VR and VM or handled by its type.

    Raises
    ------
    HeaderError
        A Type 1 attribute (SOP Class, SOP Instance or Series Instance UID) is missing or invalid
        after repair, or the Study Instance UID is missing: the result could not reference its
        source or be placed in its study. The message names the tag and what to do.
    """
    out = Dataset()
    repairs: list[Repair] = []
    for keyword, kind in COPIED.items():
        present = keyword in source
        value = source.get(keyword) if present else None
        if kind is Kind.TYPE2 and not present:
            setattr(out, keyword, "")
            continue
        if not present or _empty(value):
            if kind is Kind.TYPE1 or keyword == "StudyInstanceUID":
                raise HeaderError(f"{_tag(keyword)} is empty or missing in the source: results cannot reference "
                                  "it; correct the image at the modality or PACS and send it again")
            if present and kind in (Kind.TYPE2, Kind.MATCH):
                setattr(out, keyword, "")
            continue
        vr = dictionary_VR(keyword)
        fixed, changed, problem = _check(keyword, vr, value)
        if problem is None:
            if changed:
                repairs.append(Repair(keyword, "repaired", "padding or format normalised"))
            setattr(out, keyword, fixed)
        elif kind is Kind.MATCH:
            repairs.append(Repair(keyword, "kept invalid", f"{problem}; the PACS matches on it"))
            setattr(out, keyword, _strip_uid(value) if vr == "UI" else value)
        elif kind is Kind.TYPE1:
            raise HeaderError(f"{_tag(keyword)} in the source: {problem}; results cannot reference it; correct "
                              "the image at the modality or PACS and send it again")
        elif kind is Kind.TYPE2:
            repairs.append(Repair(keyword, "emptied", problem))
            setattr(out, keyword, "")
        else:
            repairs.append(Repair(keyword, "left out", problem))
    return SourceHeader(out, tuple(repairs), normalise_character_set(source.get("SpecificCharacterSet")))


def carry_identity(result: Dataset, header: SourceHeader) -> None:
    """Copy the identity highdicom's constructors leave out (Study Description, Institution Name)."""
    for keyword in EXTRA_IDENTITY:
        if keyword in header.dataset:
            setattr(result, keyword, header.dataset[keyword].value)


def normalise_character_set(value: object) -> str | list[str] | None:
    """The source's Specific Character Set as defined terms, or None for the default repertoire.

    Padding and terms pydicom does not know are dropped; an empty first value of a code-extension
    set (the default repertoire, PS3.3 C.12.1.1.2) is kept as the source wrote it. A lone ISO_IR 13
    becomes ISO 2022 IR 13\\ISO 2022 IR 87, what Japanese sites declare for katakana with kanji."""
    if value is None or value == "":
        return None
    terms = [str(v).strip() for v in (value if isinstance(value, (list, MultiValue)) else [value])]
    lead = [""] if len(terms) > 1 and terms[0] in ("", "ISO 2022 IR 6") else []
    known = [t for t in terms if t in python_encoding and t not in ("", "ISO_IR 6", "ISO 2022 IR 6")]
    if lead:
        return [terms[0], *known] if known else None
    if not known:
        return None
    if known == ["ISO_IR 13"]:  # JIS X 0201 alone: the same katakana bytes with kanji added for a Japanese
        return ["ISO 2022 IR 13", "ISO 2022 IR 87"]  # draft (dciodvfy also rejects katakana under a lone ISO_IR 13)
    return known[0] if len(known) == 1 else known


def set_character_set(result: Dataset, preferred: str | list[str] | None) -> str | list[str] | None:
    """Give `result` the source's character set when every text value survives it, else UTF-8.

    Returns the value written to (0008,0005); None: the default repertoire, no attribute."""
    chosen = preferred if _survives(result, preferred) else UTF8
    if chosen is None:
        if "SpecificCharacterSet" in result:
            del result.SpecificCharacterSet
    else:
        result.SpecificCharacterSet = chosen
    return chosen


def text_values(ds: Dataset) -> Iterator[tuple[str, str]]:
    """(VR, value) of every text element in `ds` and its sequences, one per value."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from text_values(item)
        elif elem.VR in _TEXT_VRS and elem.value not in (None, ""):
            values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
            for v in values:
                yield elem.VR, str(v)


def _survives(ds: Dataset, charset: str | list[str] | None) -> bool:
    if charset is None:  # the default repertoire: ASCII (pydicom would decode Latin-1 leniently)
        return all(value.isascii() for _, value in text_values(ds))
    encodings = convert_encodings(charset)
    for vr, value in text_values(ds):
        try:
            if vr == "PN":
                back = str(PersonName(PersonName(value).encode(encodings), encodings))
            else:
                back = decode_bytes(encode_string(value, encodings), encodings, set())
        except (UnicodeError, ValueError, LookupError):
            return False
        if back != value:
            return False
    return True


# ---------------------------------------------------------------- one value

def _check(keyword: str, vr: str, value: object) -> tuple[object, bool, str | None]:
    """(the value to copy, whether a lossless repair changed it, None or why it is invalid)."""
    values = list(value) if isinstance(value, (list, MultiValue)) else [value]
    vm = dictionary_VM(keyword)
    if not _vm_ok(len(values), vm):
        return value, False, f"{len(values)} values where VM is {vm}"
    fixed = [_repair(vr, v) for v in values]
    for v in fixed:
        problem = _invalid(keyword, vr, v)
        if problem:
            return value, False, problem
    changed = any(str(a) != str(b) for a, b in zip(fixed, values))
    return (fixed if len(fixed) > 1 else fixed[0]), changed, None


def _repair(vr: str, v: Any) -> object:
    if vr == "DS" and len(str(v)) > 16:  # same number, written in at most 16 characters
        try:
            return format_number_as_ds(float(v))
        except ValueError:
            return v
    if vr == "PN":
        return str(v)  # re-encoded in the result's character set, not the source's bytes
    if not isinstance(v, str):
        return v
    if vr == "UI":
        return _strip_uid(v)
    if vr == "DA":
        m = re.fullmatch(r"\s*(\d{4})[.\-/](\d{2})[.\-/](\d{2})\s*", v)  # ACR-NEMA "1955.11.05", ISO "1955-11-05"
        return "".join(m.groups()) if m else v.strip()
    if vr == "TM":
        m = re.fullmatch(r"\s*(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?\s*", v)  # ACR-NEMA "10:15:00"
        return "".join(g for g in m.groups() if g) if m else v.strip()
    if vr == "CS":
        return v.strip().upper()
    return v


def _invalid(keyword: str, vr: str, v: object) -> str | None:
    if keyword in _ALLOWED and str(v) not in _ALLOWED[keyword]:
        return f"not one of {', '.join(sorted(_ALLOWED[keyword]))}"
    if vr == "DA" and isinstance(v, str):
        try:
            datetime.datetime.strptime(v, "%Y%m%d")
        except ValueError:
            return "not a calendar date in YYYYMMDD form"
    if vr == "TM" and isinstance(v, str) and not _valid_time(v):
        return "not a time in HHMMSS.FFFFFF form"
    if isinstance(v, str) and any(ord(c) < 0x20 and c not in "\t\n\f\r\x1b" for c in v):
        return "control characters"
    validator = VALIDATORS.get(vr)
    if validator is None or not isinstance(v, (str, PersonName)):
        return None
    ok, message = validator(vr, str(v))
    if ok:
        return None
    length = re.search(r"length \(\d+\) exceeds the maximum (allowed )?length of \d+", message)
    return length.group(0) if length else f"not a valid {vr}"


def _valid_time(v: str) -> bool:
    m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d{1,6})?", v)
    if not m or (m.group(4) and not m.group(3)):
        return False
    hh, mm, ss = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    return hh < 24 and mm < 60 and ss < 61  # 60: a leap second


def _vm_ok(n: int, vm: str) -> bool:
    if vm.endswith("-n"):
        low = int(vm.split("-")[0])
        return n >= low
    if "-" in vm:
        low, high = (int(x) for x in vm.split("-"))
        return low <= n <= high
    return n == int(vm)


def _empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, (list, MultiValue)):
        return all(_empty(v) for v in value)
    return str(value).strip(" \x00") == ""


def _strip_uid(v: object) -> str:
    return str(v).strip(" \x00")


def _tag(keyword: str) -> str:
    tag = Tag(cast(int, tag_for_keyword(keyword)))  # keywords here are the module's own, all known
    return f"({tag.group:04X},{tag.element:04X}) {keyword}"
