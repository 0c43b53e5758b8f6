"""The DICOM SCP: receive -> persist -> record -> enqueue, and answer the modality.

pynetdicom receives each instance straight into a temporary file (chunked receive), which the
C-STORE handler makes durable in the spool (a hard link, fsync, rename) before anything else, so everything that can
fail afterwards (parsing, classification, the job table, the broker) either is recovered from
the spool (the reconciler re-enqueues QUEUED jobs) or is reported to the sender as a failure
with nothing left behind. Pixel data are never decoded here, nor even read into memory: the
listener's memory does not grow with image size.

Before the handler sees anything, :mod:`dicom_node.pdu_guard` checks the peer address, does the
TLS handshake (:mod:`dicom_node.tls`), waits (a few seconds at most) for the whole association
request before a connection takes a slot, caps the slots and unfinished requests per address, and
caps every PDU's declared length. Inside the handler
the whole header is parsed (every element, so a lying length or a broken sequence is found here,
not in a worker) and the pixel data element is checked against Rows x Columns and a pixel limit,
without decoding it. A deflated data set is inflated in bounded pieces first (pydicom would
inflate it whole into memory): one that inflates past the limit the pixel limit implies is
refused before anything is written. Whatever fails lands in the quarantine with its reason and
gets 0xC000 with that reason as its Error Comment.

No patient identifiers are logged: pynetdicom's identifier logging is turned off and our own
log lines and audit records carry only UIDs, AE titles, job ids and reasons.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import ssl
import tempfile
import threading
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import pydicom
import structlog
from pynetdicom import AE, _config, evt
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    UID,
)

from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.filters import classify
from dicom_node.jobstore import JobState, JobStore
from dicom_node.lookup import keyed_hash, spool_secret
from dicom_node.pdu_guard import Guard, GuardedServer, parse_networks
from dicom_node.spool import OutOfSpace, Spool

log = structlog.get_logger(__name__)


def _status(table: dict, code: int) -> int:
    """A status code checked against pynetdicom's table, so a typo fails at import."""
    if code not in table:
        raise KeyError(f"0x{code:04X} is not a status of this service")
    return code


# C-STORE statuses (PS3.4 B.2.3, PS3.7 C), named after pynetdicom.status.
SUCCESS = _status(GENERAL_STATUS, 0x0000)
OUT_OF_RESOURCES = _status(STORAGE_SERVICE_CLASS_STATUS, 0xA700)  # "Refused: Out of Resources"
CANNOT_UNDERSTAND = _status(STORAGE_SERVICE_CLASS_STATUS, 0xC000)  # "Cannot Understand"
PROCESSING_FAILURE = _status(GENERAL_STATUS, 0x0110)  # "Processing Failure"

IMAGE_STORAGE = (
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)
# Stored and skipped, so a PACS routing a whole study back (with our results) does not fail.
STORED_AND_SKIPPED = (
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
)
TRANSFER_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,  # .4.50
    JPEGLossless,  # .4.57
    JPEGLosslessSV1,  # .4.70
    JPEGLSLossless,  # .4.80
    JPEG2000Lossless,  # .4.90
    JPEG2000,  # .4.91
)
VERIFICATION = "1.2.840.10008.1.1"


MAX_PIXELS = 8192 * 8192  # the same limit models.preprocess.read_image applies before decoding
# Values larger than this stay on disk while the header is checked (pixel data, big private blobs).
DEFER_BYTES = 256 * 1024
PIXEL_DATA = 0x7FE00010
UNCOMPRESSED = {str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian), str(DeflatedExplicitVRLittleEndian),
                "1.2.840.10008.1.2.2"}
# A deflated data set (PS3.5 A.5) is inflated in pieces with this much output at a time, and at
# most to inflate_limit(max_pixels): the largest pixel data the pixel limit lets through, at up to
# MAX_BYTES_PER_PIXEL (32-bit or RGBA samples), plus room for the header. pydicom would inflate
# the whole of it into memory first: a few MB of zeros can say gigabytes.
INFLATE_PIECE = 1 << 20
MAX_BYTES_PER_PIXEL = 4
INFLATE_HEADER_BYTES = 16 * 2**20


def inflate_limit(max_pixels: int) -> int:
    """The most bytes a deflated data set may inflate to under a pixel limit of ``max_pixels``."""
    return max_pixels * MAX_BYTES_PER_PIXEL + INFLATE_HEADER_BYTES


class InflateRefused(ValueError):
    """A deflated data set inflates past its limit, or its deflate stream is broken; the message
    is the quarantine reason (it names the limit, never a value)."""


# Elements the filter and the worker's decoder read: a wrong VR here makes their values the wrong type.
CRITICAL_ELEMENTS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Rows", "Columns", "BitsAllocated",
                     "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel", "NumberOfFrames",
                     "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "RescaleType",
                     "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence", "ModalityLUTSequence",
                     "Modality", "BodyPartExamined", "ViewPosition")


@dataclass(frozen=True)
class ListenerConfig:
    """The listener's settings.

    ``maximum_pdu_size`` is the Maximum Length Received we advertise (0: as large as the guard
    allows); ``max_pdu_length`` is the guard's cap on any PDU's declared length, so it must be at
    least as large. ``allowed_addresses`` are IP addresses or networks (empty: any).
    ``association_request_timeout`` is how long a connection may take to deliver its whole
    A-ASSOCIATE-RQ before it is dropped (until then it holds no association slot);
    ``max_associations_per_address`` caps the slots one peer address holds (0: no cap) and
    ``max_pending_per_address`` the connections from one address still sending their request
    (one more evicts the oldest; 0: no cap), ``max_pending`` those from all addresses together.
    See :mod:`dicom_node.pdu_guard`.
    """

    ae_title: str = "MEDSAM2CXR"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()  # empty: any
    allowed_addresses: tuple[str, ...] = ()  # empty: any
    max_associations: int = 16
    max_associations_per_address: int = 8
    max_pending_per_address: int = 16
    max_pending: int = 256
    association_request_timeout: float = 5.0
    maximum_pdu_size: int = 262144
    max_pdu_length: int = 4 * 2**20
    network_timeout: float = 60.0
    tls: ssl.SSLContext | None = None
    max_pixels: int = MAX_PIXELS
    own_manufacturer: str = "medsam2-cxr"
    # Site secret of the job table's keyed hashes of Accession Number and Patient ID
    # (dicom_node.lookup); empty: the key the node made in <spool>/secrets/lookup.key.
    lookup_key: bytes = field(default=b"", repr=False)

    def advertised_pdu_size(self) -> int:
        if self.maximum_pdu_size and self.maximum_pdu_size > self.max_pdu_length:
            raise ValueError(f"maximum_pdu_size {self.maximum_pdu_size} exceeds max_pdu_length "
                             f"{self.max_pdu_length}: peers would send PDUs the guard refuses")
        return self.maximum_pdu_size or self.max_pdu_length


@dataclass(frozen=True)
class _Deps:
    cfg: ListenerConfig
    spool: Spool
    jobs: JobStore
    audit: AuditLog
    enqueue: Callable[[str], None]
    new_id: Callable[[], str]
    lookup_key: bytes = field(default=b"", repr=False)
    ae_label: metrics.AeLabels = field(default_factory=metrics.AeLabels)  # calling AE -> metric label (a bounded set)


class _ReadWarnings(logging.Handler):
    """Collects pydicom's warnings per thread while :func:`inspect_instance` reads a dataset.

    pydicom keeps going past a value that runs off the end of the data (it warns and drops or
    shortens it); the listener wants to know. Its warnings may quote element values (patient
    names), so they are collected here and never printed.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        bucket = getattr(self.local, "bucket", None)
        if bucket is not None:
            bucket.append(record.getMessage())

    def collect(self) -> list[str]:
        self.local.bucket = []
        return self.local.bucket


_READ_WARNINGS = _ReadWarnings()


def quiet_pynetdicom() -> None:
    """Stop pynetdicom logging DIMSE identifiers (PHI) and its INFO chatter, and keep pydicom's
    warnings (which may quote values) out of every log and off stderr."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.setLevel(logging.WARNING)
    pydicom_log.propagate = False
    if _READ_WARNINGS not in pydicom_log.handlers:
        pydicom_log.addHandler(_READ_WARNINGS)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")


def _calling_aet(event: evt.Event) -> str:
    return str(event.assoc.requestor.ae_title or "").strip()


def _peer(event: evt.Event) -> str:
    return f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def handle_rejected(event: evt.Event, deps: _Deps) -> None:
    calling = _calling_aet(event)
    allowed = deps.cfg.allowed_calling_aets
    if allowed and calling not in allowed:
        reason = "calling AE title not allowed"
    elif len([a for a in event.assoc.ae.active_associations if a.is_acceptor]) > deps.cfg.max_associations:
        reason = f"association limit of {deps.cfg.max_associations} reached"
    else:
        reason = "association rejected (called AE title or no acceptable context)"
    log.warning("association refused", calling_aet=calling, peer=_peer(event), reason=reason)
    metrics.ASSOCIATIONS_REFUSED.labels(calling_aet=deps.ae_label(calling)).inc()
    _audit_quietly(deps, "refused", calling_aet=calling, peer=_peer(event), reason=reason)


def _audit_quietly(deps: _Deps, event: str, **fields: object) -> None:
    """Audit, but never let an audit failure (a full disk) change the DIMSE answer."""
    try:
        deps.audit.record(event, **fields)
    except Exception:  # noqa: BLE001
        log.exception("audit record failed", audit_event=event, job_id=fields.get("job_id"))


def _tag(keyword: str) -> str:
    t = tag_for_keyword(keyword)
    return f"({t >> 16:04X},{t & 0xFFFF:04X}) {keyword}" if t is not None else keyword


def inspect_instance(source: Path | bytes, context_sop_class: str | None, max_pixels: int = MAX_PIXELS,
                     scratch: Path | None = None) -> tuple[pydicom.Dataset | None, str | None]:
    """Parse every element of a received instance and check what a worker will rely on.

    ``source`` is the received file (the listener's case: values over ``DEFER_BYTES`` are not
    read into memory) or its bytes. Returns ``(dataset, None)`` when it is sound, else ``(None or
    dataset, reason)``. The reason names a tag or a check, never a value (values may be patient
    data). Pixel data are not decoded: for native transfer syntaxes their length is compared with
    Rows x Columns x Samples x Frames x BitsAllocated; for compressed ones the encapsulation must
    start with an Item tag. A declared size above ``max_pixels`` (a decompression bomb) is refused.

    A deflated data set is first inflated in bounded pieces, counted and never held whole: one
    that inflates past :func:`inflate_limit` is refused without writing anything; one within it
    is inflated again into a temporary file in ``scratch`` (the spool's ``tmp/``) and inspected
    like any other. That file is gone on return, so the dataset's values left on disk (the pixel
    data) cannot be read from it; its ``file_meta`` keeps the deflated transfer syntax.
    """
    try:
        with _inflated(source, max_pixels, scratch) as (readable, transfer_syntax):
            ds, reason = _inspect(readable, context_sop_class, max_pixels)
    except InflateRefused as exc:
        return None, str(exc)
    if transfer_syntax is not None and ds is not None and hasattr(ds, "file_meta"):
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    return ds, reason


def _inspect(source: Path | bytes, context_sop_class: str | None, max_pixels: int
             ) -> tuple[pydicom.Dataset | None, str | None]:
    seen = _READ_WARNINGS.collect()
    on_disk = not isinstance(source, (bytes, bytearray))
    try:
        size = os.stat(source).st_size if on_disk else len(source)
        ds = (pydicom.dcmread(source, defer_size=DEFER_BYTES) if on_disk else pydicom.dcmread(BytesIO(source)))
        for raw in list(ds._dict.values()):  # a value shorter than its length field: the data ended
            if not isinstance(raw, RawDataElement) or raw.length in (0xFFFFFFFF, None):
                continue
            if (raw.value is None and raw.value_tell + raw.length > size) or (
                    isinstance(raw.value, bytes) and len(raw.value) < raw.length):
                return ds, "truncated: an element's length runs past the end of the data"
        for elem in _in_memory(ds):  # values are converted lazily: force every one now
            elem.value  # noqa: B018
    except Exception as exc:  # noqa: BLE001 - any parse failure means "cannot understand"
        return None, f"unparseable header: {type(exc).__name__}"
    finally:
        _READ_WARNINGS.local.bucket = None
    if any("end of file" in m.lower() or "eof" in m.lower() for m in seen):
        return ds, "truncated: an element's length runs past the end of the data"
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    missing = [kw for kw, v in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_instance)) if not v]
    if missing:
        return ds, f"missing {', '.join(missing)}"
    try:
        for kw in CRITICAL_ELEMENTS:
            elem = ds[kw] if kw in ds else None
            if elem is not None and elem.VR != dictionary_VR(elem.tag):
                return ds, f"wrong VR {elem.VR} for {_tag(kw)}"
            if elem is not None and elem.VR in ("DS", "IS", "US", "SS"):
                values = elem.value if elem.VM > 1 else [elem.value]
                if elem.VM == 0 or not all(isinstance(v, (int, float)) for v in values):
                    return ds, f"empty or non-numeric value in {_tag(kw)}"
        for kw in ("SOPClassUID", "SOPInstanceUID"):
            if not UID(str(ds[kw].value)).is_valid:
                return ds, f"{_tag(kw)} is not a valid UID"
        if context_sop_class and sop_class != context_sop_class:
            return ds, "SOP Class UID differs from the presentation context's abstract syntax"
        if sop_class in IMAGE_STORAGE:
            return ds, _pixel_problem(ds, max_pixels, source if on_disk else None)
    except Exception as exc:  # noqa: BLE001 - e.g. a multi-valued Rows, a non-numeric IS
        return ds, f"inconsistent image header: {type(exc).__name__}"
    return ds, None


@contextmanager
def _inflated(source: Path | bytes, max_pixels: int, scratch: Path | None
              ) -> Iterator[tuple[Path | bytes, UID | None]]:
    """``(source, None)`` unless it is a deflated Part 10 file; then ``(inflated copy, deflated
    transfer syntax UID)``: the same preamble and meta (transfer syntax Explicit VR Little Endian)
    and the inflated data set, in a temporary file (or bytes, for bytes)."""
    on_disk = not isinstance(source, (bytes, bytearray))
    with (open(source, "rb") if on_disk else BytesIO(source)) as fh:
        try:
            preamble = read_preamble(fh, False) or b"\0" * 128
            meta = _read_file_meta_info(fh)
            ts = str(meta.get("TransferSyntaxUID", "") or "")  # values convert lazily: may raise too
        except Exception:  # noqa: BLE001 - not Part 10 or a broken meta: the full parse says why
            ts = None
        if ts != DeflatedExplicitVRLittleEndian:
            yield source, None
            return
        start, limit = fh.tell(), inflate_limit(max_pixels)
        _inflate_bounded(fh, None, limit)  # count first: a bomb is refused without a byte written
        fh.seek(start)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        if not on_disk:
            out = BytesIO()
            _write_inflated(out, preamble, meta, fh, limit)
            yield out.getvalue(), UID(ts)
            return
        with tempfile.NamedTemporaryFile(dir=scratch, prefix="inflated-", suffix=".dcm") as tmp:
            _write_inflated(tmp, preamble, meta, fh, limit)
            tmp.flush()
            yield Path(tmp.name), UID(ts)


def _write_inflated(out: BinaryIO, preamble: bytes, meta: pydicom.Dataset, src: BinaryIO, limit: int) -> None:
    out.write(preamble + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    _inflate_bounded(src, out, limit)


def _inflate_bounded(src: BinaryIO, dst: BinaryIO | None, limit: int) -> int:
    """Inflate the raw deflate stream (PS3.5 A.5: no zlib header) from ``src`` to ``dst`` (None:
    count only), at most ``INFLATE_PIECE`` bytes of output in memory at a time; returns the
    inflated size.

    Raises
    ------
    InflateRefused
        It inflates to more than ``limit`` bytes, the stream is corrupt, or it ends early.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while not inflater.eof:
        data = src.read(64 * 1024)
        if not data:
            raise InflateRefused("deflated data set: the deflate stream ends early")
        while True:
            try:
                piece = inflater.decompress(data, INFLATE_PIECE)
            except zlib.error as exc:
                raise InflateRefused(f"deflated data set: corrupt deflate stream ({exc})") from exc
            total += len(piece)
            if total > limit:
                raise InflateRefused(f"deflated data set inflates to more than {limit} bytes")
            if dst is not None and piece:
                dst.write(piece)
            data = inflater.unconsumed_tail
            if not data and len(piece) < INFLATE_PIECE:
                break
    return total


def _deferred(raw: object) -> bool:
    return isinstance(raw, RawDataElement) and raw.value is None and bool(raw.length)


def _in_memory(ds: pydicom.Dataset):
    """Every element of ``ds`` and its sequences except top-level values left on disk."""
    for tag in list(ds._dict):
        if _deferred(ds._dict[tag]):
            continue
        elem = ds[tag]
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from item.iterall()


def _pixel_head(ds: pydicom.Dataset, path: Path | None) -> tuple[int | None, bytes]:
    """The pixel data's length (None: undefined) and first four bytes, reading no more than that."""
    raw = ds._dict[PIXEL_DATA]
    if path is not None and _deferred(raw):
        with open(path, "rb") as fh:
            fh.seek(raw.value_tell)
            head = fh.read(4)
        return (None if raw.length == 0xFFFFFFFF else raw.length), head
    pixels = ds.PixelData or b""
    return len(pixels), bytes(pixels[:4])


def _pixel_problem(ds: pydicom.Dataset, max_pixels: int, path: Path | None) -> str | None:
    for kw in ("Rows", "Columns", "BitsAllocated"):
        if ds.get(kw) in (None, ""):
            return f"{_tag(kw)} missing"
    if PIXEL_DATA not in ds._dict:
        return f"{_tag('PixelData')} missing"
    rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if min(rows, cols, bits, spp, frames) < 1:
        return "Rows, Columns, BitsAllocated, SamplesPerPixel and NumberOfFrames must be positive"
    if rows * cols * frames > max_pixels:
        return f"declared image {rows} x {cols} x {frames} frame(s) exceeds the limit of {max_pixels} pixels"
    length, head = _pixel_head(ds, path)
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if ts in UNCOMPRESSED:
        need = math.ceil(rows * cols * spp * frames * bits / 8)
        if length is None or length < need:
            return f"{_tag('PixelData')} has {length} bytes, Rows x Columns needs {need}"
    elif head != b"\xfe\xff\x00\xe0":
        return f"{_tag('PixelData')} is not encapsulated as its transfer syntax requires"
    return None


def _answer(status: int, comment: str) -> Dataset:
    """A C-STORE failure status with an Error Comment (0000,0902) saying why: LO, so at most 64
    characters. Quarantine reasons name tags and checks, never values, so they may go out."""
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]
    return rsp


def handle_store(event: evt.Event, deps: _Deps) -> int | Dataset:
    """Persist first, then parse, classify, record, enqueue. Returns a C-STORE status."""
    calling = _calling_aet(event)
    ae = deps.ae_label(calling)
    job_id = deps.new_id()
    path = deps.spool.incoming_path(job_id)
    try:
        deps.spool.adopt(event.dataset_path, path)
    except OutOfSpace as exc:
        log.error("spool full, refusing instance", job_id=job_id, calling_aet=calling, error=str(exc))
        _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="spool full")
        metrics.INSTANCES_REFUSED.labels(calling_aet=ae, reason="out_of_resources").inc()
        return OUT_OF_RESOURCES
    except OSError as exc:
        log.error("spool write failed", job_id=job_id, calling_aet=calling, error=str(exc))
        _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="spool write failed")
        metrics.INSTANCES_REFUSED.labels(calling_aet=ae, reason="processing_failure").inc()
        return PROCESSING_FAILURE

    # From here the bytes are safe on disk.
    context = str(event.context.abstract_syntax) if getattr(event, "context", None) else None
    try:
        ds, reason = inspect_instance(path, context, deps.cfg.max_pixels, scratch=deps.spool.tmp)
    except OSError as exc:  # no room in tmp/ to inflate a deflated data set: the sender may retry
        path.unlink(missing_ok=True)
        log.error("inspection failed; instance refused", job_id=job_id, calling_aet=calling, error=str(exc))
        _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="spool write failed while inflating")
        metrics.INSTANCES_REFUSED.labels(calling_aet=ae, reason="out_of_resources").inc()
        return _answer(OUT_OF_RESOURCES, "no spool space to inflate the data set")
    if reason is None:
        try:
            decision = classify(ds, own_manufacturer=deps.cfg.own_manufacturer)
        except Exception as exc:  # noqa: BLE001
            reason = f"unclassifiable header: {type(exc).__name__}"
    if reason is not None:
        try:
            deps.spool.quarantine_file(path, reason, job_id, stage="listener", calling_aet=calling,
                                       peer=_peer(event))
        except Exception:  # noqa: BLE001
            path.unlink(missing_ok=True)
            log.exception("quarantine failed; bytes dropped", job_id=job_id)
        _audit_quietly(deps, "quarantined", job_id=job_id, calling_aet=calling, peer=_peer(event), reason=reason)
        log.warning("instance quarantined", job_id=job_id, calling_aet=calling, reason=reason)
        metrics.INSTANCES_QUARANTINED.labels(calling_aet=ae).inc()
        return _answer(CANNOT_UNDERSTAND, reason)

    sop_instance, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    study = str(ds.get("StudyInstanceUID", "") or "")
    try:
        job, _earlier = deps.jobs.add(
            job_id=job_id,
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            study_instance_uid=study,
            calling_aet=calling,
            path=deps.spool.relative(path),
            state=JobState.QUEUED if decision.process else JobState.SKIPPED,
            reason=decision.reason,
            accession_hash=keyed_hash(deps.lookup_key, ds.get("AccessionNumber")),
            patient_hash=keyed_hash(deps.lookup_key, ds.get("PatientID")),
        )
    except Exception as exc:  # noqa: BLE001 - unrecorded bytes are useless: drop them, let the sender retry
        path.unlink(missing_ok=True)
        full = isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)
        log.error("job table write failed; instance refused", job_id=job_id, error=type(exc).__name__,
                  disk_full=full)
        if full:
            _audit_quietly(deps, "failed", job_id=job_id, calling_aet=calling, reason="spool full")
        metrics.INSTANCES_REFUSED.labels(calling_aet=ae, reason="out_of_resources" if full else "processing_failure").inc()
        return OUT_OF_RESOURCES if full else PROCESSING_FAILURE

    fields = dict(
        job_id=job.id,
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_instance_uid=study,
        calling_aet=calling,
        reason=job.reason,
    )
    queued = job.state == JobState.QUEUED
    _audit_quietly(deps, "received" if queued else "skipped", **fields)
    log.info("instance received" if queued else "instance skipped", state=str(job.state), **fields)
    (metrics.INSTANCES_RECEIVED if queued else metrics.INSTANCES_SKIPPED).labels(calling_aet=ae).inc()

    if queued:
        try:
            deps.enqueue(job.id)
        except Exception as exc:  # noqa: BLE001 - the reconciler re-enqueues QUEUED jobs
            log.warning("enqueue failed; reconciler will retry", job_id=job.id, error=repr(exc))
    return SUCCESS


def _guard(cfg: ListenerConfig, deps: _Deps) -> Guard:
    def refused(peer: str, reason: str) -> None:
        log.warning("connection refused", peer=peer, reason=reason)
        metrics.ASSOCIATIONS_REFUSED.labels(calling_aet=metrics.UNKNOWN_AE).inc()
        _audit_quietly(deps, "refused", peer=peer, reason=reason)

    def violation(peer: str, reason: str, data: bytes) -> None:
        qid = deps.new_id()
        try:
            deps.spool.quarantine(data, reason, qid, suffix="pdu", stage="listener", peer=peer)
        except Exception:  # noqa: BLE001 - a full spool must not keep the abort from going out
            log.exception("PDU quarantine failed", quarantine_id=qid)
        log.warning("PDU refused", peer=peer, reason=reason, quarantine_id=qid)
        metrics.INSTANCES_QUARANTINED.labels(calling_aet=metrics.UNKNOWN_AE).inc()
        _audit_quietly(deps, "quarantined", peer=peer, reason=reason, quarantine_id=qid)

    return Guard(max_pdu_length=cfg.max_pdu_length, allowed_networks=parse_networks(cfg.allowed_addresses),
                 tls=cfg.tls, network_timeout=cfg.network_timeout, request_timeout=cfg.association_request_timeout,
                 max_associations_per_address=cfg.max_associations_per_address,
                 max_pending_per_address=cfg.max_pending_per_address, max_pending=cfg.max_pending, on_refused=refused, on_violation=violation)


def recover_spool(spool: Spool, jobs: JobStore) -> dict[str, int]:
    """Before serving: drop partial writes and instance files no job records (see Spool.sweep_*)."""
    return {"partial_writes": spool.sweep_tmp(),
            "unrecorded_instances": spool.sweep_incoming(lambda job_id: jobs.get(job_id) is not None)}


def start_listener(
    cfg: ListenerConfig,
    spool: Spool,
    jobs: JobStore,
    audit: AuditLog,
    enqueue: Callable[[str], None],
    new_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> GuardedServer:
    """Start the Storage/Verification SCP in background threads; call ``.shutdown()`` to stop.

    Only one listener may serve a spool: it sweeps the spool's partial writes on start.
    """
    quiet_pynetdicom()
    _config.STORE_RECV_CHUNKED_DATASET = True  # each instance goes to a file as it arrives, not to memory
    swept = recover_spool(spool, jobs)
    if any(swept.values()):
        log.warning("spool recovered after an unclean stop", **swept)
    ae = AE(ae_title=cfg.ae_title)
    ae.maximum_associations = cfg.max_associations
    ae.maximum_pdu_size = cfg.advertised_pdu_size()
    ae.network_timeout = cfg.network_timeout
    if cfg.allowed_calling_aets:
        ae.require_calling_aet = list(cfg.allowed_calling_aets)
    for sop_class in IMAGE_STORAGE + STORED_AND_SKIPPED:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(VERIFICATION, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])

    deps = _Deps(cfg, spool, jobs, audit, enqueue, new_id, cfg.lookup_key or spool_secret(spool.root, "lookup"),
                 metrics.AeLabels(cfg.allowed_calling_aets))
    handlers = [
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [deps]),
        (evt.EVT_REJECTED, handle_rejected, [deps]),
    ]
    server = ae.make_server((cfg.host, cfg.port), evt_handlers=handlers, server_class=GuardedServer,
                            guard=_guard(cfg, deps))
    thread = threading.Thread(target=server.serve_forever, name=f"listener@{cfg.port}", daemon=True)
    thread.start()
    ae._servers.append(server)  # so ae.shutdown() also stops it, as with ae.start_server
    log.info("listener started", ae_title=cfg.ae_title, host=cfg.host, port=cfg.port, tls=cfg.tls is not None,
             max_associations=cfg.max_associations, max_associations_per_address=cfg.max_associations_per_address)
    return server
