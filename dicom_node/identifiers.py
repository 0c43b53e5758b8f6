"""The header attributes that identify a patient, named once, and the redaction of their values.

Their values are redacted from failure reasons (:func:`describe`: the audit trail, the logs and
a RIS's answers carry reasons) and put back into a result at re-identification (dicom_node.deid).
"""

from __future__ import annotations

from collections.abc import Iterable

import pydicom
from pydicom.multival import MultiValue

MAX_MESSAGE = 400  # characters of the exception message kept in a reason

PATIENT_IDENTIFIERS: tuple[str, ...] = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs",
                                        "OtherPatientNames", "IssuerOfPatientID", "AccessionNumber")


def describe(exc: BaseException, redact: Iterable[str] = ()) -> str:
    """``"Type: message"`` on one line, at most MAX_MESSAGE characters of message, with every
    value in ``redact`` (the source's patient name, ID, birth date) replaced by ``***``: an
    exception message may quote a header value, and reasons go to the audit trail and the logs."""
    text = " ".join(str(exc).split())
    for value in sorted({v for v in redact if v and len(v) > 1}, key=len, reverse=True):
        text = text.replace(value, "***")
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def identifiers(ds) -> list[str]:
    """The patient identifiers of a dataset, as text, for :func:`describe` to redact (never raises)."""
    out: list[str] = []
    for kw in PATIENT_IDENTIFIERS:
        try:
            value = ds.get(kw, None) if ds is not None else None
        except Exception:  # noqa: BLE001 - a broken element must not hide the real error
            continue
        if value is None:
            continue
        values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        for v in values:
            s = str(v).strip()
            if s:
                out += [s, s.replace("^", " ").strip()]
                if kw == "PatientBirthDate" and len(s) == 8 and s.isdigit():
                    out.append(f"{s[:4]}-{s[4:6]}-{s[6:]}")
    return out


def identifiers_of(path) -> list[str]:
    """:func:`identifiers` of the file at ``path`` (header only); [] when it cannot be read."""
    try:
        return identifiers(pydicom.dcmread(path, stop_before_pixels=True, force=True))
    except Exception:  # noqa: BLE001 - unreadable: nothing to redact from it
        return []
