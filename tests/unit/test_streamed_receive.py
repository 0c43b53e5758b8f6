"""The listener checks a received file without reading its pixel data into memory, and the PDU
guard checks P-DATA-TF item lengths without decoding (and copying) the PDU."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from dicom_node.inspect import DEFER_BYTES, PIXEL_DATA, inspect_instance
from dicom_node.pdu_guard import _check_pdvs
from dicom_node.sop import IMAGE_STORAGE


def _image(rows: int = 600, cols: int = 500, pixel_bytes: bytes | None = None, ts: str = ExplicitVRLittleEndian) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = IMAGE_STORAGE[0], generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixel_bytes if pixel_bytes is not None else np.ones((rows, cols), np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_pixel_data_stay_on_disk(tmp_path):
    path = tmp_path / "in.dcm"
    path.write_bytes(_image())
    assert 600 * 500 * 2 > DEFER_BYTES
    ds, reason = inspect_instance(path, None)
    assert reason is None
    assert ds._dict[PIXEL_DATA].value is None  # deferred: never read by the listener
    assert ds.Rows == 600 and ds.SOPClassUID == IMAGE_STORAGE[0]


def test_short_pixel_data_found_from_the_file(tmp_path):
    path = tmp_path / "in.dcm"
    path.write_bytes(_image(pixel_bytes=b"\0" * (600 * 500)))  # half of Rows x Columns x 2
    assert inspect_instance(path, None)[1] == (
        "(7FE0,0010) PixelData has 300000 bytes, Rows x Columns needs 600000")


def test_a_file_cut_inside_deferred_pixel_data_is_truncated(tmp_path):
    path = tmp_path / "in.dcm"
    path.write_bytes(_image()[:-1000])
    assert inspect_instance(path, None)[1] == "truncated: an element's length runs past the end of the data"


def test_encapsulation_checked_from_the_file(tmp_path):
    frame = bytes(range(256)) * 2000
    good = _image(pixel_bytes=encapsulate([frame]), ts=JPEG2000Lossless)
    (tmp_path / "good.dcm").write_bytes(good)
    ds, reason = inspect_instance(tmp_path / "good.dcm", None)
    assert reason is None and ds._dict[PIXEL_DATA].value is None
    # The same bytes with the first Item tag broken
    bad = good.replace(b"\xfe\xff\x00\xe0", b"\xfe\xff\x00\xe1", 1)
    (tmp_path / "bad.dcm").write_bytes(bad)
    assert inspect_instance(tmp_path / "bad.dcm", None)[1] == (
        "(7FE0,0010) PixelData is not encapsulated as its transfer syntax requires")


def test_bytes_and_file_give_the_same_verdicts(tmp_path):
    for data in (_image(), _image(pixel_bytes=b"\0" * 10), _image()[:-1000], _image()[:300]):
        path = tmp_path / "x.dcm"
        path.write_bytes(data)
        assert inspect_instance(path, None)[1] == inspect_instance(data, None)[1]


def _pdv(ctx: int, payload: bytes) -> bytes:
    return struct.pack(">LB", len(payload) + 1, ctx) + payload


def test_pdv_items_walked():
    _check_pdvs(bytearray(_pdv(1, b"\x02" + b"x" * 100) + _pdv(1, b"\x00" + b"y")))
    for bad in (b"", _pdv(1, b"")[:4] + b"\x01", _pdv(1, b"\x02abc")[:-1], _pdv(1, b"\x02abc") + b"\x00\x00"):
        with pytest.raises(ValueError):
            _check_pdvs(bytearray(bad))
