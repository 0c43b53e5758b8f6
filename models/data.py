"""Data sets for training and evaluation: phantoms, a site's manifest CSV, Open-i; and OOD sets.

Every source yields the same thing: `Item`s with a cache key, a loader that returns the
preprocessed image (float [0, 1], air dark), the 14 labels (nan = unknown or uncertain), the
patient id for a patient-level split, the report, and a way to make a device-shifted copy.

The cache key is the sha256 of the stored image file, or, for phantoms rendered in memory, of
their deterministic recipe (generator source code, seed, case, size, shift): rendering an image
only to hash it would cost as much as the cache saves.

Shift intensity s (0 none, 1 the strongest shift used in training, 2 twice that) means, for
phantoms, the generator's device knob (`phantoms.render(shift=s)`: each device's physics pushed
further from a reference device) and, for other data, the pixel-space `augment.device_shift` at
intensity s. B5 trains on shifted copies with s drawn in [0.3, 1]; the robustness test uses the
same function at 0.5 to 2, so "1" means the same thing in training and test.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom

from models import augment, phantom_reports, phantoms
from models.labels import LABELS
from models.preprocess import read_image

TRAIN_SHIFT_RANGE = (0.3, 1.0)


@dataclass(frozen=True)
class Item:
    key: str  # cache key (sha256 hex)
    load: Callable[[], np.ndarray] = field(repr=False)  # -> float32 image in [0, 1]
    labels: np.ndarray = field(repr=False)  # (14,) 1 / 0 / nan
    patient_id: str = ""
    report: str = ""
    device: str = ""
    shift: Callable[[float, int], "Item"] | None = field(default=None, repr=False)  # (s, salt) -> copy

    def shifted(self, s: float, salt: int = 0) -> "Item":
        if self.shift is None:
            raise ValueError(f"item {self.key[:12]} has no device-shift function")
        return self if s == 0 else self.shift(float(s), int(salt))


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
        return np.stack([it.labels for it in self.items])

    def patients(self) -> np.ndarray:
        return np.array([it.patient_id for it in self.items])

    def reports(self) -> list[str]:
        return [it.report for it in self.items]

    def split_masks(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(train, val, test) masks: the source's own split when it has one, else patient-level 80/10/10."""
        if self.split is not None:
            return self.split == "train", self.split == "val", self.split == "test"
        from models.train import split_patients

        return split_patients(self.patients(), seed)


def _sha(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


@lru_cache(maxsize=1)
def phantom_code_digest() -> str:
    """Digest of the generator's source: a changed phantom never reuses a stale cached feature."""
    src = "".join(inspect.getsource(m) for m in (phantoms, phantom_reports, augment))
    return _sha(src)[:16]


# ------------------------------------------------------------------------------------------
# Phantoms, rendered in memory
# ------------------------------------------------------------------------------------------


def _case_labels(case: phantoms.PhantomCase) -> np.ndarray:
    """Hedged findings are uncertain (manifest -1): masked, as CheXpert does."""
    y = np.array([float(case.labels[k]) for k in LABELS])
    for k in case.uncertain:
        y[LABELS.index(k)] = np.nan
    return y


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


def _phantom_item(case: phantoms.PhantomCase, render_seed: int, size: int, shift: float = 0.0) -> Item:
    def load() -> np.ndarray:
        px, meta = phantoms.render(case, seed=render_seed, shift=shift, size=size, mu=_attenuation(case, size))
        return read_image(phantoms.to_dicom(px, meta, case, uid_seed=f"data:{render_seed}:{shift}"))

    return Item(
        key=_sha("phantom", phantom_code_digest(), case.view, case.kind, case.study_id, render_seed, size, shift),
        load=load, labels=_case_labels(case), patient_id=case.patient_id, report=case.report, device=case.device,
        shift=lambda s, salt: _phantom_item(case, render_seed, size, s),
    )


def phantom_items(n: int, seed: int, size: int, view: str = "frontal", kind: str = "chest") -> list[Item]:
    """The same cases and pixels `medsam2-cxr phantoms --n n --seed seed --size size` would write."""
    cases = phantoms.sample_cases(n, seed, view=view, kind=kind)
    return [_phantom_item(c, seed * 1000003 + i, size) for i, c in enumerate(cases)]


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
# Manifest CSV (a site's own data, a phantoms folder, or Open-i exported by models.openi)
# ------------------------------------------------------------------------------------------


def read_any_image(path: Path) -> np.ndarray:
    """A DICOM file through the product's reader, or a PNG/JPEG as 8/16-bit grayscale, to [0, 1]."""
    path = Path(path)
    with path.open("rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        return read_image(pydicom.dcmread(path))
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im.convert("I;16") if im.mode in ("I", "I;16") else im.convert("L"), dtype=np.float32)
    top = 65535.0 if a.max() > 255 else 255.0
    return np.clip(a / top, 0, 1).astype(np.float32)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pixel_shift_item(base: Item, s: float, salt: int) -> Item:
    seed = [int(base.key[:12], 16), salt]

    def load() -> np.ndarray:
        return augment.device_shift(base.load(), np.random.default_rng(seed), intensity=s)

    return Item(key=_sha("device_shift", phantom_code_digest(), base.key, s, salt), load=load, labels=base.labels,
                patient_id=base.patient_id, report=base.report, device=base.device,
                shift=lambda s2, salt2: _pixel_shift_item(base, s2, salt2))


def _label_value(v: str) -> float:
    v = (v or "").strip()
    return float(v) if v in ("0", "1", "0.0", "1.0") else np.nan  # -1 (uncertain) and blank: unknown


def _read_rows(path: Path) -> list[dict]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def manifest_items(path: Path) -> list[Item]:
    """Rows of a manifest CSV: path (relative to the CSV), patient_id, the 14 labels, report."""
    path = Path(path)
    rows = _read_rows(path)
    missing = [c for c in ("path", "patient_id", *LABELS) if rows and c not in rows[0]]
    if not rows or missing:
        raise ValueError(f"{path}: not a manifest (empty, or missing columns {missing}); expected columns "
                         f"path, patient_id, the 14 labels ({', '.join(LABELS)}) and optionally report")
    items = []
    for i, row in enumerate(rows):
        f = (path.parent / row["path"]).resolve()
        if not f.exists():
            raise FileNotFoundError(f"{path}: row {i + 2}: image {row['path']} not found at {f}")
        base = Item(key=_file_digest(f), load=lambda f=f: read_any_image(f),
                    labels=np.array([_label_value(row[k]) for k in LABELS]), patient_id=row["patient_id"],
                    report=row.get("report", "") or "", device=row.get("device", "") or "")
        items.append(Item(key=base.key, load=base.load, labels=base.labels, patient_id=base.patient_id,
                          report=base.report, device=base.device, shift=lambda s, salt, b=base: _pixel_shift_item(b, s, salt)))
    return items


def _manifest_path(p: Path) -> Path:
    p = Path(p)
    if p.is_dir():
        if (p / "manifest.csv").exists():
            return p / "manifest.csv"
        raise FileNotFoundError(f"{p}: no manifest.csv; pass a manifest CSV, a folder made by `medsam2-cxr "
                                "phantoms`, or phantoms:N[:SEED]")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file; pass a manifest CSV, a folder with manifest.csv, or phantoms:N[:SEED]")
    return p


def manifest_dataset(path: Path, ood: dict[str, OODSet] | None = None) -> Dataset:
    m = _manifest_path(path)
    items = manifest_items(m)
    rows = _read_rows(m)
    split = None
    if rows and "split" in rows[0]:
        split = np.array([(r["split"] or "").strip().lower() for r in rows])
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
    """Open-i as distributed: models.openi picks each report's frontal image, labels it from MeSH and
    splits by patient (seed); its manifest (written into workdir) is then read like any other."""
    from models import openi

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
    m = _manifest_path(path)
    return OODSet(name, f"images from {m}", manifest_items(m))


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
