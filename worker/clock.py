"""The node's one wall clock: UTC datetimes for what results say, epoch seconds for what is stored.

One :class:`Clock` is made where the node is composed (worker/node.py) and handed to the pipeline
(``Context.clock``), the job store and the audit log (``clock.time``), so every timestamp a job
gets comes from the same place, and a test moves time for all of them at once with a
:class:`ManualClock`. Durations are measured with ``time.perf_counter`` (monotonic), not here.
"""

from __future__ import annotations

import datetime as dt
import time


class Clock:
    """The system's clock, in UTC."""

    def time(self) -> float:
        """Seconds since the epoch (what the job store and the audit log record)."""
        return time.time()

    def now(self) -> dt.datetime:
        """The same instant as an aware UTC datetime (what the result objects carry)."""
        return dt.datetime.now(dt.UTC)


class ManualClock(Clock):
    """A clock that moves only when told (tests, reproducible runs): ``t`` is its epoch seconds."""

    def __init__(self, at: dt.datetime | float) -> None:
        self.t = at.timestamp() if isinstance(at, dt.datetime) else float(at)

    def time(self) -> float:
        return self.t

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.t, dt.UTC)

    def advance(self, seconds: float) -> None:
        self.t += seconds


SYSTEM = Clock()
