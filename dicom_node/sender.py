"""The SCU that delivers result objects to the PACS, with retry and exponential backoff.

With ``Destination.tls`` (an ``ssl.SSLContext`` from :func:`dicom_node.tls.client_context`) the
association runs over DICOM TLS and the PACS certificate is verified before anything is sent.

Every kind of destination is a :class:`ResultDestination`: this module's :class:`Destination`
(DIMSE C-STORE) and :class:`dicom_node.dicomweb.WebDestination` (STOW-RS). :func:`send_with_retry`
retries either the same way; :func:`dicom_node.destinations.open_destination` makes one from settings.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import pydicom
import structlog
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from dicom_node import metrics

log = structlog.get_logger(__name__)

MAX_CONTEXTS = 128  # PS3.8: at most 128 presentation contexts in one association
# send_c_store(path) streams the file in PDU-sized reads instead of decoding it and encoding it again
# once dicom_node.config.configure() has set pynetdicom's STORE_SEND_CHUNKED_DATASET.


class Priority(IntEnum):
    """C-STORE-RQ Priority (0000,0700), PS3.7 9.1.1.1."""

    MEDIUM = 0
    HIGH = 1
    LOW = 2


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    # Of every C-STORE of one delivery: HIGH for an urgent study's results (worker.pipeline.deliver_job).
    # How to send, not where: not part of the destination's identity.
    priority: Priority = field(default=Priority.MEDIUM, compare=False)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls is not None else "")

    def store(self, files: list[Path], calling_ae: str = "MEDSAM2CXR", timeout: float = 30) -> None:
        send(files, self, calling_ae=calling_ae, timeout=timeout)

    def probe(self, calling_ae: str = "MEDSAM2CXR", timeout: float = 2.0) -> str | None:
        return echo(self, calling_ae=calling_ae, timeout=timeout)


class ResultDestination(Protocol):
    """Where results go. ``ae_title``, ``host`` and ``port`` name it (metrics label, pauses, audit)."""

    @property
    def ae_title(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    def store(self, files: list[Path], calling_ae: str = ..., timeout: float = ...) -> None:
        """Store every file; raise :class:`DeliveryFailed` unless the destination confirmed each."""

    def probe(self, calling_ae: str = ..., timeout: float = ...) -> str | None:
        """None when the destination answers now (C-ECHO, an HTTP request), else why not."""


class DeliveryFailed(Exception):
    """The destination refused the association or did not store a file."""


def _header(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.SOPClassUID)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "") or ExplicitVRLittleEndian)
    return sop_class, ts


def _uncompressed(path: Path) -> pydicom.Dataset:
    """The file for a peer that accepted none of its syntaxes: decompressed when it is compressed
    (pynetdicom converts only between the uncompressed syntaxes). The SOP Instance UID stays: the
    results' syntaxes are lossless (PS3.5 8.2), and the audit, the RIS and the KOS name that UID
    (pydicom 3's decompress makes a new one unless told not to)."""
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    return ds


def send(
    files: list[Path],
    dest: Destination,
    calling_ae: str = "MEDSAM2CXR",
    timeout: float = 30,
) -> None:
    """C-STORE every file to ``dest`` over one association.

    Each file's SOP class is proposed with its own transfer syntax plus explicit and implicit
    VR little endian. Warning statuses (0xB000, 0xB006, 0xB007) count as stored.

    Raises
    ------
    DeliveryFailed
        The association was refused or failed, a file could not be read or sent, or the
        destination answered a failure status (or none).
    """
    files = [Path(f) for f in files]
    if not files:
        return
    contexts: dict[str, set[str]] = {}
    headers: dict[Path, tuple[str, str]] = {}
    for f in files:
        try:
            headers[f] = sop_class, ts = _header(f)
        except Exception as exc:  # noqa: BLE001
            raise DeliveryFailed(f"{dest}: cannot read {f.name}: {exc}") from exc
        contexts.setdefault(sop_class, set()).add(ts)

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    n = 0
    for sop_class, syntaxes in contexts.items():
        # One context per syntax the files are stored in (a peer may accept one and not another;
        # an exact match is streamed from the file as it is), and one with the uncompressed
        # syntaxes pynetdicom can convert between, for a peer that accepts none of those.
        for ts in sorted(syntaxes):
            ae.add_requested_context(sop_class, [ts])
            n += 1
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        n += 1
        if n > MAX_CONTEXTS:
            raise DeliveryFailed(f"{dest}: more than {MAX_CONTEXTS} presentation contexts needed")

    tls_args = (dest.tls, dest.host) if dest.tls is not None else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        how = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise DeliveryFailed(f"{dest}: association {how}")
    exact = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    try:
        for f in files:
            try:
                # Streamed from the file in its own syntax when the peer accepted it, else read and
                # converted: a 10 MB SC re-encoded in Python cost more than its transfer.
                rsp = assoc.send_c_store(f if headers[f] in exact else _uncompressed(f), priority=int(dest.priority))
            except Exception as exc:  # noqa: BLE001 - e.g. no accepted context for this syntax
                raise DeliveryFailed(f"{dest}: {f.name} not sent: {exc}") from exc
            status = getattr(rsp, "Status", None)
            if status is None:
                raise DeliveryFailed(f"{dest}: {f.name}: no response (timeout or abort)")
            category = code_to_category(status)
            if category not in (STATUS_SUCCESS, STATUS_WARNING):
                raise DeliveryFailed(f"{dest}: {f.name}: status 0x{status:04X} ({category})")
            if category == STATUS_WARNING:
                log.warning("stored with warning", destination=str(dest), file=f.name,
                            status=f"0x{status:04X}")
    finally:
        if assoc.is_established:
            assoc.release()


def echo(dest: Destination, calling_ae: str = "MEDSAM2CXR", timeout: float = 2.0) -> str | None:
    """C-ECHO ``dest`` with a short timeout: None when it answered success, else why not (for
    `medsam2-cxr status`: a destination nobody listens on is the first thing a new node meets)."""
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import from a table

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(Verification)
    tls_args = (dest.tls, dest.host) if dest.tls is not None else None
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except Exception as exc:  # noqa: BLE001 - e.g. a TLS context that cannot connect
        return f"cannot connect: {type(exc).__name__}: {exc}"
    if not assoc.is_established:
        how = ("association rejected" if assoc.is_rejected else "association aborted" if assoc.is_aborted
               else f"no DICOM peer answered within {timeout:g} s (connection refused or timed out)")
        return how
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    status = getattr(rsp, "Status", None)
    if status is None:
        return f"no C-ECHO response within {timeout:g} s"
    return None if status == 0 else f"C-ECHO status 0x{status:04X}"


def retry_window_s(attempts: int, backoff_s: float, max_backoff_s: float, timeout: float,
                   files: int = 3, margin_s: float = 30.0) -> float:
    """The longest :func:`send_with_retry` can take: every attempt timing out on the association
    and each file, plus every backoff, plus a margin.

    A job's SENDING claim must last longer than this, or the reconciler hands the job to a second
    sender while the first is still retrying and the PACS receives the results twice.
    """
    waits = sum(min(backoff_s * 2 ** (a - 1), max_backoff_s) for a in range(1, attempts))
    return attempts * timeout * (files + 1) + waits + margin_s


def send_with_retry(
    files: list[Path],
    dest: ResultDestination,
    attempts: int = 5,
    backoff_s: float = 2.0,
    max_backoff_s: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
    **kw,
) -> None:
    """``dest.store`` (:func:`send` for DIMSE), retried with exponential backoff (backoff_s, 2x,
    4x, ... capped).

    Raises
    ------
    DeliveryFailed
        The last attempt's failure, after ``attempts`` tries.
    """
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(1, attempts + 1):
        try:
            dest.store(files, **kw)
            return
        except DeliveryFailed as exc:
            metrics.SEND_ATTEMPTS_FAILED.labels(destination=metrics.destination_label(dest)).inc()
            if attempt == attempts:
                log.error("delivery failed, giving up", destination=str(dest), attempt=attempt,
                          error=str(exc))
                raise
            delay = min(backoff_s * 2 ** (attempt - 1), max_backoff_s)
            log.warning("delivery failed, will retry", destination=str(dest), attempt=attempt,
                        delay_s=delay, error=str(exc))
            sleep(delay)
