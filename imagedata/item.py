"""One image with what is known about it: the unit that training data sets and the case index read."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.labels import LABELS

UNCERTAIN = -1.0


class ManifestError(ValueError):
    """A manifest (or a value in it) this code cannot read; the message names file, row and column."""


def label_value(cell: object, where: str = "") -> float:
    """A manifest cell as 1, 0, -1 (uncertain) or nan (blank: unknown).

    The one reading of a label cell for training and the index. Raises ManifestError for any other
    value, naming `where` (file, row, column).
    """
    if cell is None:
        return np.nan
    if isinstance(cell, (int, float, np.integer, np.floating)):
        v = float(cell)
        if np.isnan(v):
            return np.nan
    else:
        text = str(cell).strip()
        if text.lower() in ("", "nan", "none", "null"):
            return np.nan
        try:
            v = float(text)
        except ValueError:
            raise ManifestError(f"{where}: label value {text!r} is not 1, 0, -1 or empty") from None
    if v not in (1.0, 0.0, UNCERTAIN):
        raise ManifestError(f"{where}: label value {cell!r} is not 1, 0, -1 or empty")
    return v


def label_values(labels: Mapping[str, object], where: str = "") -> np.ndarray:
    """The 14 labels of a row or dict (missing keys blank) as a (14,) array of 1 / 0 / -1 / nan."""
    return np.array([label_value(labels.get(k), f"{where}, column {k!r}" if where else k) for k in LABELS])


def known(values: np.ndarray) -> np.ndarray:
    """1 / 0 kept; uncertain (-1) and blank become nan: masked in training and in every metric."""
    v = np.asarray(values, dtype=np.float64)
    return np.where((v == 1.0) | (v == 0.0), v, np.nan)


@dataclass(frozen=True)
class Item:
    """An image (loaded only when needed) and what is known about it.

    key: the feature-cache key (sha256 of the image file, or of a phantom's recipe); labels: (14,)
    1 / 0 / -1 (uncertain) / nan (blank), or None when none are given (the index's report labeler
    fills them); identifiers: values to scrub from report text, never stored.
    """

    key: str
    load: Callable[[], np.ndarray] = field(repr=False)  # -> float32 image in [0, 1], air dark
    labels: np.ndarray | None = field(default=None, repr=False)
    patient_id: str = ""
    study_id: str = ""
    report: str = ""
    device: str = ""
    site: str = ""  # where the image comes from (a site or device name): the index stores it as the case source
    split: str = ""  # "train" / "val" / "test" when the source fixes it, else ""
    path: Path | None = None  # the image file, when there is one
    identifiers: tuple[str, ...] = ()
    shift: Callable[[float, int], Item] | None = field(default=None, repr=False)  # (s, salt) -> copy

    def known_labels(self) -> np.ndarray:
        """(14,) 1 / 0 / nan: uncertain and blank masked (training's view of the labels)."""
        return known(self.labels) if self.labels is not None else np.full(len(LABELS), np.nan)

    def label_dict(self) -> dict[str, int | None] | None:
        """{label: 1 / 0 / -1 / None} (the index's view), or None when the item has no labels."""
        if self.labels is None:
            return None
        return {k: (None if np.isnan(v) else int(v)) for k, v in zip(LABELS, self.labels)}

    def shifted(self, s: float, salt: int = 0) -> Item:
        if self.shift is None:
            raise ValueError(f"item {self.key[:12]} has no device-shift function")
        return self if s == 0 else self.shift(float(s), int(salt))
