"""Box operations in the latent space, for retrieval (C) and source selection (A).

A box is (center c, radius r), corners z = c - r and Z = c + r (../shared/docs/method.md). Every
function broadcasts over leading axes, so one query box scores a whole candidate block at once,
and works in log space: a product of 128 side lengths under- or overflows float64 quickly.

Hard volumes are exact but an intersection of two 128-d boxes is almost always empty, which
gives every candidate the same score (-inf). The Gumbel (soft) intersection with a softplus
volume keeps a graded score: for a gap g between boxes along an axis it contributes about
-g / beta instead of -inf, and it tends to the hard value as beta -> 0.
"""

from __future__ import annotations

import numpy as np

_TINY = 1e-30


def corners(center: np.ndarray, radius: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z, Z) = (c - r, c + r).

    Raises
    ------
    ValueError
        A negative radius (a box with its corners swapped is a bug upstream, not a small box).
    """
    center, radius = np.asarray(center, np.float64), np.asarray(radius, np.float64)
    if np.any(radius < 0):
        raise ValueError("box radius must be >= 0 on every axis")
    return center - radius, center + radius


def volume(radius: np.ndarray) -> np.ndarray:
    """Hard volume prod(2 r_i) over the last axis (may underflow: prefer log_volume)."""
    return np.prod(2.0 * np.asarray(radius, np.float64), axis=-1)


def log_volume(radius: np.ndarray) -> np.ndarray:
    """sum log(2 r_i); -inf for a degenerate (zero-width) box."""
    with np.errstate(divide="ignore"):
        return np.sum(np.log(2.0 * np.asarray(radius, np.float64)), axis=-1)


def softplus(x: np.ndarray, beta: float) -> np.ndarray:
    """beta * log(1 + exp(x / beta)), computed without overflow."""
    x = np.asarray(x, np.float64)
    return beta * np.logaddexp(0.0, x / beta)


def soft_log_volume(z: np.ndarray, Z: np.ndarray, beta: float) -> np.ndarray:
    """sum log softplus_beta(Z_i - z_i): finite even for an empty box, -> log hard volume as beta -> 0."""
    return np.sum(np.log(np.maximum(softplus(np.asarray(Z) - np.asarray(z), beta), _TINY)), axis=-1)


def intersection(za: np.ndarray, Za: np.ndarray, zb: np.ndarray, Zb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hard intersection corners [max(z_a, z_b), min(Z_a, Z_b)]; empty where lower > upper."""
    return np.maximum(za, zb), np.minimum(Za, Zb)


def gumbel_intersection(za: np.ndarray, Za: np.ndarray, zb: np.ndarray, Zb: np.ndarray,
                        beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft intersection: z = beta logsumexp(z_a/b, z_b/b), Z = -beta logsumexp(-Z_a/b, -Z_b/b)."""
    if beta <= 0:
        raise ValueError(f"Gumbel temperature beta must be > 0, got {beta}")
    z = beta * np.logaddexp(np.asarray(za) / beta, np.asarray(zb) / beta)
    Z = -beta * np.logaddexp(-np.asarray(Za) / beta, -np.asarray(Zb) / beta)
    return z, Z


def log_intersection_volume(ca: np.ndarray, ra: np.ndarray, cb: np.ndarray, rb: np.ndarray,
                            beta: float | None = None) -> np.ndarray:
    """log Vol(a ∧ b): hard (-inf when the boxes do not meet) if beta is None, else Gumbel-soft."""
    za, Za = corners(ca, ra)
    zb, Zb = corners(cb, rb)
    if beta is None:
        lo, hi = intersection(za, Za, zb, Zb)
        with np.errstate(divide="ignore"):
            return np.sum(np.log(np.clip(hi - lo, 0.0, None)), axis=-1)
    lo, hi = gumbel_intersection(za, Za, zb, Zb, beta)
    return soft_log_volume(lo, hi, beta)


def box_log_volume(c: np.ndarray, r: np.ndarray, beta: float | None = None) -> np.ndarray:
    """log Vol of one box, hard, or soft as the Gumbel intersection of the box with itself.

    The Gumbel intersection shrinks each side by about beta log 2, so the soft volume a box is
    compared with must shrink the same way: then P(a | a) = 1 and a box's overlap with itself is 1.
    """
    if beta is None:
        return log_volume(r)
    z, Z = corners(c, r)
    lo, hi = gumbel_intersection(z, Z, z, Z, beta)
    return soft_log_volume(lo, hi, beta)


def log_conditional(ca: np.ndarray, ra: np.ndarray, cb: np.ndarray, rb: np.ndarray,
                    beta: float | None = None) -> np.ndarray:
    """log P(a | b) = log Vol(a ∧ b) - log Vol(b): the share of box b that box a covers.

    With beta None the value is exact (<= 0, -inf for disjoint boxes); with a beta the soft form
    is used for both volumes, so P(a | a) is 1 either way (the soft value can exceed 1 slightly
    when a much larger box contains b).
    """
    return log_intersection_volume(ca, ra, cb, rb, beta) - box_log_volume(cb, rb, beta)


def log_overlap(ca: np.ndarray, ra: np.ndarray, cb: np.ndarray, rb: np.ndarray,
                beta: float | None = None) -> np.ndarray:
    """log [Vol(a ∧ b) / sqrt(Vol(a) Vol(b))]: symmetric, 0 for identical boxes, <= 0 for hard boxes."""
    inter = log_intersection_volume(ca, ra, cb, rb, beta)
    return inter - 0.5 * (box_log_volume(ca, ra, beta) + box_log_volume(cb, rb, beta))


def contains(c_outer: np.ndarray, r_outer: np.ndarray, c_inner: np.ndarray, r_inner: np.ndarray,
             atol: float = 0.0) -> np.ndarray:
    """inner ⊆ outer iff z_outer <= z_inner and Z_inner <= Z_outer on every axis."""
    zo, Zo = corners(c_outer, r_outer)
    zi, Zi = corners(c_inner, r_inner)
    return np.all((zo <= zi + atol) & (Zi <= Zo + atol), axis=-1)


def per_axis(log_value: np.ndarray, dim: int) -> np.ndarray:
    """exp(log_value / d): a per-axis geometric mean in [0, 1] a reader can compare across d."""
    return np.exp(np.asarray(log_value, np.float64) / dim)
