"""structlog JSON logs on stderr, for our code and for the libraries' standard logging alike.

Nothing here adds patient data; the modules that log pass only job ids, UIDs and states.
"""

from __future__ import annotations

import logging
import sys

import structlog


class _Stderr:
    """Whatever sys.stderr is at write time (it is swapped by test runners and daemonisers)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(level: str = "INFO") -> None:
    shared = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
              structlog.processors.TimeStamper(fmt="iso", utc=True)]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(_Stderr()),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(_Stderr())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processor=structlog.processors.JSONRenderer(), foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # pynetdicom logs whole DIMSE messages (patient identifiers included) at INFO/DEBUG.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    import pynetdicom._config as pconf
    pconf.LOG_REQUEST_IDENTIFIERS = False
    pconf.LOG_RESPONSE_IDENTIFIERS = False
