"""structlog JSON logs on stderr, for our code and for the libraries' standard logging alike.

Nothing here adds patient data; the modules that log pass only job ids, UIDs and states.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO, cast

import structlog


class _Stderr:
    """Whatever sys.stderr is at write time (it is swapped by test runners and daemonisers)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "INFO") -> None:
    shared: list[Any] = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
              structlog.processors.TimeStamper(fmt="iso", utc=True)]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(cast(TextIO, _Stderr())),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(_Stderr())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.JSONRenderer(), foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # pynetdicom's and pydicom's own switches (no identifiers in their logs) are set by
    # dicom_node.config.configure(), which the command calls once at start.
