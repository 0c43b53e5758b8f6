"""Instance inspection: is a received file sound enough to spool, before anything else reads it?

:func:`inspect_instance` parses the whole header (every element, so a lying length or a broken
sequence is found here, not in a worker) and checks the pixel data element against Rows x Columns
and a pixel limit, without decoding it. A deflated data set is inflated in bounded pieces first
(pydicom would inflate it whole into memory): one that inflates past the limit the pixel limit
implies is refused before anything is written. The pixel limit is the one preprocessing applies
before decoding (models.preprocess.DEFAULT_MAX_PIXELS): what the listener lets in, a worker can
read.

Reasons name a tag or a check, never a value (values may be patient data). pydicom's warnings,
which may quote values, are collected per thread by `READ_WARNINGS` (attached to pydicom's logger
by dicom_node.config.configure()) and never printed.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, cast

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicom_node.sop import IMAGE_STORAGE, UNCOMPRESSED
from models.preprocess import DEFAULT_MAX_PIXELS as MAX_PIXELS  # one pixel limit for the listener and the decoder

# Values larger than this stay on disk while the header is checked (pixel data, big private blobs).
DEFER_BYTES = 256 * 1024
PIXEL_DATA = 0x7FE00010
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


class _ReadWarnings(logging.Handler):
    """Collects pydicom's warnings per thread while :func:`inspect_instance` reads a dataset.

    pydicom keeps going past a value that runs off the end of the data (it warns and drops or
    shortens it); inspection wants to know. Its warnings may quote element values (patient
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


READ_WARNINGS = _ReadWarnings()  # dicom_node.config.configure() attaches it to pydicom's logger


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
    seen = READ_WARNINGS.collect()
    path = None if isinstance(source, (bytes, bytearray)) else source  # on disk: values read when needed
    try:
        if path is None:
            data = cast(bytes, source)
            size, ds = len(data), pydicom.dcmread(BytesIO(data))
        else:
            size, ds = os.stat(path).st_size, pydicom.dcmread(path, defer_size=DEFER_BYTES)
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
        READ_WARNINGS.local.bucket = None
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
            return ds, _pixel_problem(ds, max_pixels, path)
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
    with (BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")) as fh:
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
            _write_inflated(cast(BinaryIO, tmp), preamble, meta, fh, limit)
            tmp.flush()
            yield Path(tmp.name), UID(ts)


def _write_inflated(out: BinaryIO, preamble: bytes, meta: FileMetaDataset, src: BinaryIO, limit: int) -> None:
    out.write(preamble + b"DICM")
    write_file_meta_info(cast(DicomIO, out), meta, enforce_standard=False)  # any binary file will do
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
    raw = ds._dict[Tag(PIXEL_DATA)]
    if path is not None and isinstance(raw, RawDataElement) and _deferred(raw):
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
