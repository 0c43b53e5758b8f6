"""Filling a case index: images -> the bundle's box (c, r) -> cases with report text and labels.

Inputs are items that carry an image loader, the report, labels (or None: the report labeler
derives them) and the identifiers known for the image. Producers: a manifest CSV or a phantom
folder (`manifest.csv` inside), and in-memory phantom cases for the evaluation. Identifiers (the
DICOM header's patient name, ID, birth date, accession, UIDs, and the manifest's patient and
study ids) are used for one thing only: scrubbing them out of the report text. They never reach
the store: `index.store.new_case` has no parameter for them.

Boxes come from the bundle's frozen encoder and box head, computed as models.predictor.Predictor
does (same preprocessing, pooling and head), through models.train.FeatureExtractor so encoder
features are cached on disk and a rebuild or a second index over the same images is cheap.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import structlog
import torch
from PIL import Image
from tqdm import tqdm

from index.retrieval import CaseIndex
from index.store import Case, StoreError, new_case
from index.vectors import VectorConfig
from models.bundle import Bundle
from models.labels import LABELS
from models.preprocess import read_image
from models.train import FeatureExtractor, image_digest

log = structlog.get_logger()

MANIFEST = "manifest.csv"
# Header fields whose values are identifiers: scrubbed from report text, never stored.
IDENTIFYING_TAGS = ("PatientName", "PatientID", "OtherPatientIDs", "PatientBirthDate", "AccessionNumber", "StudyID",
                    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstitutionName",
                    "ReferringPhysicianName", "IssuerOfPatientID")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Item:
    """One image with its report: what a case is built from, plus identifiers to scrub."""

    key: str  # the image's digest (feature cache key)
    load: Callable[[], np.ndarray]  # -> float image in [0, 1]
    report: str
    labels: dict[str, object] | None  # None: derive from the report with the labeler
    source: str
    identifiers: tuple[str, ...] = ()


@dataclass(frozen=True)
class BuildResult:
    folder: Path
    added: int
    skipped: int
    total: int
    kind: str  # vector index kind in use


def dicom_identifiers(ds: pydicom.Dataset) -> tuple[str, ...]:
    out = []
    for kw in IDENTIFYING_TAGS:
        v = ds.get(kw)
        if v is None:
            continue
        values = v if isinstance(v, (list, pydicom.multival.MultiValue)) else [v]
        out += [str(x) for x in values if str(x)]
    return tuple(out)


def _image_item(path: Path) -> tuple[str, Callable[[], np.ndarray], tuple[str, ...]]:
    """(digest, loader, identifiers) for a DICOM, PNG or JPEG image file."""
    data = path.read_bytes()
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        def load_png() -> np.ndarray:
            with Image.open(path) as im:
                return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        return image_digest(data), load_png, ()
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError as exc:
        raise StoreError(f"{path}: not a DICOM, PNG or JPEG image ({exc})") from exc
    return image_digest(data), (lambda: read_image(pydicom.dcmread(path))), dicom_identifiers(header)


def source_name(text: str) -> str:
    """A usable source name from a folder or column value (letters, digits, space, _ . -)."""
    name = re.sub(r"[^A-Za-z0-9 _.\-]+", "-", text).strip(" -._")[:64]
    return name or "site"


def manifest_items(data: Path, source: str | None = None, split: str | None = None) -> list[Item]:
    """Items of a manifest CSV (or a folder with manifest.csv): path, report, optional labels.

    Label columns that are missing or all blank leave labels to the report labeler. The source is
    `source`, else the row's `site` or `device` column, else the folder's name. `split` keeps only
    rows whose `split` column has that value (an Open-i manifest from models.openi.export_manifest
    has one: index the training split, evaluate on the others).
    """
    data = Path(data)
    manifest = data / MANIFEST if data.is_dir() else data
    if not manifest.exists():
        raise StoreError(f"{data}: no {MANIFEST}; give a manifest CSV (path, report, labels) or a phantom folder")
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "path" not in rows[0]:
        raise StoreError(f"{manifest}: a manifest needs at least the columns path and report")
    if split is not None:
        if "split" not in rows[0]:
            raise StoreError(f"{manifest}: --split {split} given, but the manifest has no split column")
        rows = [r for r in rows if r["split"] == split]
    has_labels = all(k in rows[0] for k in LABELS) if rows else False
    items = []
    for row in rows:
        report = row.get("report") or ""
        if not report and row.get("study_id") and (manifest.parent / "reports" / f"{row['study_id']}.txt").exists():
            report = (manifest.parent / "reports" / f"{row['study_id']}.txt").read_text()
        key, load, idents = _image_item(manifest.parent / row["path"])
        labels = {k: row[k] for k in LABELS} if has_labels and any((row[k] or "").strip() for k in LABELS) else None
        src = source or source_name(row.get("site") or row.get("device") or manifest.parent.name)
        # The manifest's own identifiers (patient, study, file name) are scrubbed too.
        extra = tuple(v for k in ("patient_id", "study_id") if (v := row.get(k)))
        items.append(Item(key, load, report, labels, src, idents + extra + (Path(row["path"]).stem,)))
    return items


def compute_boxes(bundle: Bundle, items: Sequence[Item], cache_dir: Path | None, desc: str = "boxes",
                  batch_size: int = 16, device: str | None = None,
                  on_progress: Callable[[str, int, int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(centers, radii), each (n, d): encoder features (cached, on `device`) -> the bundle's box head."""
    digest = bundle.card["encoder"]["checkpoint_digest"]
    extract = FeatureExtractor(bundle.encoder, bundle.image_size, digest, cache_dir, batch_size=batch_size,
                               device=device, on_progress=on_progress)
    x = extract(((it.key, it.load) for it in items), len(items), desc)
    if not len(items):
        return np.zeros((0, bundle.head.latent_dim), np.float32), np.zeros((0, bundle.head.latent_dim), np.float32)
    with torch.no_grad():
        c, r = bundle.head(torch.as_tensor(x))
    return c.numpy().astype(np.float32), r.numpy().astype(np.float32)


def make_cases(items: Sequence[Item], centers: np.ndarray, radii: np.ndarray,
               labeler: Callable[[str], dict] | None) -> tuple[list[Case], int]:
    """Cases from items and their boxes; returns (cases, skipped) with a reason logged per skip."""
    cases, skipped = [], 0
    for i, (it, c, r) in enumerate(zip(items, centers, radii)):
        labels = it.labels
        if labels is None:
            if labeler is None:
                raise StoreError("cases without labels need a report labeler (index.labelers)")
            labels = labeler(it.report)
        try:
            cases.append(new_case(it.report, labels, c, r, it.source, identifiers=it.identifiers))
        except StoreError as exc:
            skipped += 1
            log.warning("index.case_skipped", item=i, reason=str(exc))
    return cases, skipped


def add_items(index: CaseIndex, bundle: Bundle, items: Sequence[Item], cache_dir: Path | None,
              labeler: Callable[[str], dict] | None, batch: int = 256, progress: bool = True,
              device: str | None = None, on_progress: Callable[[str, int, int], None] | None = None) -> tuple[int, int]:
    """Boxes, cases, append; in blocks so a large build shows progress and keeps memory flat.
    on_progress: ("index cases", done, total) as the encoder goes through the items."""
    index.check(bundle.digest)
    added = skipped = 0
    bar = tqdm(total=len(items), desc="index cases", unit="case", disable=not progress, mininterval=2.0)
    for s in range(0, len(items), batch):
        block = items[s:s + batch]
        report = None if on_progress is None else (
            lambda _desc, done, _total, s=s: on_progress("index cases", s + done, len(items)))
        c, r = compute_boxes(bundle, block, cache_dir, desc="encoder", device=device, on_progress=report)
        cases, sk = make_cases(block, c, r, labeler)
        added += index.add(cases)
        skipped += sk
        bar.update(len(block))
    bar.close()
    return added, skipped


def build_index(out: Path, bundle: Bundle, items: Sequence[Item], cache_dir: Path | None = None,
                labeler: Callable[[str], dict] | None = None, config: VectorConfig = VectorConfig(),
                progress: bool = True, device: str | None = None,
                on_progress: Callable[[str, int, int], None] | None = None) -> BuildResult:
    """A new index folder from items. Raises StoreError when `out` already holds an index."""
    index = CaseIndex.create(out, bundle.digest, bundle.head.latent_dim, config)
    added, skipped = add_items(index, bundle, items, cache_dir, labeler, progress=progress, device=device,
                               on_progress=on_progress)
    return BuildResult(Path(out), added, skipped, len(index), index.vectors.kind)


def add_to_index(folder: Path, bundle: Bundle, items: Sequence[Item], cache_dir: Path | None = None,
                 labeler: Callable[[str], dict] | None = None, config: VectorConfig = VectorConfig(),
                 progress: bool = True) -> BuildResult:
    """Append a site's de-identified cases to an index built with the same bundle."""
    index = CaseIndex.open(folder, config)
    added, skipped = add_items(index, bundle, items, cache_dir, labeler, progress=progress)
    return BuildResult(Path(folder), added, skipped, len(index), index.vectors.kind)


def phantom_items(cases: Iterable, seed: int, size: int = 256, source: str | None = None,
                  shift: float = 0.0) -> Iterator[Item]:
    """Items for in-memory phantom cases (models.phantoms): rendered only on a feature-cache miss."""
    from models import phantoms

    for i, case in enumerate(cases):
        def load(i: int = i, case=case) -> np.ndarray:
            px, meta = phantoms.render(case, seed=seed * 1000003 + i, shift=shift, size=size)
            return read_image(phantoms.to_dicom(px, meta, case, uid_seed=f"index-{seed}"))
        key = image_digest(f"phantom|{seed}|{i}|{case.study_id}|{size}|{shift}".encode())
        idents = (case.patient_id, case.study_id, case.accession, case.birth_date, f"PHANTOM^{case.patient_id}")
        yield Item(key, load, case.report, dict(case.manifest_labels()), source or source_name(case.device), idents)


def run(data: Path, bundle_dir: Path, out: Path, add: bool = False, source: str | None = None,
        cache_dir: Path | None = None, extractor: str = "lexicon", progress: bool = True,
        split: str | None = None) -> dict:
    """What `medsam2-cxr index build` / `index add` do; returns a summary for the command line."""
    from index.labelers import get_extractor
    from models.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    items = manifest_items(data, source, split)
    fn = add_to_index if add else build_index
    res = fn(out, bundle, items, cache_dir=cache_dir, labeler=get_extractor(extractor), progress=progress)
    return {"index": str(res.folder), "added": res.added, "skipped": res.skipped, "cases": res.total,
            "vector_index": res.kind, "bundle_digest": bundle.digest}
