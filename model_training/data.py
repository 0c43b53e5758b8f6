"""Data sets for training and evaluation: phantoms, a site's manifest CSV, Open-i; and OOD sets.

Every source yields the same thing: `imagedata.item.Item`s (the contract the case index reads
too) with a cache key, a loader that returns the preprocessed image (float [0, 1], air dark), the
14 labels (training reads them with uncertain and blank masked), the patient id for a
patient-level split, the report, and a way to make a device-shifted copy.

The cache key is the sha256 of the stored image file, or, for phantoms rendered in memory, of
their deterministic recipe (imagedata.phantom_items).

Shift intensity s (0 none, 1 the strongest shift used in training, 2 twice that) means, for
phantoms, the generator's device knob (`phantoms.render(shift=s)`: each device's physics pushed
further from a reference device) and, for other data, the pixel-space `augment.device_shift` at
intensity s. B5 trains on shifted copies with s drawn in [0.3, 1]; the robustness test uses the
same function at 0.5 to 2, so "1" means the same thing in training and test.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

import phantoms
from imagedata.item import Item
from imagedata.manifest import (
    TRAINING_COLUMNS,
    manifest_items,
    manifest_path,
    read_rows,
)
from imagedata.phantom_items import phantom_items as _phantom_items
from model_training import augment
from model_training.split import split_patients
from models.digests import parts_digest

TRAIN_SHIFT_RANGE = (0.3, 1.0)


@dataclass
class OODSet:
    name: str
    description: str
    items: list[Item]


@dataclass
class Dataset:
    name: str
    description: str
    items: list[Item]
    shift_method: str
    ood: dict[str, OODSet] = field(default_factory=dict)
    synthetic: bool = False  # phantoms: no patient data, and figures that say nothing about patients
    split: np.ndarray | None = None  # "train" / "val" / "test" per item when the source fixes it (Open-i export)

    def labels(self) -> np.ndarray:
        """(n, 14) 1 / 0 / nan: uncertain (-1) and blank masked, as CheXpert does."""
        return np.stack([it.known_labels() for it in self.items])

    def patients(self) -> np.ndarray:
        return np.array([it.patient_id for it in self.items])

    def reports(self) -> list[str]:
        return [it.report for it in self.items]

    def split_masks(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) masks: the source's own split when it has one, else patient-level 80/10/10."""
        if self.split is not None:
            return self.split == "train", self.split == "val", self.split == "test"
        return split_patients(self.patients(), seed)


@lru_cache(maxsize=1)
def augment_digest() -> str:
    """Digest of the pixel-shift code: a changed augmentation never reuses a stale cached feature."""
    return parts_digest(inspect.getsource(augment))[:16]


def phantom_items(n: int, seed: int, size: int, view: str = "frontal", kind: str = "chest") -> list[Item]:
    """The same cases and pixels `medsam2-cxr phantoms --n n --seed seed --size size` would write."""
    return _phantom_items(phantoms.sample_cases(n, seed, view=view, kind=kind), seed, size)


def phantom_ood_sets(n: int, seed: int, size: int) -> dict[str, OODSet]:
    """Lateral chest views and non-chest radiographs (hand, pelvis) from the same five devices."""
    return {
        "lateral": OODSet("lateral", f"{n} phantom lateral chest views (seed {seed + 101})",
                          phantom_items(n, seed + 101, size, view="lateral")),
        "nonchest": OODSet("nonchest", f"{n} phantom non-chest radiographs, hand and pelvis (seed {seed + 202})",
                           phantom_items(n, seed + 202, size, kind="nonchest")),
    }


def phantom_dataset(n: int, seed: int = 0, size: int = 512, n_ood: int = 0) -> Dataset:
    return Dataset(
        name=f"phantoms:{n}:{seed}",
        description=(f"{n} synthetic phantom chest radiographs (medsam2-cxr phantoms, seed {seed}, rendered at "
                     f"{size} px), five acquisition devices, patients with 1-3 studies; no patient data"),
        items=phantom_items(n, seed, size),
        shift_method="phantom device knob: phantoms.render(shift=s) extrapolates each device away from a reference",
        ood=phantom_ood_sets(n_ood, seed, size) if n_ood > 0 else {},
        synthetic=True,
    )


# ------------------------------------------------------------------------------------------
# Manifest CSV (a site's own data, a phantoms folder, or Open-i exported by model_training.openi)
# ------------------------------------------------------------------------------------------


def _pixel_shift_item(base: Item, s: float, salt: int) -> Item:
    seed = [int(base.key[:12], 16), salt]

    def load() -> np.ndarray:
        return augment.device_shift(base.load(), np.random.default_rng(seed), intensity=s)

    return dataclasses.replace(base, key=parts_digest("device_shift", augment_digest(), base.key, s, salt), load=load,
                               shift=lambda s2, salt2: _pixel_shift_item(base, s2, salt2))


def training_items(path: Path) -> list[Item]:
    """A manifest's items (patient_id and the 14 label columns required), shifted in pixel space."""
    items = manifest_items(path, require=TRAINING_COLUMNS)
    return [dataclasses.replace(it, shift=functools.partial(_pixel_shift_item, it)) for it in items]


def manifest_dataset(path: Path, ood: dict[str, OODSet] | None = None) -> Dataset:
    m = manifest_path(path)
    items = training_items(m)
    split = None
    if "split" in read_rows(m)[0]:
        split = np.array([it.split for it in items])
        bad = sorted(set(split) - {"train", "val", "test"})
        if bad:
            raise ValueError(f"{m}: column split has values {bad}; expected train, val or test")
    phantom_devices = {d.name for d in phantoms.DEVICES}
    synthetic = all(it.device in phantom_devices for it in items)  # written by `medsam2-cxr phantoms`
    return Dataset(name=str(m), description=f"{len(items)} images from the manifest {m}"
                   + (" (phantoms made by medsam2-cxr phantoms)" if synthetic else ""), items=items,
                   shift_method="pixel-space augment.device_shift at intensity s", ood=ood or {}, synthetic=synthetic,
                   split=split)


def openi_dataset(reports: Path, images: Path, views_csv: Path | None, workdir: Path, seed: int = 0) -> Dataset:
    """Open-i as distributed: model_training.openi picks each report's frontal image, labels it from MeSH and
    splits by patient (seed); its manifest (written into workdir) is then read like any other."""
    from model_training import openi

    views = openi.read_views(views_csv) if views_csv else {}
    summary = openi.export_manifest(openi.read_reports(reports), images, views, Path(workdir) / "openi-manifest.csv",
                                    seed=seed, unknown="skip" if views else "first")
    if not summary.rows:
        raise ValueError(f"{images}: no frontal image found for any of the {summary.reports} reports "
                         f"({summary.no_frontal} without a frontal view, {summary.no_file} without a file)")
    ds = manifest_dataset(summary.manifest)
    ds.name = "openi"
    ds.description = (f"Open-i (NLM, Indiana University): {summary.rows} frontal images of {summary.reports} reports "
                      f"({summary.no_frontal} without a frontal view, {summary.no_file} without an image file, "
                      f"{summary.no_labels} without MeSH labels); labels from MeSH; split by patient, seed {seed}")
    return ds


def manifest_ood(name: str, path: Path) -> OODSet:
    m = manifest_path(path)
    return OODSet(name, f"images from {m}", training_items(m))


# ------------------------------------------------------------------------------------------
# One entry point for the CLI
# ------------------------------------------------------------------------------------------


def load_dataset(spec: str, size: int = 512, n_ood: int = 0, ood: dict[str, Path] | None = None,
                 ood_seed: int = 0, workdir: Path | None = None, split_seed: int = 0) -> Dataset:
    """`phantoms:N[:SEED]`, `openi:REPORTS,IMAGES[,VIEWS_CSV]`, a manifest CSV, or a folder with manifest.csv.

    OOD sets: those named in `ood` (name -> manifest); with none, n_ood phantom lateral and
    non-chest images (synthetic, generated here) when n_ood > 0. Open-i's manifest is written into
    workdir (a new temporary folder when None).
    """
    if spec.startswith("openi:"):
        parts = [p for p in spec[len("openi:"):].split(",") if p]
        if len(parts) not in (2, 3):
            raise ValueError(f"--data {spec!r}: expected openi:REPORTS_TGZ_OR_FOLDER,IMAGES_FOLDER[,METADATA_CSV]")
        import tempfile

        wd = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="medsam2-cxr-openi-"))
        ds = openi_dataset(Path(parts[0]), Path(parts[1]), Path(parts[2]) if len(parts) == 3 else None, wd, split_seed)
    elif spec.startswith("phantoms:"):
        parts = spec.split(":")[1:]
        try:
            n, seed = int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
        except (ValueError, IndexError):
            raise ValueError(f"--data {spec!r}: expected phantoms:N or phantoms:N:SEED, e.g. phantoms:2600:0") from None
        ds = phantom_dataset(n, seed, size, n_ood=0)
        ood_seed = seed
    else:
        ds = manifest_dataset(Path(spec))
    if ood:
        ds.ood = {name: manifest_ood(name, p) for name, p in ood.items()}
    elif n_ood > 0:
        ds.ood = phantom_ood_sets(n_ood, ood_seed, size)
    return ds
