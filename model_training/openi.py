"""The NLM Open-i chest X-ray collection (Indiana University), read as it is distributed.

Reports: ``ecgen-radiology/<n>.xml``, in a ``.tgz``/``.tar`` archive or a folder. Each gives the
report id (``IUXRId``), the sections COMPARISON / INDICATION / FINDINGS / IMPRESSION, the MeSH
``major`` and ``automatic`` tags, and one ``parentImage`` id per image (``CXR<n>_IM-....``).

Patients. The collection is de-identified per report: the metadata CSV's ``Patient ID`` equals
the report number for every image, and no key links two reports of one person. A report (one
study) is therefore one patient here: ``patient_id = "openi-<report id>"``, and the 80/10/10 split
is by report id (:func:`split_of`), which is patient-level as far as the data can tell.

Views (:func:`read_views`, ``nlmcxr_dicom_metadata.csv.gz``): View Position PA/AP -> frontal;
LL/RL/LATERAL/LARGE LATERAL -> lateral; anything else, an empty View Position (2,586 of the
7,469 images) or an image missing from the CSV -> unknown. :func:`frontal_image` returns the
first frontal image of a report; with ``unknown="first"`` it falls back to the first image that is
not known to be lateral when no image is known frontal (on reports whose views are all known,
the first listed image is the frontal one in 465 of 517 two-view studies, 90%); the default,
``unknown="skip"``, leaves such reports out. Report 1 names its images ``CXR1_1_IM-...`` while the
CSV says ``CXR1_IM-...``: ids are matched with that doubled number removed.

Images (:class:`ImageIndex`): PNG (``CXR<n>_IM-....png``, the NLM PNG release; ``<n>_IM-....dcm.png``
and ``<n>_IM-....png``, common re-packagings) or DICOM (``<n>_IM-....dcm`` as in the CSV's
``filename``, or ``CXR<n>_IM-....dcm``), found anywhere under one folder. The images are not on
the development machines; tests make small files with these names.

Labels from MeSH (:func:`mesh_labels`, table :data:`MESH_RULES`, the one mapping; ``label-eval``
prints it): a major tag is ``Term`` or ``Term/qualifier/...``; a rule maps a term, optionally only
with one of some qualifiers (and one of a second set, and none of a third), to labels. It follows
CheXpert's own vocabulary and hierarchy: Lung Lesion includes nodular opacities (MeSH
``Opacity|Density/<lung>/round``), Edema includes vascular congestion and heart failure,
``Lung/hypoinflation`` (low lung volumes) and ``Lung/hyperdistention`` are no CheXpert label. Every label of a tagged report that no rule reaches is 0 (MeSH lists what is there, so a
missing tag means absent); Lung Opacity is also set by its CheXpert children (Edema,
Consolidation, Pneumonia, Atelectasis, Lung Lesion), and No Finding is 1 exactly when no
pathology label (all but Support Devices) is 1, as for the report labelers. Reports tagged
``No Indexing`` get no labels (``None``). MeSH cannot say "uncertain" (no -1 values) and has no
clean term for an enlarged cardiomediastinum (only ``Mediastinum/enlarged|widened|prominent``,
a handful of reports) or for Pleural Other beyond pleural thickening/scarring; it does not name
"Pneumonia" when the report hedges, and "Consolidation" is rare (27 of 2,637 reports): figures for
these labels are weak. Granulomas (``Calcified Granuloma``, ``Granuloma``, ``Granulomatous
Disease``) are benign and are not Lung Lesion (CheXpert's vocabulary does not count them either).
"""

from __future__ import annotations

import csv
import gzip
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_training.split import split_patients
from models.labels import LABELS, OPACITY_CHILDREN, PATHOLOGIES

SECTIONS = ("COMPARISON", "INDICATION", "FINDINGS", "IMPRESSION")
FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LARGE LATERAL", "LAT"})


@dataclass(frozen=True)
class OpenIReport:
    id: str  # IUXRId, e.g. "1"
    comparison: str
    indication: str
    findings: str
    impression: str
    mesh_major: tuple[str, ...]
    mesh_automatic: tuple[str, ...]
    images: tuple[str, ...]  # parentImage ids, as written in the XML

    @property
    def patient_id(self) -> str:
        """One report = one patient (see the module docstring)."""
        return f"openi-{self.id}"

    @property
    def text(self) -> str:
        """FINDINGS and IMPRESSION with their headers: what labelers and manifests carry."""
        parts = [f"{h}: {b}" for h, b in (("FINDINGS", self.findings), ("IMPRESSION", self.impression)) if b]
        return "\n".join(parts)


def parse_report(data: bytes, name: str = "<report>") -> OpenIReport:
    """One ``ecgen-radiology`` XML file; ``ValueError`` names the file when it is not one."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise ValueError(f"{name}: not an XML file ({e})") from None
    rid = root.find("IUXRId")
    if rid is None or not rid.get("id"):
        raise ValueError(f"{name}: no <IUXRId id=...>; not an Open-i ecgen-radiology report")
    sec = dict.fromkeys(SECTIONS, "")
    for el in root.iter("AbstractText"):
        label = (el.get("Label") or "").upper()
        if label in sec:
            sec[label] = " ".join("".join(el.itertext()).split())
    mesh = root.find("MeSH")
    major = tuple((e.text or "").strip() for e in mesh.findall("major")) if mesh is not None else ()
    auto = tuple((e.text or "").strip() for e in mesh.findall("automatic")) if mesh is not None else ()
    images = tuple(i for e in root.findall("parentImage") if (i := e.get("id")))
    return OpenIReport(str(rid.get("id")), sec["COMPARISON"], sec["INDICATION"], sec["FINDINGS"], sec["IMPRESSION"],
                       tuple(t for t in major if t), tuple(t for t in auto if t), images)


def _id_key(r: OpenIReport) -> tuple[int, str]:
    return (int(r.id), r.id) if r.id.isdigit() else (1 << 62, r.id)


def _iter_xml(source: Path) -> Iterator[tuple[str, bytes]]:
    if source.is_dir():
        for p in sorted(source.rglob("*.xml")):
            yield str(p), p.read_bytes()
        return
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such Open-i report archive or folder")
    try:
        tf = tarfile.open(source, "r:*")
    except tarfile.TarError as e:
        raise ValueError(f"{source}: not a tar/tgz archive of Open-i reports ({e})") from None
    with tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".xml"):
                fh = tf.extractfile(m)
                if fh is not None:
                    yield f"{source}:{m.name}", fh.read()


def read_reports(source: str | Path) -> list[OpenIReport]:
    """All reports of an archive (``.tgz``, ``.tar.gz``, ``.tar``) or folder, by numeric id."""
    source = Path(source)
    reports = [parse_report(data, name) for name, data in _iter_xml(source)]
    if not reports:
        raise ValueError(f"{source}: no ecgen-radiology XML reports found")
    return sorted(reports, key=_id_key)


# ---- views --------------------------------------------------------------------------------------

def canonical_image_id(image_id: str) -> str:
    """``CXR1_1_IM-0001-3001`` -> ``CXR1_IM-0001-3001`` (the CSV's spelling); others unchanged."""
    return re.sub(r"^CXR(\d+)_\1_", r"CXR\1_", image_id)


def view_class(view_position: str | None) -> str:
    vp = (view_position or "").strip().upper()
    if vp in FRONTAL_VIEWS:
        return "frontal"
    if vp in LATERAL_VIEWS:
        return "lateral"
    return "unknown"


def read_views(csv_path: str | Path) -> dict[str, str]:
    """image id -> "frontal" / "lateral" / "unknown", from the collection's metadata CSV (.csv/.csv.gz).

    Only ``imageid`` and ``View Position`` are read; the CSV's other columns (it also carries
    de-identified patient fields) are never kept.
    """
    csv_path = Path(csv_path)
    opener = gzip.open if csv_path.suffix == ".gz" else open
    with opener(csv_path, "rt", newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or ())
        if not {"imageid", "View Position"} <= cols:
            raise ValueError(f"{csv_path}: needs columns 'imageid' and 'View Position' (Open-i DICOM metadata CSV)")
        return {row["imageid"].strip(): view_class(row["View Position"]) for row in reader}


def frontal_image(report: OpenIReport, views: dict[str, str], unknown: str = "skip") -> str | None:
    """The report's frontal image id, or None; see the module docstring for ``unknown``."""
    if unknown not in ("skip", "first"):
        raise ValueError(f"unknown={unknown!r}: use 'skip' or 'first'")
    known = [(i, views.get(canonical_image_id(i), "unknown")) for i in report.images]
    for image_id, v in known:
        if v == "frontal":
            return image_id
    if unknown == "first":
        for image_id, v in known:
            if v == "unknown":
                return image_id
    return None


# ---- images -------------------------------------------------------------------------------------

_IMG_NAME = re.compile(r"^(?:CXR)?(\d+)_(?:\1_)?(IM-[\d-]+?)(?:\.dcm)?\.(png|dcm)$", re.IGNORECASE)


class ImageIndex:
    """Image files under a folder, found by Open-i image id whatever naming the release used."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: images folder not found")
        self._by_id: dict[str, Path] = {}
        for p in sorted(self.folder.rglob("*")):
            m = _IMG_NAME.match(p.name)
            if m and p.is_file():
                key = f"CXR{m.group(1)}_{m.group(2)}"
                # prefer PNG over DICOM when both exist (either reads; one is enough)
                if key not in self._by_id or p.suffix.lower() == ".png":
                    self._by_id[key] = p

    def __len__(self) -> int:
        return len(self._by_id)

    def find(self, image_id: str) -> Path | None:
        return self._by_id.get(canonical_image_id(image_id))


# ---- labels from MeSH ---------------------------------------------------------------------------

@dataclass(frozen=True)
class MeshRule:
    term: str  # the part before the first "/", exactly as in the XML
    labels: tuple[str, ...]
    qualifiers: frozenset[str] = frozenset()  # if given, one of them must be present
    also: frozenset[str] = frozenset()  # if given, one of these must be present too
    unless: frozenset[str] = frozenset()  # if one of these is present, the rule does not apply

    def applies(self, quals: set[str]) -> bool:
        return ((not self.qualifiers or bool(quals & self.qualifiers)) and (not self.also or bool(quals & self.also))
                and not quals & self.unless)


def _r(term: str, labels, qualifiers=(), also=(), unless=()) -> MeshRule:
    return MeshRule(term, (labels,) if isinstance(labels, str) else tuple(labels), frozenset(qualifiers),
                    frozenset(also), frozenset(unless))


_LUNGISH = ("lung", "retrocardiac", "costophrenic angle", "pulmonary alveoli", "base", "lower lobe", "upper lobe",
            "middle lobe", "lingula", "apex", "hilum")
MESH_RULES: tuple[MeshRule, ...] = (
    _r("Cardiomegaly", "Cardiomegaly"),
    _r("Cardiac Shadow", "Cardiomegaly", ("enlarged",)),
    _r("Heart", "Cardiomegaly", ("enlarged",)),
    _r("Mediastinum", "Enlarged Cardiomediastinum", ("enlarged", "widened", "prominent")),
    _r("Opacity", "Lung Opacity", _LUNGISH),
    _r("Infiltrate", "Lung Opacity"),
    _r("Airspace Disease", "Lung Opacity"),
    _r("Density", "Lung Opacity", _LUNGISH),
    # "nodular opacity / density" is Lung Lesion in CheXpert's vocabulary; the indexers write it
    # Opacity|Density/<lung site>/round (a reticulonodular, interstitial pattern is not a lesion)
    _r("Opacity", "Lung Lesion", _LUNGISH, ("round",), ("interstitial", "reticular")),
    _r("Density", "Lung Lesion", _LUNGISH, ("round",), ("interstitial", "reticular")),
    _r("Nodule", "Lung Lesion"),
    _r("Mass", "Lung Lesion"),
    _r("Lung Neoplasms", "Lung Lesion"),
    _r("Cavitation", "Lung Lesion"),
    _r("Pulmonary Edema", "Edema"),
    _r("Edema", "Edema"),
    _r("Pulmonary Congestion", "Edema"),
    _r("Heart Failure", "Edema"),  # CheXpert counts heart failure / CHF as Edema
    _r("Consolidation", "Consolidation"),
    _r("Pneumonia", "Pneumonia"),
    _r("Pulmonary Atelectasis", "Atelectasis"),
    _r("Atelectasis", "Atelectasis"),
    _r("Volume Loss", "Atelectasis", ("lung",)),
    _r("Pneumothorax", "Pneumothorax"),
    _r("Hydropneumothorax", ("Pneumothorax", "Pleural Effusion")),
    _r("Hemopneumothorax", ("Pneumothorax", "Pleural Effusion")),
    _r("Pleural Effusion", "Pleural Effusion"),
    _r("Hemothorax", "Pleural Effusion"),
    _r("Costophrenic Angle", "Pleural Effusion", ("blunted",)),
    _r("Sulcus", "Pleural Effusion", ("blunted",)),
    _r("Pleura", "Pleural Effusion", ("blunted",)),
    _r("Thickening", "Pleural Other", ("pleura",)),
    _r("Cicatrix", "Pleural Other", ("pleura",)),
    _r("Pleura", "Pleural Other", ("abnormal", "thickening")),
    _r("Fractures, Bone", "Fracture"),
    _r("Catheters, Indwelling", "Support Devices"),
    _r("Tube, Inserted", "Support Devices"),
    _r("Implanted Medical Device", "Support Devices"),
    _r("Medical Device", "Support Devices"),
    _r("Stents", "Support Devices"),
    _r("Surgical Instruments", "Support Devices"),
)
_RULES_BY_TERM: dict[str, list[MeshRule]] = {}
for _rule in MESH_RULES:
    _RULES_BY_TERM.setdefault(_rule.term.lower(), []).append(_rule)


def mesh_labels(report: OpenIReport) -> dict[str, int] | None:
    """The 14 labels (1/0) from the report's major MeSH tags; None when it is tagged "No Indexing"."""
    tags = [t.split("/") for t in report.mesh_major]
    if not tags or any(t[0].strip().lower() == "no indexing" for t in tags):
        return None
    out = dict.fromkeys(LABELS, 0)
    for parts in tags:
        term = parts[0].strip().lower()
        quals = {q.strip().lower() for q in parts[1:]}
        for rule in _RULES_BY_TERM.get(term, ()):
            if not rule.applies(quals):
                continue
            for label in rule.labels:
                out[label] = 1
    if any(out[k] for k in OPACITY_CHILDREN):
        out["Lung Opacity"] = 1
    out["No Finding"] = int(not any(out[k] for k in PATHOLOGIES))
    return out


# ---- split and manifest -------------------------------------------------------------------------

def split_of(reports: list[OpenIReport], seed: int, fractions=(0.8, 0.1, 0.1)) -> dict[str, str]:
    """report id -> "train" / "val" / "test", patient-level (one report = one patient), by seed."""
    ids = np.array([r.patient_id for r in reports])
    tr, va, te = split_patients(ids, seed, fractions)
    out = {}
    for r, a, b in zip(reports, tr, va):
        out[r.id] = "train" if a else ("val" if b else "test")
    return out


def _manifest_value(v: int | None) -> str:
    return "" if v is None else str(int(v))


@dataclass
class ExportSummary:
    manifest: Path
    rows: int
    reports: int
    no_frontal: int  # reports without a (known) frontal image
    no_file: int  # a frontal image was chosen but no file for it was found
    no_labels: int  # MeSH "No Indexing" (label columns written blank)


def export_manifest(reports: Iterable[OpenIReport], images: str | Path, views: dict[str, str], out: str | Path,
                    seed: int = 0, labeler: Callable[[str], dict] | None = None,
                    unknown: str = "skip") -> ExportSummary:
    """Write a manifest CSV (imagedata.manifest format) for each report's frontal image.

    Columns: path (relative to the manifest), patient_id, study_id, view, split (by ``seed``), the 14
    labels (1 / 0 / -1 / blank = unknown), report (FINDINGS + IMPRESSION). Labels come from MeSH
    unless ``labeler`` (report text -> 14 labels, e.g. ``index.labelers.get_extractor("lexicon")``)
    is given; a labeler's "not mentioned" is written blank, which training masks.
    """
    reports = list(reports)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    index = ImageIndex(images)
    split = split_of(reports, seed)
    rows, no_frontal, no_file, no_labels = [], 0, 0, 0
    for r in reports:
        image_id = frontal_image(r, views, unknown=unknown)
        if image_id is None:
            no_frontal += 1
            continue
        path = index.find(image_id)
        if path is None:
            no_file += 1
            continue
        labels = labeler(r.text) if labeler is not None else mesh_labels(r)
        if labels is None:
            no_labels += 1
            labels = dict.fromkeys(LABELS, None)
        row = {"path": str(Path(_relpath(path, out.parent))), "patient_id": r.patient_id, "study_id": f"openi-{r.id}",
               "view": "frontal", "split": split[r.id]}
        row.update({k: _manifest_value(labels[k]) for k in LABELS})
        row["report"] = r.text
        rows.append(row)
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "patient_id", "study_id", "view", "split", *LABELS, "report"])
        w.writeheader()
        w.writerows(rows)
    return ExportSummary(out, len(rows), len(reports), no_frontal, no_file, no_labels)


def _relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path.resolve(), start.resolve())


__all__ = ["OpenIReport", "parse_report", "read_reports", "read_views", "view_class", "frontal_image",
           "canonical_image_id", "ImageIndex", "MESH_RULES", "mesh_labels", "split_of", "export_manifest",
           "ExportSummary"]
