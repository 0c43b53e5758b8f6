"""Which failures of a pipeline step go away on their own (how a reason is told: dicom_node.identifiers).

The one rule every step (infer_jobs, deliver_job, the Celery tasks, the offline `infer`) uses:

- transient: the spool is full, the broker or another server is unreachable, the job store is
  busy or unavailable (dicom_node.database.StoreUnavailable, a ConnectionError), memory ran out.
  The job is given back (released) and the reconciler tries again.
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
from concurrent.futures import BrokenExecutor

from dicom_node.spool import OutOfSpace

# OSErrors whose errno says "later": out of space or quota, interrupted, busy, out of memory.
_TRANSIENT_ERRNO = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ENOMEM})


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
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeout

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
