"""Phantom cases as items, rendered in memory only when a feature-cache miss needs the pixels.

The same pixels `medsam2-cxr phantoms` writes for the i-th case of a seeded batch (render seed
phantoms.render_seed(seed, i)), for training data sets and for the case index alike. The key is
a digest of the recipe, the generator's source digest (phantoms.code_digest) included, so a
changed generator never reuses a stale cached feature; rendering an image only to hash it would
cost as much as the cache saves.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

import phantoms
from imagedata.item import Item, label_values
from models.digests import parts_digest
from models.preprocess import read_image

_MU: OrderedDict[tuple, np.ndarray] = OrderedDict()  # a few recent attenuation maps, for shifted copies


def _attenuation(case: phantoms.PhantomCase, size: int) -> np.ndarray:
    key = (case.study_id, case.patient_id, case.view, case.kind, case.anatomy_seed, size)
    if key in _MU:
        _MU.move_to_end(key)
        return _MU[key]
    mu = phantoms.attenuation(case, size)
    _MU[key] = mu
    while len(_MU) > 8:
        _MU.popitem(last=False)
    return mu


def phantom_item(case: phantoms.PhantomCase, render_seed: int, size: int, shift: float = 0.0) -> Item:
    """One case at one device shift; `shifted` renders the same case through a shifted device."""
    def load() -> np.ndarray:
        px, meta = phantoms.render(case, seed=render_seed, shift=shift, size=size, mu=_attenuation(case, size))
        return read_image(phantoms.to_dicom(px, meta, case, uid_seed=f"data:{render_seed}:{shift}"))

    return Item(
        key=parts_digest("phantom", phantoms.code_digest(), case.view, case.kind, case.study_id, render_seed, size, shift),
        load=load, labels=label_values(case.manifest_labels()), patient_id=case.patient_id, study_id=case.study_id,
        report=case.report, device=case.device,
        identifiers=(case.patient_id, case.study_id, case.accession, case.birth_date, f"PHANTOM^{case.patient_id}"),
        shift=lambda s, salt: phantom_item(case, render_seed, size, s),
    )


def phantom_items(cases: list[phantoms.PhantomCase], seed: int, size: int, shift: float = 0.0) -> list[Item]:
    """Items for cases sampled with `seed` (phantoms.sample_cases(n, seed, ...)), in order."""
    return [phantom_item(c, phantoms.render_seed(seed, i), size, shift) for i, c in enumerate(cases)]
