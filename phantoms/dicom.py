"""DICOM and dataset writing: a DX/CR image per case, and `generate`'s folder of images, reports, manifest."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
from pydicom.uid import UID

from models.labels import LABELS
from phantoms.cases import PhantomCase, sample_cases
from phantoms.rendering import render
from phantoms.seeds import render_seed


def _uid(*parts: str) -> UID:
    """Deterministic UUID-derived UID (2.25.<128-bit int>) from the given strings.

    pydicom 3's generate_uid(prefix=None, entropy_srcs=...) ignores entropy_srcs and returns a
    random UUID4, so the same 2.25 form is derived here from a SHA-256 of the sources.
    """
    h = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return UID("2.25." + str(int(h[:32], 16)))


def to_dicom(pixels: np.ndarray, meta: dict, case: PhantomCase, uid_seed: str):
    """A DX (For Presentation) or CR image with deterministic UIDs and dates."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    dx = meta.get("modality", "DX") == "DX"
    sop_class = UID("1.2.840.10008.5.1.4.1.1.1.1" if dx else "1.2.840.10008.5.1.4.1.1.1")
    study_uid = _uid("study", uid_seed, case.patient_id, case.study_id)
    series_uid = _uid("series", uid_seed, case.study_id)
    sop_uid = _uid("sop", uid_seed, case.study_id, case.device, str(meta.get("shift", 0.0)))
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = _uid("medsam2-cxr-phantoms")
    fm.ImplementationVersionName = "PHANTOMS_0_1"
    ds = pydicom.Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "DX" if dx else "CR"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if dx:
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
    ds.Manufacturer = f"Phantom Devices {case.device}"
    ds.ManufacturerModelName = case.device
    ds.InstitutionName = "Phantom General Hospital"
    ds.StationName = "PHANTOM01"
    ds.PatientName = f"PHANTOM^{case.patient_id}"
    ds.PatientID = case.patient_id
    ds.PatientBirthDate = case.birth_date
    ds.PatientSex = case.sex
    ds.AccessionNumber = case.accession[:16]
    ds.StudyID = case.study_id[-16:]
    ds.StudyDate = case.study_date
    ds.SeriesDate = case.study_date
    ds.ContentDate = case.study_date
    ds.StudyTime = "090000"
    ds.SeriesTime = "090000"
    ds.ContentTime = "090000"
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    part = "CHEST" if case.kind == "chest" else (case.nonchest_part or "HAND")
    ds.BodyPartExamined = part
    vp = meta.get("view_position", "PA")
    ds.ViewPosition = vp
    ds.StudyDescription = f"XR {part} {vp}"
    ds.SeriesDescription = f"{part} {vp}"
    ds.PatientOrientation = ["A", "F"] if vp == "LL" else ["L", "F"]
    ds.ImageLaterality = "U"
    ds.BurnedInAnnotation = "YES" if meta.get("burned_in") else "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = meta["photometric"]
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = int(meta["bits_stored"])
    ds.HighBit = int(meta["bits_stored"]) - 1
    ds.PixelRepresentation = 0
    ps = [f"{meta['pixel_spacing'][0]:.4f}", f"{meta['pixel_spacing'][1]:.4f}"]
    ds.PixelSpacing = ps
    ds.ImagerPixelSpacing = ps
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = f"{meta['window_center']:.1f}"
    ds.WindowWidth = f"{meta['window_width']:.1f}"
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = np.ascontiguousarray(pixels.astype("<u2")).tobytes()
    return ds


def generate(n: int, out: Path, seed: int, shift: float = 0.0, view: str = "frontal",
             kind: str = "chest", size: int = 1024, progress: bool = False) -> Path:
    """Write out/images/<id>.dcm, out/reports/<id>.txt and out/manifest.csv (returned)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(parents=True, exist_ok=True)
    cases = sample_cases(n, seed, view=view, kind=kind)
    it = cases
    if progress:
        from tqdm import tqdm
        it = tqdm(cases, desc="phantoms", unit="img")
    rows = []
    for i, case in enumerate(it):
        px, meta = render(case, seed=render_seed(seed, i), shift=shift, size=size)
        ds = to_dicom(px, meta, case, uid_seed=f"{seed}:{shift}:{view}:{kind}")
        rel = f"images/{case.study_id}.dcm"
        ds.save_as(out / rel, enforce_file_format=True)
        (out / "reports" / f"{case.study_id}.txt").write_text(case.report + "\n")
        row = {"path": rel, "patient_id": case.patient_id, "study_id": case.study_id,
               "device": case.device, "shift": shift, "view": view, "kind": kind}
        row.update(case.manifest_labels())
        row["report"] = case.report
        rows.append(row)
    man = out / "manifest.csv"
    with man.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "patient_id", "study_id", "device", "shift",
                                           "view", "kind", *LABELS, "report"])
        w.writeheader()
        w.writerows(rows)
    return man
