"""Deflated data sets (PS3.5 A.5) are inflated in bounded pieces: counted before anything is
written, refused past inflate_limit(max_pixels), otherwise inspected like any other."""

from __future__ import annotations

import io
import zlib

import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.inspect import (
    INFLATE_HEADER_BYTES,
    INFLATE_PIECE,
    InflateRefused,
    _inflate_bounded,
    inflate_limit,
    inspect_instance,
)
from tests.unit.test_streamed_receive import _image


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


class _Sink(io.RawIOBase):
    """Counts what is written and the largest single write."""

    def __init__(self) -> None:
        self.total = self.largest = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.total += len(b)
        self.largest = max(self.largest, len(b))
        return len(b)


def test_inflate_in_pieces_and_stop_at_the_limit():
    data = bytes(40 * INFLATE_PIECE) + b"tail"
    sink = _Sink()
    assert _inflate_bounded(io.BytesIO(_deflate(data)), sink, len(data)) == len(data)
    assert sink.total == len(data) and sink.largest <= INFLATE_PIECE
    with pytest.raises(InflateRefused, match=f"inflates to more than {len(data) - 1} bytes"):
        _inflate_bounded(io.BytesIO(_deflate(data)), None, len(data) - 1)
    with pytest.raises(InflateRefused, match="ends early"):
        _inflate_bounded(io.BytesIO(_deflate(data)[:-10]), None, len(data))


def test_limit_follows_the_pixel_limit():
    assert inflate_limit(8192 * 8192) == 8192 * 8192 * 4 + INFLATE_HEADER_BYTES


@pytest.mark.parametrize("on_disk", [True, False])
def test_deflated_instance_inspected_like_any_other(tmp_path, on_disk):
    data = _image(300, 200, ts=DeflatedExplicitVRLittleEndian)
    source = tmp_path / "d.dcm" if on_disk else data
    if on_disk:
        source.write_bytes(data)
    ds, reason = inspect_instance(source, None, scratch=tmp_path)
    assert reason is None and ds.Rows == 300
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert [p.name for p in tmp_path.iterdir()] == (["d.dcm"] if on_disk else [])  # no inflated copy left
    # Inflated, the header checks apply as to any syntax (the inflate limit allows the header).
    _, reason = inspect_instance(source, None, max_pixels=100, scratch=tmp_path)
    assert reason == "declared image 300 x 200 x 1 frame(s) exceeds the limit of 100 pixels"
    truncated = data[: len(data) - 100]
    assert inspect_instance(truncated, None)[1] == "deflated data set: the deflate stream ends early"
