"""Every process-wide switch of pynetdicom and pydicom this node depends on, set in one call.

Nothing is changed at import time: each entry point (the `medsam2-cxr` command, the decode
processes a GPU worker spawns, tests/conftest.py) calls :func:`configure` once before it
receives, sends or decodes. What it sets, and why:

- pynetdicom ``LOG_REQUEST_IDENTIFIERS`` / ``LOG_RESPONSE_IDENTIFIERS`` off, and its logger at
  WARNING: it would log whole DIMSE identifiers (patient data) at INFO/DEBUG.
- pynetdicom ``STORE_RECV_CHUNKED_DATASET``: the listener receives each instance straight into a
  file, never into memory (dicom_node.listener needs ``event.dataset_path``).
- pynetdicom ``STORE_SEND_CHUNKED_DATASET``: ``send_c_store(path)`` streams the file in PDU-sized
  reads instead of decoding it and encoding it again (dicom_node.sender).
- pydicom's logger at WARNING, not propagated, feeding dicom_node.inspect.READ_WARNINGS, and its
  UserWarnings ignored: they may quote element values, and inspection reads what it needs from
  them per thread.
- pydicom's JPEG 2000 decoders try openjpeg (pylibjpeg) before gdcm: faster here and exact
  (`medsam2-cxr bench decode`); gdcm stays the fallback.

:func:`configure` is idempotent. :func:`require_configured` is for code that cannot work without
it (the listener) and names the missing switch.
"""

from __future__ import annotations

import logging
import warnings

from pynetdicom import _config as pynetdicom_config

from dicom_node.inspect import READ_WARNINGS


class NotConfigured(RuntimeError):
    """A part of the node started before dicom_node.config.configure() was called."""


def configure() -> None:
    """Set every pynetdicom and pydicom switch listed in the module docstring (idempotent)."""
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.setLevel(logging.WARNING)
    pydicom_log.propagate = False
    if READ_WARNINGS not in pydicom_log.handlers:
        pydicom_log.addHandler(READ_WARNINGS)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")
    _prefer_openjpeg_for_jpeg2000()


def _prefer_openjpeg_for_jpeg2000() -> None:
    from pydicom.pixels.decoders import JPEG2000Decoder, JPEG2000LosslessDecoder

    for decoder in (JPEG2000LosslessDecoder, JPEG2000Decoder):
        if "gdcm" in decoder.available_plugins and "pylibjpeg" in decoder.available_plugins:
            decoder.remove_plugin("gdcm")
            decoder.add_plugin("gdcm", ("pydicom.pixels.decoders.gdcm", "_decode_frame"))


def require_configured() -> None:
    """Raise NotConfigured naming the first switch the listener needs that is not set.

    Raises
    ------
    NotConfigured
        configure() was not called in this process (or a switch was changed back since).
    """
    wanted = {"STORE_RECV_CHUNKED_DATASET": True, "LOG_REQUEST_IDENTIFIERS": False,
              "LOG_RESPONSE_IDENTIFIERS": False}
    for name, value in wanted.items():
        if getattr(pynetdicom_config, name) is not value:
            raise NotConfigured(f"pynetdicom._config.{name} is not {value}: call dicom_node.config.configure() "
                                "once at the start of the process (the medsam2-cxr command and tests/conftest.py do)")
    if READ_WARNINGS not in logging.getLogger("pydicom").handlers:
        raise NotConfigured("pydicom's warnings are not collected for inspection: call "
                            "dicom_node.config.configure() once at the start of the process")
