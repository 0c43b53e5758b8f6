"""The patient-level split: one patient's studies never straddle train, validation and test."""

from __future__ import annotations

import numpy as np


def split_patients(patients: np.ndarray, seed: int, fractions=(0.8, 0.1, 0.1)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boolean masks (train, val, test), patient-level: one patient's studies never straddle splits."""
    uniq = np.unique(patients)
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    a = int(round(fractions[0] * len(uniq)))
    b = a + int(round(fractions[1] * len(uniq)))
    tr, va = set(uniq[:a]), set(uniq[a:b])
    m_tr = np.array([p in tr for p in patients])
    m_va = np.array([p in va for p in patients])
    return m_tr, m_va, ~(m_tr | m_va)
