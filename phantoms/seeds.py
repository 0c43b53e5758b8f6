"""The phantom generator's seeds: one place that says how a name or an index becomes randomness.

Every random choice of a phantom comes from a generator seeded by a SHA-256 of named parts
(`rng("render", seed, study_id)`), so a case's pixels never depend on what was drawn before it.
`render_seed` is the per-image seed that `generate`, the training data sets and the case index
all use for the i-th case of a seeded batch, so the same case renders to the same pixels in all three.
"""

from __future__ import annotations

import hashlib

import numpy as np


def rng(*parts) -> np.random.Generator:
    """A generator seeded by the SHA-256 of the parts, joined with "|"."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def render_seed(seed: int, index: int) -> int:
    """The render seed of the index-th case of a batch sampled with `seed`."""
    return seed * 1000003 + index
