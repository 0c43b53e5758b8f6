"""Filling a case index: images -> the bundle's box (c, r) -> cases with report text and labels.

Inputs are items that carry an image loader, the report, labels (or None: the report labeler
derives them) and the identifiers known for the image. Producers: a manifest CSV or a phantom
folder (`manifest.csv` inside), and in-memory phantom cases for the evaluation. Identifiers (the
DICOM header's patient name, ID, birth date, accession, UIDs, and the manifest's patient and
study ids) are used for one thing only: scrubbing them out of the report text. They never reach
the store: `index.store.new_case` has no parameter for them.

Items are the data contract training reads too (imagedata: one item type, one manifest reader,
one image loader); the index adds identifiers and a source to them. Boxes come from the bundle's
frozen encoder and box head, computed as models.predictor.Predictor does (the same encoder
forward, pooling and head), through models.features.FeatureExtractor so encoder features are
cached on disk and a rebuild or a second index over the same images is cheap.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import structlog
import torch
from tqdm import tqdm

from dicom_node.identifiers import PATIENT_IDENTIFIERS
from imagedata.item import Item, ManifestError
from imagedata.manifest import MANIFEST
from imagedata.manifest import manifest_items as _manifest_items
from imagedata.phantom_items import phantom_items as _phantom_items
from index.retrieval import CaseIndex
from index.store import Case, StoreError, new_case
from index.vectors import VectorConfig
from models.bundle import Bundle
from models.features import FeatureExtractor

log = structlog.get_logger()

# Header fields whose values are identifiers: scrubbed from report text, never stored. The patient's
# own (dicom_node.identifiers, one list with the failure reasons and de-identification) and those
# that name the study, its images, the institution and the referring physician.
IDENTIFYING_TAGS = (*PATIENT_IDENTIFIERS, "StudyID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                    "InstitutionName", "ReferringPhysicianName")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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


def _identifiers(path: Path) -> tuple[str, ...]:
    """The identifying header values of a DICOM image (none for PNG / JPEG), to scrub from its report."""
    if path.suffix.lower() in _IMAGE_SUFFIXES:
        return ()
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
    except pydicom.errors.InvalidDicomError as exc:
        raise StoreError(f"{path}: not a DICOM, PNG or JPEG image ({exc})") from exc
    return dicom_identifiers(header)


def source_name(text: str) -> str:
    """A usable source name from a folder or column value (letters, digits, space, _ . -)."""
    name = re.sub(r"[^A-Za-z0-9 _.\-]+", "-", text).strip(" -._")[:64]
    return name or "site"


def manifest_items(data: Path, source: str | None = None, split: str | None = None) -> list[Item]:
    """Items of a manifest CSV (or a folder with manifest.csv): path, report, optional labels.

    Label columns that are missing or all blank leave labels to the report labeler. The source is
    `source`, else the row's `site` or `device` column, else the folder's name. `split` keeps only
    rows whose `split` column has that value (an Open-i manifest from model_training.openi.export_manifest
    has one: index the training split, evaluate on the others).
    """
    data = Path(data)
    manifest = data / MANIFEST if data.is_dir() else data
    if not manifest.exists():
        raise StoreError(f"{data}: no {MANIFEST}; give a manifest CSV (path, report, labels) or a phantom folder")
    try:
        items = _manifest_items(manifest, split=split)
    except ManifestError as exc:
        raise StoreError(str(exc)) from exc
    out = []
    for it in items:
        assert it.path is not None  # manifest_items resolves every row's image path
        src = source or source_name(it.site or it.device or manifest.parent.name)
        # The manifest's own identifiers (patient, study, file name) are scrubbed too.
        extra = tuple(v for v in (it.patient_id, it.study_id) if v)
        out.append(dataclasses.replace(it, site=src, identifiers=_identifiers(it.path) + extra + (it.path.stem,)))
    return out


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
        labels = it.label_dict()
        if labels is None:
            if labeler is None:
                raise StoreError("cases without labels need a report labeler (index.labelers)")
            labels = labeler(it.report)
        try:
            cases.append(new_case(it.report, labels, c, r, it.site, identifiers=it.identifiers))
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
    """Items for in-memory phantom cases sampled with `seed` (imagedata.phantom_items: the pixels
    `medsam2-cxr phantoms` writes, keyed with the generator's digest); rendered only on a cache miss."""
    for it in _phantom_items(list(cases), seed, size, shift):
        yield dataclasses.replace(it, site=source or source_name(it.device))


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
