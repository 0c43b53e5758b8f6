"""The data contract training and the case index share: one item type, manifest reader, image loader."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

import phantoms
from imagedata.images import load_image
from imagedata.item import ManifestError, label_value
from imagedata.manifest import manifest_items
from imagedata.phantom_items import phantom_items
from models.labels import LABELS
from models.preprocess import read_image


def test_a_16_bit_png_keeps_its_grey_levels_for_training_and_for_the_index(tmp_path):
    from index.build import manifest_items as index_items
    from model_training.data import training_items

    grey = np.linspace(0, 60000, 64 * 48).reshape(64, 48).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # a real 16-bit PNG on disk
    (tmp_path / "manifest.csv").write_text("path,patient_id,report," + ",".join(LABELS) + "\n"
                                           "deep.png,p1,Clear lungs.," + ",".join(["0"] * 14) + "\n")
    want = grey.astype(np.float32) / 65535.0
    np.testing.assert_allclose(load_image(tmp_path / "deep.png"), want, rtol=0, atol=1e-7)
    for items in (index_items(tmp_path), training_items(tmp_path)):
        img = items[0].load()
        np.testing.assert_allclose(img, want, rtol=0, atol=1e-7)
        assert len(np.unique(img)) > 1000  # not collapsed to 256 levels, not clipped at 255
    assert index_items(tmp_path)[0].key == training_items(tmp_path)[0].key


def test_an_8_bit_png_and_a_dicom_file_load_as_before(tmp_path):
    g = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(g).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), g.astype(np.float32) / 255.0)
    man = phantoms.generate(1, tmp_path / "ph", seed=2, size=128)
    f = next((man.parent / "images").glob("*.dcm"))
    np.testing.assert_array_equal(load_image(f), read_image(pydicom.dcmread(f)))


def test_label_cells_one_reading(tmp_path):
    assert [label_value(v) for v in ("1", "0", "-1", "1.0", " 0.0 ", "-1.0", 1, 0, -1)] == [1, 0, -1, 1, 0, -1, 1, 0, -1]
    assert all(np.isnan(label_value(v)) for v in ("", "  ", None, "nan", float("nan")))
    with pytest.raises(ManifestError, match="row 2.*'Edema'.*'2'"):
        g = np.zeros((8, 8), np.uint8)
        Image.fromarray(g).save(tmp_path / "a.png")
        cells = ["0"] * 14
        cells[LABELS.index("Edema")] = "2"
        (tmp_path / "manifest.csv").write_text("path," + ",".join(LABELS) + "\na.png," + ",".join(cells) + "\n")
        manifest_items(tmp_path)


def test_a_manifest_row_is_read_once_for_both(tmp_path):
    """Labels 1 / 0 / -1 / blank: training masks -1 and blank; the index keeps -1 and None."""
    man = phantoms.generate(3, tmp_path / "ph", seed=7, size=128)
    items = manifest_items(man)
    assert [it.study_id for it in items] and all(it.report and it.patient_id and it.device for it in items)
    for it in items:
        d = it.label_dict()
        assert set(d) == set(LABELS) and set(d.values()) <= {1, 0, -1}
        k = it.known_labels()
        for j, lab in enumerate(LABELS):
            assert (np.isnan(k[j]) and d[lab] == -1) or k[j] == d[lab]


def test_phantom_items_render_what_generate_writes_and_key_by_the_generator(tmp_path):
    """One render seed (phantoms.render_seed) for `generate`, training and the index."""
    man = phantoms.generate(3, tmp_path / "ph", seed=9, size=128)
    written = [read_image(pydicom.dcmread(p)) for p in sorted((man.parent / "images").glob("*.dcm"))]
    cases = phantoms.sample_cases(3, 9)
    items = phantom_items(cases, 9, 128)
    by_study = {it.study_id: it for it in items}
    for case, img in zip(sorted(cases, key=lambda c: c.study_id), written):
        np.testing.assert_array_equal(by_study[case.study_id].load(), img)
    assert all(phantoms.code_digest() not in it.key for it in items)  # hashed, not spelled out
    assert len({it.key for it in items}) == 3
    from index.build import phantom_items as index_phantoms
    assert [it.key for it in index_phantoms(cases, 9, 128)] == [it.key for it in items]
