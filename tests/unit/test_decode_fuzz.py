"""Property-based fuzzing of the decode and preprocessing path (hypothesis, 10,000 cases).

Each case mutates the bytes of a small, valid instance (truncation, byte flips, "interesting"
integers written over header fields, inserted junk) and runs what the node runs on received
bytes: the listener's :func:`dicom_node.inspect.inspect_instance`, then the frontal-CXR filter,
then the worker's :func:`models.preprocess.read_image`. The property: no exception escapes other
than the ones the callers handle (the listener quarantines every ``reason``; the worker handles
``ImageError``), and memory stays bounded (peak RSS growth under a fixed budget).
"""

from __future__ import annotations

import io
import os
import resource
import struct

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid

from dicom_node.config import configure
from dicom_node.filters import classify
from dicom_node.inspect import inspect_instance
from dicom_node.sop import IMAGE_STORAGE
from models.preprocess import ImageError, read_image

CASES = int(os.environ.get("MEDSAM2_FUZZ_CASES", 10_000))  # 10,000 in `make test`
_RSS_AT_START: list[float] = []
MAX_PIXELS = 1 << 20  # the fuzz's own bound on what the checks let through to decoding
RSS_BUDGET_MB = 400
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 65535 * 65535]


def _seed(ts: str, photometric: str = "MONOCHROME2", voi: bool = False, bits: int = 16, rows: int = 24) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = IMAGE_STORAGE[1], generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "FUZZ^FRED", "PID-FUZZ"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows, ds.Columns = rows, 20
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 4 if bits > 8 else 8, \
        (bits - 4 if bits > 8 else 8) - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
    if voi:
        ds.WindowCenter, ds.WindowWidth = "512", "1024"
    dtype = np.uint16 if bits == 16 else np.uint8
    ds.PixelData = (np.arange(rows * 20) % 200).astype(dtype).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if ts == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    elif ts == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


SEEDS = [
    _seed(ExplicitVRLittleEndian),
    _seed(ExplicitVRLittleEndian, "MONOCHROME1", voi=True),
    _seed(ImplicitVRLittleEndian, bits=8),
    _seed(RLELossless),
]

mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 2000)),
    st.tuples(st.just("flip"), st.integers(128, 900), st.integers(1, 255)),
    st.tuples(st.just("u16"), st.integers(128, 900), st.sampled_from(INTERESTING)),
    st.tuples(st.just("u32"), st.integers(128, 900), st.sampled_from(INTERESTING)),
    st.tuples(st.just("insert"), st.integers(128, 900), st.binary(min_size=1, max_size=16)),
)


def mutate(data: bytes, ops: list[tuple]) -> bytes:
    b = bytearray(data)
    for op in ops:
        if not b:
            break
        kind, pos = op[0], op[1] % len(b)
        if kind == "truncate":
            del b[pos:]
        elif kind == "flip":
            b[pos] ^= op[2]
        elif kind in ("u16", "u32"):
            fmt, size = ("<H", 2) if kind == "u16" else ("<L", 4)
            b[pos:pos + size] = struct.pack(fmt, op[2] & (0xFFFF if size == 2 else 0xFFFFFFFF))
        else:
            b[pos:pos] = op[2]
    return bytes(b)


def decode_alone(data: bytes) -> bool:
    """The worker's decoder on its own, as if the listener had let the bytes through: an image
    in [0, 1] (True) or ImageError (False), nothing else. What dcmread cannot parse at all the
    worker quarantines by any exception type, so that is not a crash either."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - pipeline.infer_jobs quarantines it
        return False
    try:
        out = read_image(ds, max_pixels=MAX_PIXELS)
    except ImageError:
        return False
    assert out.dtype == np.float32 and out.ndim == 2
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    return True


def run_node_path(data: bytes) -> str:
    """What the listener and then the worker do with received bytes; returns the outcome."""
    decoded = decode_alone(data)  # defence in depth: the worker never crashes on its own either
    ds, reason = inspect_instance(data, None, MAX_PIXELS)  # as event.encoded_dataset() gives it
    if reason is not None:
        return "quarantined"
    try:
        decision = classify(ds)
    except Exception:  # noqa: BLE001 - handle_store quarantines it ("unclassifiable header")
        return "quarantined"
    if not decision.process:
        return "skipped"
    return "decoded" if decoded else "refused by the worker"


outcomes: dict[str, int] = {}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    configure()  # pydicom warnings about broken values stay out of the test output (conftest did it too)
    for seed in SEEDS:  # warm up decoders and caches before the peak is taken
        run_node_path(seed)
    _RSS_AT_START.append(_peak_rss_mb())


@settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.sampled_from(range(len(SEEDS))), ops=st.lists(mutation, min_size=1, max_size=4))
def test_decode_path_never_crashes(seed, ops):
    outcome = run_node_path(mutate(SEEDS[seed], ops))
    outcomes[outcome] = outcomes.get(outcome, 0) + 1


def test_fuzz_ran_enough_cases_in_bounded_memory():
    """Runs after the property (file order): the count and the memory budget."""
    n = sum(outcomes.values())
    grew = _peak_rss_mb() - _RSS_AT_START[0]
    print(f"[fuzz] {n} cases over the decode path: {dict(sorted(outcomes.items()))}; no crash; "
          f"peak RSS grew by {grew:.0f} MB")
    assert n >= CASES
    assert grew < RSS_BUDGET_MB, f"peak RSS grew by {grew:.0f} MB during the fuzz run"


def test_every_seed_decodes():
    assert [run_node_path(s) for s in SEEDS] == ["decoded"] * len(SEEDS)


def test_an_unknown_vr_in_a_window_element_is_an_image_error():
    """Found by fuzzing read_image alone: pydicom converts values lazily, so a window element
    with an unknown VR raised NotImplementedError from inside the VOI stage."""
    tag = struct.pack("<HH", 0x0028, 0x1051)  # (0028,1051) Window Width
    seed = SEEDS[1]
    assert seed.count(tag + b"DS") == 1
    ds = pydicom.dcmread(io.BytesIO(seed.replace(tag + b"DS", tag + b"UZ")))
    with pytest.raises(ImageError, match=r"unusable value or VR \(NotImplementedError\)"):
        read_image(ds)
    assert inspect_instance(seed.replace(tag + b"DS", tag + b"UZ"), None)[1] is not None
