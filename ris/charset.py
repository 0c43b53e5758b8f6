"""The study's Specific Character Set (0008,0005) as HL7 v2 names it (MSH-18, table 0211), and its codec.

A RIS reads the message bytes by MSH-18, so the name and the encoding must agree. The DICOM term
of each value maps to the HL7 name of the same character set; a study with ISO 2022 code
extensions (several values, e.g. ``\\ISO 2022 IR 87``) repeats MSH-18, the first repetition the
default, and names the technique in MSH-20 ("ISO 2022-1994"). A set HL7 has no name for, or text
the study's set cannot hold (a Japanese draft for a Latin-1 study), goes as UTF-8 and says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

log = structlog.get_logger()

UTF8 = "UNICODE UTF-8"
ISO_2022 = "ISO 2022-1994"  # MSH-20 (table 0356) when MSH-18 repeats

# DICOM defined term (without the "ISO 2022 " / "ISO_IR " difference) -> HL7 table 0211 name.
_HL7_NAME = {
    "IR 6": "ASCII", "IR 100": "8859/1", "IR 101": "8859/2", "IR 109": "8859/3", "IR 110": "8859/4",
    "IR 144": "8859/5", "IR 127": "8859/6", "IR 126": "8859/7", "IR 138": "8859/8", "IR 148": "8859/9",
    "IR 203": "8859/15", "IR 13": "ISO IR14", "IR 87": "ISO IR87", "IR 159": "ISO IR159",
    "IR 149": "KS X 1001", "IR 192": UTF8, "GB18030": "GB 18030-2000",
}
# Python codec of a single-valued set.
_CODEC = {
    "ASCII": "ascii", "8859/1": "latin_1", "8859/2": "iso8859_2", "8859/3": "iso8859_3", "8859/4": "iso8859_4",
    "8859/5": "iso8859_5", "8859/6": "iso8859_6", "8859/7": "iso8859_7", "8859/8": "iso8859_8",
    "8859/9": "iso8859_9", "8859/15": "iso8859_15", "ISO IR14": "shift_jis", "KS X 1001": "euc_kr",
    UTF8: "utf-8", "GB 18030-2000": "gb18030",
}


@dataclass(frozen=True)
class Charset:
    """What MSH-18 and MSH-20 say, and the codec the message bytes are written in."""

    names: tuple[str, ...]  # MSH-18 repetitions
    codec: str
    scheme: str = ""  # MSH-20

    def encode(self, text: str) -> bytes:
        return text.encode(self.codec)

    def decode(self, data: bytes) -> str:
        return data.decode(self.codec)


UNICODE = Charset((UTF8,), "utf-8")


def _term(value: str) -> str:
    v = value.strip().upper()
    for prefix in ("ISO 2022 ", "ISO_IR ", "ISO-IR "):
        if v.startswith(prefix):
            return "IR " + v[len(prefix):].removeprefix("IR ").strip()
    return v


def from_dicom(specific_character_set: str | Sequence[str] | None) -> Charset | None:
    """The HL7 character set of a DICOM Specific Character Set; None: HL7 names none for it.

    Absent or empty: ASCII, as DICOM's default repertoire (ISO IR 6).
    """
    values = ([specific_character_set] if isinstance(specific_character_set, str)
              else list(specific_character_set or []))
    values = [str(v) for v in values]
    if not any(v.strip() for v in values):
        return Charset(("ASCII",), "ascii")
    if len(values) == 1:
        name = _HL7_NAME.get(_term(values[0]))
        return Charset((name,), _CODEC[name]) if name in _CODEC else None
    # ISO 2022 code extensions: the first value (empty = IR 6) is G0; the rest are switched to by escapes.
    terms = [_term(v) if v.strip() else "IR 6" for v in values]
    names = tuple("ISO IR6" if t == "IR 6" else _HL7_NAME.get(t, "") for t in terms)
    if "" in names:
        return None
    extra = set(terms[1:]) - {"IR 6"}
    if extra <= {"IR 87"}:
        codec = "iso2022_jp"
    elif extra <= {"IR 87", "IR 159"}:
        codec = "iso2022_jp_2"
    else:  # Korean, Latin and Cyrillic extensions etc.: no Python codec writes them as DICOM does
        return None
    return Charset(names, codec, ISO_2022)


def for_text(specific_character_set: str | Sequence[str] | None, text: str) -> Charset:
    """The study's character set when it holds ``text``, else UTF-8 (logged, without the text)."""
    charset = from_dicom(specific_character_set)
    if charset is None:
        log.warning("ris.charset_unmapped", specific_character_set=str(specific_character_set), sent_as=UTF8)
        return UNICODE
    try:
        charset.encode(text)
    except UnicodeEncodeError:
        log.warning("ris.charset_cannot_hold_text", charset=charset.names, sent_as=UTF8)
        return UNICODE
    return charset
