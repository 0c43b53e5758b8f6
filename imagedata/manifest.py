"""One manifest reader for training and the case index.

A manifest is a CSV; `path` (relative to the CSV) is the only required column. Optional: patient_id,
study_id, the 14 labels (1 / 0 / -1 uncertain / blank), report (else reports/<study_id>.txt beside
the CSV when there is one, as `medsam2-cxr phantoms` writes), split (train / val / test), device,
site. Written by `medsam2-cxr phantoms`, by the Open-i export (model_training.openi), or by a site.
Training additionally requires patient_id and the label columns (`require=TRAINING_COLUMNS`).
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

from imagedata.images import load_image
from imagedata.item import Item, ManifestError, label_values
from models.digests import file_digest
from models.labels import LABELS

MANIFEST = "manifest.csv"
TRAINING_COLUMNS = ("path", "patient_id", *LABELS)


def manifest_path(p: Path) -> Path:
    """The CSV itself, or the manifest.csv inside a folder. FileNotFoundError says what to pass."""
    p = Path(p)
    if p.is_dir():
        if (p / MANIFEST).exists():
            return p / MANIFEST
        raise FileNotFoundError(f"{p}: no {MANIFEST}; pass a manifest CSV, a folder made by `medsam2-cxr "
                                "phantoms`, or phantoms:N[:SEED]")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file; pass a manifest CSV, a folder with {MANIFEST}, or phantoms:N[:SEED]")
    return p


def read_rows(path: Path, require: tuple[str, ...] = ("path",)) -> list[dict]:
    """The rows of a manifest CSV; ManifestError when it is empty or lacks a required column."""
    path = Path(path)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = [c for c in require if rows and c not in rows[0]]
    if not rows or missing:
        raise ManifestError(f"{path}: not a manifest (empty, or missing columns {missing}); expected columns "
                            f"{', '.join(require)}" + ("" if set(LABELS) <= set(require) else
                                                       f", optionally the 14 labels ({', '.join(LABELS)})")
                            + ", report, split, device, site")
    return rows


def manifest_items(path: Path, require: tuple[str, ...] = ("path",), split: str | None = None) -> list[Item]:
    """Items of a manifest CSV or of a folder with manifest.csv, in row order.

    Labels are None for a row whose label cells are all blank or absent. Images load with
    imagedata.images.load_image on demand; the key is the image file's sha256. `split` keeps only
    the rows whose split column has that value (ManifestError when there is no split column).
    """
    m = manifest_path(path)
    rows = read_rows(m, require)
    has_labels = all(k in rows[0] for k in LABELS)
    if split is not None and "split" not in rows[0]:
        raise ManifestError(f"{m}: --split {split} given, but the manifest has no split column")
    items = []
    for i, row in enumerate(rows):
        if split is not None and (row["split"] or "").strip().lower() != split:
            continue
        f = m.parent / row["path"]
        if not f.exists():
            raise FileNotFoundError(f"{m}: row {i + 2}: image {row['path']} not found at {f.resolve()}")
        study = row.get("study_id") or ""
        report = row.get("report") or ""
        if not report and study and (m.parent / "reports" / f"{study}.txt").exists():
            report = (m.parent / "reports" / f"{study}.txt").read_text()
        labels = None
        if has_labels and any((row[k] or "").strip() for k in LABELS):
            labels = label_values(row, f"{m}: row {i + 2}")
        items.append(Item(key=file_digest(f), load=functools.partial(load_image, f), labels=labels,
                          patient_id=row.get("patient_id") or "", study_id=study, report=report,
                          device=row.get("device") or "", site=row.get("site") or "",
                          split=(row.get("split") or "").strip().lower(), path=f))
    return items
