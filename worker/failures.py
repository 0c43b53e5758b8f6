"""Which failures of a pipeline step go away on their own, and how a failure is told.

The one rule every step (infer_jobs, deliver_job, the Celery tasks, the offline `infer`) uses:

- transient: the spool is full, the broker or another server is unreachable, the job store is
  busy, memory ran out. The job is given back (released) and the reconciler tries again.
- permanent: anything else, above all the exceptions a bug or a defect in the data raises
  (ValueError, KeyError, TypeError, AttributeError, pydicom's and highdicom's errors, a file
  that is missing or unreadable). Trying again gives the same error, so the job ends at once in
  JobState.FAILED with the reason; ``medsam2-cxr resend`` brings it back after a fix.

A destination that is down is neither: the sender retries it and dead-letters the results
(dicom_node.sender.DeliveryFailed), which stays as it was.
"""

from __future__ import annotations

import errno
import sqlite3
import sys
from collections.abc import Iterable
from concurrent.futures import BrokenExecutor

import pydicom
from pydicom.multival import MultiValue

from dicom_node.spool import OutOfSpace

# OSErrors whose errno says "later": out of space or quota, interrupted, busy, out of memory.
_TRANSIENT_ERRNO = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ENOMEM})
MAX_MESSAGE = 400  # characters of the exception message kept in a reason


def _transient_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OutOfSpace, ConnectionError, TimeoutError,
                                        sqlite3.OperationalError,  # "database is locked"
                                        BrokenExecutor]  # a decode process was killed (not the image's doing)
    try:
        from kombu.exceptions import OperationalError  # the broker is unreachable

        types.append(OperationalError)
    except ImportError:  # pragma: no cover - kombu comes with celery
        pass
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeout

        types += [RedisConnectionError, RedisTimeout]
    except ImportError:  # pragma: no cover - only with a Redis broker
        pass
    return tuple(types)


_TRANSIENT: tuple[type[BaseException], ...] | None = None


def is_transient(exc: BaseException) -> bool:
    """True when trying the same step again later may succeed (see the module docstring)."""
    global _TRANSIENT
    if _TRANSIENT is None:
        _TRANSIENT = _transient_types()
    if isinstance(exc, _TRANSIENT):
        return True
    torch = sys.modules.get("torch")  # only a process that imported torch can raise its errors
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):  # GPU memory: a smaller batch or a later try may fit
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO


def is_permanent(exc: BaseException) -> bool:
    return not is_transient(exc)


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


PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames",
                    "IssuerOfPatientID", "AccessionNumber")


def identifiers(ds) -> list[str]:
    """The patient identifiers of a dataset, as text, for :func:`describe` to redact (never raises)."""
    out: list[str] = []
    for kw in PATIENT_KEYWORDS:
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
