"""read_image on real CR chest files and on synthetic edge cases."""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from models.preprocess import ImageError, read_image, to_uint8


def _read(name: str) -> pydicom.Dataset:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available: install the test extras (pydicom-data)")
    return pydicom.dcmread(path)


def _synthetic(values: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 16) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = values.astype(np.uint16).tobytes()
    return ds


def test_real_cr_monochrome1_reads_air_dark() -> None:
    ds = _read("RG1_UNCI.dcm")
    img = read_image(ds)
    assert img.dtype == np.float32
    assert img.shape == (ds.Rows, ds.Columns)
    assert 0.0 <= img.min() and img.max() <= 1.0
    # MONOCHROME1 inverted: the air above the shoulders (top corners) is darker than the mediastinum.
    h, w = img.shape
    corner = img[: h // 20, : w // 20].mean()
    centre = img[h // 3 : h // 2, w // 2 - w // 20 : w // 2 + w // 20].mean()
    assert corner < centre


def test_jpeg2000_lossless_decodes_to_the_uncompressed_image() -> None:
    assert np.array_equal(read_image(_read("RG1_J2KR.dcm")), read_image(_read("RG1_UNCR.dcm")))


def test_decode_failure_names_transfer_syntax() -> None:
    ds = _read("RG1_J2KR.dcm")
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    with pytest.raises(ImageError, match="JPEG 2000"):
        read_image(ds)


def test_monochrome1_is_the_inverse_of_monochrome2() -> None:
    values = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 7
    m2 = read_image(_synthetic(values, "MONOCHROME2"))
    m1 = read_image(_synthetic(values, "MONOCHROME1"))
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)


def test_bits_stored_masks_garbage_high_bits() -> None:
    values = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 4) & 0x0FFF
    clean = _synthetic(values, bits_stored=12)
    dirty = _synthetic(values | 0xF000, bits_stored=12)
    for ds in (clean, dirty):
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    np.testing.assert_array_equal(read_image(dirty), read_image(clean))


def test_window_clips_and_absent_window_uses_percentiles() -> None:
    values = np.linspace(0, 4000, 100 * 100).reshape(100, 100).astype(np.uint16)
    no_window = read_image(_synthetic(values))
    # Percentile window: 0.5 % of pixels saturate at each end, the middle is linear.
    assert np.isclose((no_window == 0).mean(), 0.005, atol=0.002)
    assert np.isclose((no_window == 1).mean(), 0.005, atol=0.002)

    narrow = _synthetic(values)
    narrow.WindowCenter, narrow.WindowWidth = 1000, 500
    windowed = read_image(narrow)
    assert (windowed == 0).mean() > 0.15  # below 750: clipped black
    assert (windowed == 1).mean() > 0.6  # above 1250: clipped white
    assert not np.array_equal(windowed, no_window)


def test_huge_declared_image_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _synthetic(np.zeros((2, 2), dtype=np.uint16))
    ds.Rows = ds.Columns = 65535

    def _must_not_decode(self: Dataset) -> np.ndarray:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(Dataset, "pixel_array", property(_must_not_decode))
    with pytest.raises(ImageError, match=r"Rows.*65535"):
        read_image(ds)


def test_multiframe_colour_and_missing_pixels_refused() -> None:
    base = _synthetic(np.zeros((4, 4), dtype=np.uint16))
    multi = copy.deepcopy(base)
    multi.NumberOfFrames = 2
    with pytest.raises(ImageError, match="Number of Frames"):
        read_image(multi)
    colour = copy.deepcopy(base)
    colour.SamplesPerPixel = 3
    with pytest.raises(ImageError, match="Samples per Pixel"):
        read_image(colour)
    empty = copy.deepcopy(base)
    del empty.PixelData
    with pytest.raises(ImageError, match="Pixel Data"):
        read_image(empty)


def test_error_message_names_the_file(tmp_path) -> None:
    ds = _synthetic(np.zeros((4, 4), dtype=np.uint16))
    ds.NumberOfFrames = 3
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    path = tmp_path / "multi.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageError, match="multi.dcm"):
        read_image(pydicom.dcmread(path))


def test_to_uint8_range() -> None:
    out = to_uint8(np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]], dtype=np.float32))
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 0, 128, 255, 255]]


@pytest.mark.parametrize("function,center,width,photometric,slope", [
    ("LINEAR", 2048, 2000, "MONOCHROME2", None),
    ("LINEAR", [1000, 3000], [800, 100], "MONOCHROME1", None),
    ("LINEAR_EXACT", 1500.5, 2000, "MONOCHROME2", None),
    (None, 300, 700, "MONOCHROME2", ("0.5", "-100")),
])
def test_fast_linear_window_equals_pydicom(function, center, width, photometric, slope) -> None:
    """read_image's float32 window gives pydicom's apply_windowing scaled to [0, 1]."""
    from pydicom.pixels import apply_modality_lut, apply_windowing

    from models.preprocess import _output_range

    values = np.random.default_rng(3).integers(0, 4096, (64, 48))
    ds = _synthetic(values, photometric, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = center, width
    if function:
        ds.VOILUTFunction = function
    if slope:
        ds.RescaleSlope, ds.RescaleIntercept = slope
    lo, hi = _output_range(ds)
    want = (apply_windowing(apply_modality_lut(ds.pixel_array, ds).astype(np.float64), ds, index=0) - lo) / (hi - lo)
    if photometric == "MONOCHROME1":
        want = 1.0 - want
    got = read_image(ds)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-5
    assert 0.01 < (got == 0).mean() + (got == 1).mean() < 0.99  # the window clips some, not all


def test_resize_for_model_is_torch_antialiased_bilinear() -> None:
    """The decode processes resize with Pillow; the numbers are torch's antialiased bilinear (the
    MedSAM2 preprocessing) to within float rounding, down and up."""
    import torch
    import torch.nn.functional as F

    from models.preprocess import resize_for_model

    img = np.random.default_rng(5).random((700, 560)).astype(np.float32)
    for size in (128, 512, 1024):
        want = F.interpolate(torch.as_tensor(img)[None, None], size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)[0, 0].numpy()
        got = resize_for_model(img, size)
        assert got.dtype == np.float32 and got.shape == (size, size)
        assert np.abs(got - want).max() < 1e-5
