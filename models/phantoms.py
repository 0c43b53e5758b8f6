"""Synthetic phantom radiographs: patients, findings, acquisition devices, DICOM output.

Nothing here is real patient data. A case is a frozen description (patient, labels, finding
parameters, device, report); `render` turns it into stored pixel values via a line-integral
attenuation map mu (I = exp(-mu)) seen through a device model, and `to_dicom` / `generate`
write DX/CR DICOM files, reports and a manifest.

Coordinates: the image spans x, y in [-1, 1] (y down). Anatomy is built in patient coordinates
(X, Y) related to the image by the patient's offset, size and rotation; in the PA view the
patient's right side is on the image left (X < 0).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from models.labels import LABELS
from models.phantom_reports import write_report

__all__ = [
    "Device", "DEVICES", "REFERENCE_DEVICE", "PhantomCase", "sample_cases", "render",
    "to_dicom", "generate", "anatomy_masks", "cardiothoracic_ratio", "manifest_label_value",
]

# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------

_BITS_LADDER = (15, 14, 12, 10)


@dataclass(frozen=True)
class Device:
    """An acquisition device: detector physics, processing and the DICOM it writes."""

    name: str
    modality: str = "DX"  # DX (For Presentation) or CR
    view_position: str = "PA"  # frontal view this device takes (PA room, AP portable)
    gamma: float = 1.0  # display gamma applied to the processed image
    contrast: float = 1.0  # contrast gain around mid-grey
    quantum_noise: float = 0.01  # sigma of the Poisson-like noise, times sqrt(I)
    electronic_noise: float = 0.002  # additive sigma in the transmitted-intensity domain
    blur: float = 0.5  # Gaussian blur sigma in pixels at 1024
    resolution: float = 1.0  # effective resolution (down/up-sampling factor, <= 1)
    matrix_scale: float = 1.0  # stored matrix = size * matrix_scale
    bits_stored: int = 12
    photometric: str = "MONOCHROME2"
    collimation: float = 0.0  # fraction of the field shuttered on each side
    collimation_value: str = "dark"  # "dark" or "bright" borders (in the displayed image)
    marker: str = ""  # "L" / "R" burned-in lead marker, or ""
    text: str = ""  # burned-in text, or ""
    fov_mm: float = 430.0  # field of view across the native image

    def shifted(self, shift: float) -> "Device":
        """Extrapolate the continuous parameters away from REFERENCE_DEVICE.

        shift 0 is the device as-is, 1 the strongest shift used in training, 2 twice that:
        p(s) = p + s * d with d = p - p_ref (multiplicative parameters in log space), and a
        floor on |d| so that a reference-like device still moves. Bit depth steps down the
        ladder 15/14/12/10 once per whole unit of shift. Deterministic.
        """
        if shift == 0:
            return self
        ref = REFERENCE_DEVICE
        s = float(shift)

        def lin(v: float, r: float, floor: float, lo: float, hi: float) -> float:
            d = v - r
            if abs(d) < floor:
                d = floor if d >= 0 else -floor
            return float(np.clip(v + s * d, lo, hi))

        def logm(v: float, r: float, floor: float, lo: float, hi: float) -> float:
            return float(np.exp(lin(math.log(v), math.log(r), floor, math.log(lo), math.log(hi))))

        bits_i = _BITS_LADDER.index(self.bits_stored) if self.bits_stored in _BITS_LADDER else 2
        bits = _BITS_LADDER[min(len(_BITS_LADDER) - 1, bits_i + int(math.floor(s)))]
        return dataclasses.replace(
            self,
            gamma=logm(self.gamma, ref.gamma, 0.12, 0.3, 3.5),
            contrast=logm(self.contrast, ref.contrast, 0.10, 0.3, 3.5),
            quantum_noise=lin(self.quantum_noise, ref.quantum_noise, 0.008, 0.0, 0.2),
            electronic_noise=lin(self.electronic_noise, ref.electronic_noise, 0.002, 0.0, 0.05),
            blur=lin(self.blur, ref.blur, 0.4, 0.0, 8.0),
            resolution=min(1.0, logm(self.resolution, ref.resolution, 0.10, 0.15, 1.0)),
            collimation=lin(self.collimation, ref.collimation, 0.015, 0.0, 0.2),
            bits_stored=bits,
        )


REFERENCE_DEVICE = Device(name="Reference", text="")

DEVICES: tuple[Device, ...] = (
    Device(name="Aurora DR", modality="DX", view_position="PA", gamma=1.0, contrast=1.05,
           quantum_noise=0.012, electronic_noise=0.002, blur=0.5, resolution=1.0,
           matrix_scale=1.0, bits_stored=12, photometric="MONOCHROME2", collimation=0.0,
           marker="R", text="", fov_mm=430.0),
    Device(name="Boreal CR", modality="CR", view_position="PA", gamma=1.35, contrast=0.85,
           quantum_noise=0.025, electronic_noise=0.004, blur=1.3, resolution=0.65,
           matrix_scale=0.75, bits_stored=10, photometric="MONOCHROME1", collimation=0.035,
           collimation_value="bright", marker="L", text="CHEST PA", fov_mm=350.0),
    Device(name="Corvus Mobile", modality="DX", view_position="AP", gamma=0.8, contrast=1.3,
           quantum_noise=0.03, electronic_noise=0.008, blur=0.9, resolution=0.85,
           matrix_scale=0.875, bits_stored=14, photometric="MONOCHROME2", collimation=0.05,
           collimation_value="dark", marker="R", text="PORTABLE AP", fov_mm=430.0),
    Device(name="Delta HiRes", modality="DX", view_position="PA", gamma=1.1, contrast=1.15,
           quantum_noise=0.008, electronic_noise=0.001, blur=0.3, resolution=1.0,
           matrix_scale=1.0, bits_stored=15, photometric="MONOCHROME1", collimation=0.015,
           collimation_value="dark", marker="", text="DH-15", fov_mm=430.0),
    Device(name="Elm CR Legacy", modality="CR", view_position="PA", gamma=0.9, contrast=0.9,
           quantum_noise=0.02, electronic_noise=0.006, blur=1.8, resolution=0.5,
           matrix_scale=0.5, bits_stored=10, photometric="MONOCHROME2", collimation=0.06,
           collimation_value="bright", marker="L", text="ELM", fov_mm=400.0),
)


def _device(name: str, devices=None) -> Device:
    for d in (devices or DEVICES):
        if d.name == name:
            return d
    for d in DEVICES:
        if d.name == name:
            return d
    raise KeyError(f"unknown phantom device {name!r}")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhantomCase:
    patient_id: str
    study_index: int
    labels: dict[str, int]  # the 14 LABELS, 0/1
    uncertain: frozenset[str]  # positive labels the report hedges (manifest writes -1)
    device: str
    view: str  # "frontal" or "lateral"
    kind: str  # "chest" or "nonchest"
    report: str
    study_id: str = ""
    anatomy_seed: int = 0  # stable per patient
    findings: dict = field(default_factory=dict, compare=False)  # how each finding is drawn
    sex: str = "M"
    birth_date: str = "19600101"
    study_date: str = "20200101"
    accession: str = ""
    nonchest_part: str = ""  # "HAND" / "PELVIS" for kind="nonchest"

    @property
    def image_id(self) -> str:
        return self.study_id

    def manifest_labels(self) -> dict[str, int]:
        return {k: manifest_label_value(self, k) for k in LABELS}


def manifest_label_value(case: PhantomCase, label: str) -> int:
    """1 positive, 0 negative, -1 positive but uncertain (hedged in the report)."""
    v = int(case.labels[label])
    return -1 if (v == 1 and label in case.uncertain) else v


def _rng(*parts) -> np.random.Generator:
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


# Findings sampled per study. Co-occurrence: a "heart failure" factor drives cardiomegaly,
# edema and effusion; infection drives pneumonia/consolidation (+ parapneumonic effusion);
# ICU drives support devices (+ atelectasis, effusion); trauma drives fracture (+ pneumothorax).
_LOBES = ("RUL", "RML", "RLL", "LUL", "LINGULA", "LLL")


def _sample_labels(r: np.random.Generator) -> dict[str, int]:
    lab = dict.fromkeys(LABELS, 0)
    if r.random() < 0.30:
        lab["No Finding"] = 1
        return lab
    while True:
        p = dict.fromkeys(LABELS, 0.0)
        chf = r.random() < 0.11
        icu = r.random() < 0.17
        inf = r.random() < 0.065
        trauma = r.random() < 0.04
        p["Support Devices"] = 0.95 if icu else 0.05
        p["Cardiomegaly"] = 0.70 if chf else 0.05
        p["Edema"] = 0.62 if chf else (0.04 if icu else 0.0)
        p["Pleural Effusion"] = 0.55 if chf else 0.085 + 0.08 * icu
        p["Enlarged Cardiomediastinum"] = 0.15 if chf else 0.035
        p["Pneumonia"] = 0.72 if inf else 0.0
        p["Consolidation"] = 0.75 if inf else 0.015
        p["Atelectasis"] = 0.08 + 0.14 * icu + 0.1 * (inf or chf)
        p["Pneumothorax"] = 0.25 if trauma else 0.05 + 0.02 * icu
        p["Fracture"] = 0.80 if trauma else 0.008
        p["Lung Lesion"] = 0.05
        p["Pleural Other"] = 0.03
        for k, v in p.items():
            if k not in ("No Finding", "Lung Opacity") and r.random() < 0.8 * v:
                lab[k] = 1
        if inf and lab["Pleural Effusion"] == 0 and r.random() < 0.15:
            lab["Pleural Effusion"] = 1
        if any(lab[k] for k in LABELS if k != "No Finding"):
            break
        lab = dict.fromkeys(LABELS, 0)
    if any(lab[k] for k in ("Consolidation", "Pneumonia", "Edema", "Atelectasis", "Lung Lesion")):
        lab["Lung Opacity"] = 1
    return lab


def _sample_findings(lab: dict[str, int], r: np.random.Generator) -> tuple[dict, set[str]]:
    """Drawing parameters per positive label, and which positives are low-conspicuity (hedged)."""
    f: dict = {}
    unc: set[str] = set()

    def side() -> str:
        return "right" if r.random() < 0.5 else "left"

    if lab["Cardiomegaly"]:
        f["Cardiomegaly"] = {"ctr": float(r.uniform(0.54, 0.66))}
    if lab["Enlarged Cardiomediastinum"]:
        f["Enlarged Cardiomediastinum"] = {"width": float(r.uniform(0.135, 0.19))}
    if lab["Pleural Effusion"]:
        bil = r.random() < (0.6 if lab["Edema"] or lab["Cardiomegaly"] else 0.3)
        size = str(r.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))
        f["Pleural Effusion"] = {"side": "bilateral" if bil else side(), "size": size}
        if size == "small" and r.random() < 0.35:
            unc.add("Pleural Effusion")
    if lab["Pneumothorax"]:
        size = str(r.choice(["small", "moderate", "large"], p=[0.5, 0.35, 0.15]))
        f["Pneumothorax"] = {"side": side(), "size": size, "apical": bool(r.random() < 0.6)}
        if size == "small" and r.random() < 0.25:
            unc.add("Pneumothorax")
    if lab["Lung Lesion"]:
        n = int(r.choice([1, 1, 1, 2, 3]))
        mass = bool(r.random() < 0.3)
        nods = []
        for _ in range(1 if mass else n):
            rad = float(r.uniform(0.07, 0.11) if mass else r.uniform(0.022, 0.045))
            nods.append({"side": side(), "u": float(r.uniform(0.35, 0.75)),
                         "v": float(r.uniform(0.15, 0.75)), "r": rad,
                         "lobulated": bool(mass and r.random() < 0.6)})
        f["Lung Lesion"] = {"mass": mass, "nodules": nods}
    if lab["Consolidation"] or lab["Pneumonia"]:
        lobe = str(r.choice(_LOBES))
        f["airspace"] = {"lobe": lobe, "extent": float(r.uniform(0.55, 1.0)),
                         "bronchogram": bool(r.random() < 0.5), "seed": int(r.integers(1 << 30))}
        if r.random() < 0.12:
            unc.add("Pneumonia" if lab["Pneumonia"] else "Consolidation")
    if lab["Edema"]:
        f["Edema"] = {"severity": float(r.uniform(0.5, 1.0)), "kerley": bool(r.random() < 0.75)}
    if lab["Atelectasis"]:
        kind = "plate" if r.random() < 0.6 else "lobar"
        f["Atelectasis"] = {"type": kind, "side": side(), "pos": float(r.uniform(0.55, 0.85)),
                            "tilt": float(r.uniform(-0.25, 0.25))}
        if kind == "plate" and r.random() < 0.35:
            unc.add("Atelectasis")
    if lab["Pleural Other"]:
        f["Pleural Other"] = {"type": "plaque" if r.random() < 0.5 else "thickening",
                              "side": "bilateral" if r.random() < 0.5 else side()}
    if lab["Fracture"]:
        f["Fracture"] = {"side": side(), "rib": int(r.integers(3, 9)),
                         "u": float(r.uniform(0.6, 0.9)), "step": float(r.uniform(0.5, 1.0))}
    if lab["Support Devices"]:
        kinds = ["ett", "cvc", "ng", "pacemaker", "ecg"]
        pr = np.array([0.45, 0.5, 0.35, 0.2, 0.5])
        chosen = [k for k, q in zip(kinds, pr) if r.random() < q]
        if not chosen:
            chosen = [str(r.choice(kinds))]
        f["Support Devices"] = {"kinds": chosen, "seed": int(r.integers(1 << 30))}
    return f, unc


_LATERAL_OK = ("Cardiomegaly", "Pleural Effusion", "Support Devices", "Lung Lesion",
               "Consolidation", "Pneumonia", "Edema", "Enlarged Cardiomediastinum")


def sample_cases(n: int, seed: int, devices=DEVICES, view: str = "frontal",
                 kind: str = "chest") -> list[PhantomCase]:
    """n studies from patients with 1-3 studies each (stable anatomy per patient).

    Patient ids are "P" + 4 digits of the seed + a 5-digit counter, so they are unique per seed
    and usable for a patient-level split. Lateral cases keep only findings the lateral phantom
    draws; nonchest cases have all 14 labels 0 (not applicable).
    """
    devices = tuple(devices)
    r = _rng("cases", seed)
    out: list[PhantomCase] = []
    pi = 0
    while len(out) < n:
        pid = f"P{seed % 10000:04d}{pi:05d}"
        pi += 1
        n_st = int(r.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        sex = "F" if r.random() < 0.48 else "M"
        age = int(r.integers(20, 90))
        byear = 2020 - age
        bdate = f"{byear:04d}{int(r.integers(1, 13)):02d}{int(r.integers(1, 29)):02d}"
        anat = int(r.integers(1 << 31))
        dev_home = devices[int(r.integers(len(devices)))]
        part = "HAND" if r.random() < 0.5 else "PELVIS"
        prev = None
        day0 = int(r.integers(0, 1500))
        for k in range(n_st):
            if len(out) >= n:
                break
            dev = dev_home if r.random() < 0.6 else devices[int(r.integers(len(devices)))]
            if prev is not None and r.random() < 0.4:
                lab, fnd, unc = prev  # chronic: unchanged findings
            else:
                lab = _sample_labels(r)
                if kind == "nonchest":
                    lab = dict.fromkeys(LABELS, 0)
                elif view == "lateral":
                    lab = {k2: (v if k2 in _LATERAL_OK else 0) for k2, v in lab.items()}
                    lab["Lung Opacity"] = int(any(lab[x] for x in (
                        "Consolidation", "Pneumonia", "Edema", "Lung Lesion")))
                    lab["No Finding"] = int(not any(lab[x] for x in LABELS if x != "No Finding"))
                fnd, unc = _sample_findings(lab, r)
            prev = (lab, fnd, unc)
            sdate = _date_add(20180101, day0 + 30 * k + int(r.integers(0, 20)))
            study_id = f"{pid}_S{k + 1}"
            acc = f"A{seed % 10000:04d}{len(out):06d}"
            rep_rng = _rng("report", seed, study_id)
            rep = write_report(lab, unc, fnd, rep_rng, view=view, kind=kind, part=part)
            out.append(PhantomCase(
                patient_id=pid, study_index=k, labels=dict(lab), uncertain=frozenset(unc),
                device=dev.name, view=view, kind=kind, report=rep, study_id=study_id,
                anatomy_seed=anat, findings=fnd, sex=sex, birth_date=bdate, study_date=sdate,
                accession=acc, nonchest_part=part if kind == "nonchest" else ""))
    return out


def _date_add(yyyymmdd: int, days: int) -> str:
    import datetime as _dt
    d = _dt.date(yyyymmdd // 10000, yyyymmdd // 100 % 100, yyyymmdd % 100) + _dt.timedelta(days)
    return d.strftime("%Y%m%d")


# --------------------------------------------------------------------------------------------
# Anatomy (frontal)
# --------------------------------------------------------------------------------------------


def _smoothstep(e0: float, e1: float, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@dataclass
class _Anat:
    scale: float
    rot: float
    cx: float
    cy: float
    habitus: float
    wt: float  # inner thoracic half-width (patient units)
    dome_r: float  # right hemidiaphragm dome top Y
    dome_l: float
    ctr: float
    heart_cy: float
    mediast: float
    spine_dx: float
    sex: str
    vessel_seed: int


def _patient_anatomy(case: PhantomCase) -> _Anat:
    r = _rng("anatomy", case.anatomy_seed)
    habitus = float(r.uniform(0, 1))
    insp = float(r.uniform(0, 1))
    rot = float(np.clip(r.normal(0, 2.0), -5, 5))
    dome_r = 0.22 + 0.16 * (1 - insp)
    dome_l = dome_r + float(r.uniform(0.03, 0.07))
    f = case.findings
    ctr = float(r.uniform(0.40, 0.47))
    if "Cardiomegaly" in f:
        ctr = f["Cardiomegaly"]["ctr"]
    mediast = float(r.uniform(0.075, 0.095))
    if "Enlarged Cardiomediastinum" in f:
        mediast = f["Enlarged Cardiomediastinum"]["width"]
    at = f.get("Atelectasis")
    if at and at["type"] == "lobar":  # volume loss: ipsilateral hemidiaphragm elevation
        if at["side"] == "right":
            dome_r -= 0.06
        else:
            dome_l -= 0.06
    return _Anat(scale=float(r.uniform(0.9, 1.04)), rot=math.radians(rot),
                 cx=float(r.normal(0, 0.02)), cy=float(r.normal(0.02, 0.02)), habitus=habitus,
                 wt=float(0.70 + 0.04 * habitus), dome_r=dome_r, dome_l=dome_l, ctr=ctr,
                 heart_cy=float(r.uniform(0.10, 0.16)), mediast=mediast,
                 spine_dx=float(rot / 5 * 0.02), sex=case.sex,
                 vessel_seed=int(r.integers(1 << 30)))


def _grid(size: int, a: _Anat):
    lin = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x = lin[None, :]
    y = lin[:, None]
    c, s = math.cos(a.rot), math.sin(a.rot)
    X = ((x - a.cx) * c + (y - a.cy) * s) / a.scale
    Y = (-(x - a.cx) * s + (y - a.cy) * c) / a.scale
    return X.astype(np.float32), Y.astype(np.float32)


def _to_pix(a: _Anat, X, Y, size: int):
    c, s = math.cos(a.rot), math.sin(a.rot)
    x = a.cx + a.scale * (c * X - s * Y)
    y = a.cy + a.scale * (s * X + c * Y)
    return (x + 1) / 2 * size - 0.5, (y + 1) / 2 * size - 0.5


def _u_lat(a: _Anat, Y):
    return a.wt * np.sqrt(np.clip(1 - ((np.minimum(Y, 0.15) - 0.15) / 0.9) ** 2, 0, 1))


def _y_apex(a: _Anat, u):
    return 0.15 - 0.9 * np.sqrt(np.clip(1 - (u / a.wt) ** 2, 0, 1))


def _dome(a: _Anat, u, right: bool):
    top = a.dome_r if right else a.dome_l
    un = u / a.wt
    return top + 0.20 * np.clip(un - 0.42, 0, None) ** 2 / 0.58 ** 2 + 0.05 * np.clip(0.42 - un, 0, None) ** 2


def _heart(a: _Anat, X, Y):
    """Signed-ish distance (negative inside) of the tilted heart ellipse; and its half-extent."""
    th = math.radians(-28)
    A, B = 1.0, 0.72
    half = math.sqrt(A * A * math.cos(th) ** 2 + B * B * math.sin(th) ** 2)
    k = a.ctr * a.wt / half  # horizontal half-extent = ctr * wt -> width / (2 wt) = ctr
    A, B = A * k, B * k
    hx = 0.17 * 2 * a.ctr * a.wt  # left-bulging: ~1/3 right of midline, ~2/3 left
    dx, dy = X - hx, Y - a.heart_cy
    c, s = math.cos(th), math.sin(th)
    p = dx * c + dy * s
    q = -dx * s + dy * c
    rr = np.sqrt((p / A) ** 2 + (q / B) ** 2)
    return (rr - 1) * B, hx, k * half


def _mediastinum_half(a: _Anat, Y, left: bool):
    m = a.mediast + 0.03 * _smoothstep(-0.35, 0.0, Y)
    if left:  # aortic knob
        m = m + 0.05 * np.exp(-((Y + 0.36) / 0.06) ** 2)
    else:
        m = m + 0.015 * np.exp(-((Y + 0.2) / 0.1) ** 2)
    return m


def _lungs(a: _Anat, X, Y):
    """Per side: (thickness profile 0..1, margin distance field, u)."""
    hd, _, _ = _heart(a, X, Y)
    out = {}
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        u = sgn * (X - a.spine_dx * 0)
        d_lat = _u_lat(a, Y) - u
        d_apex = Y - _y_apex(a, u)
        d_med = u - _mediastinum_half(a, Y, left=(side == "left"))
        d_dia = _dome(a, u, right=(side == "right")) - Y
        d = np.minimum(np.minimum(d_lat, d_apex), np.minimum(d_med, 3.0 * d_dia))
        d = np.minimum(d, hd + 0.005)
        prof = np.sqrt(np.clip(d / 0.10, 0, 1)) * _smoothstep(-0.004, 0.004, d)
        out[side] = (prof.astype(np.float32), d, u, np.minimum(d_lat, d_apex), d_dia)
    return out, hd


def _gauss_field(shape, r: np.random.Generator, scale: int, zoom_to: int):
    """Smooth random field upsampled from a coarse grid."""
    g = r.standard_normal((scale, scale)).astype(np.float32)
    img = Image.fromarray(g, mode="F").resize((zoom_to, zoom_to), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _vessel_tree(a: _Anat, size: int, seed: int, bronchi: bool = False):
    """Branching vessel map (image pixel grid), thick proximal, thin distal."""
    r = np.random.default_rng(seed)
    n = size // 2
    canv = [np.zeros((n, n), np.float32) for _ in range(3)]
    for sgn, hy in ((-1.0, -0.12), (1.0, -0.17)):
        hx = sgn * (0.14 + 0.02)
        ang0 = np.deg2rad(np.linspace(-70, 75, 7) + r.uniform(-8, 8, 7))
        # direction: lateral (sgn) rotated up/down
        px = np.full(7, hx)
        py = np.full(7, hy)
        dirx = sgn * np.cos(ang0)
        diry = np.sin(ang0)
        L = 0.12
        for g in range(7):
            m = px.size
            t = np.linspace(0, 1, 12, dtype=np.float32)[None, :]
            jit = r.normal(0, 0.10, m)
            dx = dirx * np.cos(jit) - diry * np.sin(jit)
            dy = dirx * np.sin(jit) + diry * np.cos(jit)
            lens = L * r.uniform(0.7, 1.2, m)
            qx = px[:, None] + dx[:, None] * lens[:, None] * t
            qy = py[:, None] + dy[:, None] * lens[:, None] * t
            ix, iy = _to_pix(a, qx.ravel(), qy.ravel(), n)
            ix = np.round(ix).astype(np.int64)
            iy = np.round(iy).astype(np.int64)
            ok = (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n)
            w = 0.85 ** g
            np.add.at(canv[min(2, g // 2)], (iy[ok], ix[ok]), w)
            px = px + dx * lens
            py = py + dy * lens
            br = np.deg2rad(r.uniform(18, 34, m))
            nx = np.concatenate([dx * np.cos(br) - dy * np.sin(br), dx * np.cos(-br) - dy * np.sin(-br)])
            ny = np.concatenate([dx * np.sin(br) + dy * np.cos(br), dx * np.sin(-br) + dy * np.cos(-br)])
            px = np.concatenate([px, px])
            py = np.concatenate([py, py])
            dirx, diry = nx, ny
            L *= 0.74
    sig = (2.2, 1.3, 0.8) if not bronchi else (1.4, 0.9, 0.6)
    v = sum(ndimage.gaussian_filter(c, s) * (k / (s + 0.3)) for c, s, k in zip(canv, sig, (1.0, 0.8, 0.5)))
    v = np.asarray(Image.fromarray(v.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    return v / (np.percentile(v[::4, ::4], 99.5) + 1e-6)


def _rib_field(a: _Anat, Y, u, d_lat, frac_height=0.42, fracture=None):
    """Posterior (bright, curved) and anterior (faint, oblique) ribs for one side."""
    un = np.clip(u / a.wt, -0.2, 1.3)
    z = Y - (0.05 * un + 0.26 * np.clip(un, 0, None) ** 3 - 0.03 * np.exp(-((un - 0.25) / 0.2) ** 2))
    y0, sp = -0.80, 0.105
    w = (z - y0)
    kf = w / sp * (1 - 0.12 * np.clip(w, 0, None))
    if fracture is not None:
        rib, uf, step = fracture
        band = np.exp(-((kf - (rib + 0.2)) / 0.5) ** 2)
        kf = kf + step * 0.25 * band * (un > uf)
    k = np.floor(kf)
    fr = kf - k
    p = np.clip(fr / frac_height, 0, 1)
    inside = (fr < frac_height)
    bone = np.where(inside, 0.55 * np.abs(np.sin(np.pi * p)) ** 0.4 + 0.45 * (np.exp(-(p / 0.12) ** 2) + np.exp(-((1 - p) / 0.12) ** 2)), 0.0)
    valid = (k >= 0) & (k < 10) & (un > 0.06) & (d_lat > -0.035)
    bone = bone * valid * _smoothstep(0.04, 0.12, un)
    if fracture is not None:
        rib, uf, _ = fracture
        gap = 1 - np.exp(-((un - uf) * a.wt / 0.006) ** 2) * (np.abs(kf - rib - 0.2) < 0.8)
        bone = bone * gap
    # anterior ribs: from the lateral wall downward-medially, fainter, end at the cartilage
    za = Y - 0.38 * (1 - un)
    ka = (za + 0.62) / 0.125
    fa = ka - np.floor(ka)
    pa = np.clip(fa / 0.32, 0, 1)
    ant = np.where(fa < 0.32, np.abs(np.sin(np.pi * pa)) ** 0.7, 0.0)
    ant = ant * (ka >= 0) * (ka < 6) * (d_lat > -0.03) * _smoothstep(0.3, 0.5, un) * (d_lat > -0.04)
    return bone.astype(np.float32), ant.astype(np.float32)


def _polyline_points(pts, step: float = 0.0015):
    """Dense points along a smooth (Catmull-Rom) curve through control points."""
    pts = np.asarray(pts, np.float64)
    P = np.vstack([pts[0], pts, pts[-1]])
    out = []
    for i in range(1, len(P) - 2):
        p0, p1, p2, p3 = P[i - 1], P[i], P[i + 1], P[i + 2]
        n = max(2, int(np.linalg.norm(p2 - p1) / step))
        t = np.linspace(0, 1, n, endpoint=False)[:, None]
        out.append(0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (-p0 + 3 * p1 - 3 * p2 + p3) * t ** 3))
    out.append(pts[-1:])
    return np.vstack(out)


def _draw_curve(canvas, a: _Anat, pts, value: float, offset: float = 0.0, size: int | None = None):
    size = size or canvas.shape[0]
    q = _polyline_points(pts, step=0.7 / size)
    if offset:
        d = np.gradient(q, axis=0)
        nrm = np.stack([-d[:, 1], d[:, 0]], 1)
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True) + 1e-9
        q = q + offset * nrm
    ix, iy = _to_pix(a, q[:, 0], q[:, 1], size)
    ix = np.round(ix).astype(np.int64)
    iy = np.round(iy).astype(np.int64)
    ok = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
    np.maximum.at(canvas, (iy[ok], ix[ok]), value)


def _support_devices(a: _Anat, X, Y, size: int, spec: dict, dome_l: float):
    r = np.random.default_rng(spec["seed"])
    lines = np.zeros((size, size), np.float32)
    solid = np.zeros((size, size), np.float32)
    for kind in spec["kinds"]:
        if kind == "ett":
            tip = -0.36 + r.uniform(-0.05, 0.05)
            path = [(0.0, -1.15), (0.005, -0.8), (0.0, -0.6), (0.0, tip)]
            for off in (-0.011, 0.011):
                _draw_curve(lines, a, path, 0.45, off)
            _draw_curve(lines, a, path, 0.9, 0.006)
        elif kind == "cvc":
            right = r.random() < 0.7
            sg = -1 if right else 1
            tip = (-0.07, -0.16 + r.uniform(-0.05, 0.06))
            path = [(sg * 0.62, -0.78), (sg * 0.35, -0.66), (sg * 0.12, -0.55), (-0.07, -0.35), tip]
            _draw_curve(lines, a, path, 0.8)
            _draw_curve(lines, a, path, 0.8, 0.0025)
        elif kind == "ng":
            st = dome_l + 0.12
            path = [(0.0, -1.1), (0.01, -0.6), (0.03, 0.0), (0.06, dome_l), (0.22, st), (0.33, st - 0.03)]
            _draw_curve(lines, a, path, 0.7)
            _draw_curve(lines, a, path, 0.7, 0.003)
        elif kind == "pacemaker":
            gx, gy = 0.46 + r.uniform(-0.05, 0.05), -0.62 + r.uniform(-0.03, 0.03)
            box = (np.abs(X - gx) < 0.06) & (np.abs(Y - gy) < 0.04)
            rr = np.maximum(np.abs(X - gx) - 0.045, 0) ** 2 + np.maximum(np.abs(Y - gy) - 0.025, 0) ** 2
            solid += 1.4 * (rr < 0.015 ** 2) * box + 0.6 * ((np.abs(X - gx + 0.02) < 0.012) & (np.abs(Y - gy) < 0.01))
            for tip in ((-0.02, 0.02), (0.14, a.dome_l - 0.02)):
                path = [(gx - 0.04, gy), (0.2, -0.58), (0.02, -0.45), (-0.04, -0.2), tip]
                _draw_curve(lines, a, path, 0.9)
                _draw_curve(lines, a, path, 0.9, 0.002)
                solid += 0.9 * (((X - tip[0]) ** 2 + (Y - tip[1]) ** 2) < 0.008 ** 2)
        elif kind == "ecg":
            spots = [(-0.55, -0.7), (0.55, -0.7), (0.5, 0.3), (-0.5, 0.35), (0.2, 0.45)]
            for (ex, ey) in spots[: int(r.integers(3, 6))]:
                ex += r.uniform(-0.05, 0.05)
                ey += r.uniform(-0.05, 0.05)
                d2 = (X - ex) ** 2 + (Y - ey) ** 2
                solid += 0.5 * ((d2 < 0.018 ** 2) & (d2 > 0.012 ** 2)) + 0.9 * (d2 < 0.005 ** 2)
                path = [(ex, ey), (ex * 1.3 + 0.1, ey + 0.15), (np.sign(ex) * 1.2, ey + 0.3)]
                _draw_curve(lines, a, path, 0.35)
    lines = ndimage.gaussian_filter(lines, 0.8 * size / 1024)
    return lines * 2.5 + solid


def _mu_frontal(case: PhantomCase, size: int, masks: dict | None = None) -> np.ndarray:
    a = _patient_anatomy(case)
    f = case.findings
    X, Y = _grid(size, a)
    lungs, hd = _lungs(a, X, Y)
    r = _rng("texture", case.anatomy_seed, case.study_id)

    # body soft tissue (path length through an elliptic torso, shoulders, neck)
    bw = a.wt + 0.13 + 0.12 * a.habitus
    neck = 0.17 + 0.02 * a.habitus
    sh = _smoothstep(-0.95, -0.74, Y)
    half = neck + (bw - neck) * np.sqrt(np.clip(sh, 0, 1))
    half = half + 0.05 * _smoothstep(-0.8, -0.6, Y) * (1 - _smoothstep(-0.6, -0.2, Y))
    tb = np.sqrt(np.clip(1 - (X / half) ** 2, 0, 1))
    mu = (1.25 + 0.45 * a.habitus) * tb
    arm = np.sqrt(np.clip(1 - ((np.abs(X) - bw - 0.09) / 0.09) ** 2, 0, 1)) * _smoothstep(-0.85, -0.7, Y)
    mu += 0.7 * arm
    hum = ((np.abs(X) - bw + 0.02) ** 2 + ((Y + 0.8) * 0.9) ** 2)
    mu += 0.35 * np.sqrt(np.clip(1 - hum / 0.09 ** 2, 0, 1))
    if a.sex == "F":
        for sg in (-1, 1):
            bx, by = sg * 0.42, 0.22
            e = ((X - bx) / 0.3) ** 2 + ((Y - by) / 0.26) ** 2
            mu += 0.35 * np.sqrt(np.clip(1 - e, 0, 1)) * (Y > by - 0.3)

    # lungs: air replaces tissue; findings refill it (fill in 0..1)
    fill = {s: np.zeros((size, size), np.float32) for s in lungs}
    extra = np.zeros((size, size), np.float32)
    ptx_mask = {s: np.zeros((size, size), np.float32) for s in lungs}

    if "Pleural Effusion" in f:
        e = f["Pleural Effusion"]
        lvl = {"small": 0.06, "moderate": 0.22, "large": 0.45}[e["size"]]
        for s in (("right", "left") if e["side"] == "bilateral" else (e["side"],)):
            prof, d, u, dla, ddia = lungs[s]
            un = u / a.wt
            dome = _dome(a, u, right=(s == "right"))
            yl = (a.dome_r if s == "right" else a.dome_l) + 0.12 - lvl - 0.10 * np.clip(un, 0, 1.1) ** 3
            fl = _smoothstep(yl - 0.04, yl + 0.03, Y) * (Y < dome + 0.02)
            fill[s] = np.maximum(fill[s], 0.95 * fl)
            # fluid in the costophrenic recess, continuous with the subdiaphragmatic density
            extra += 0.25 * fl * _smoothstep(-0.02, 0.03, dla) * (d > -0.05)

    if "Pneumothorax" in f:
        pt = f["Pneumothorax"]
        g0 = {"small": 0.035, "moderate": 0.08, "large": 0.16}[pt["size"]]
        prof, d, u, dla, ddia = lungs[pt["side"]]
        top = _smoothstep(0.0, 0.5, ddia)
        g = g0 * (1.3 if pt["apical"] else 0.9) * np.sqrt(top)
        if pt["apical"]:
            g = g * (1 - 0.5 * _smoothstep(-0.4, 0.0, Y))
        space = (dla < g) & (d > 0)
        ptx_mask[pt["side"]] = space.astype(np.float32)
        line = np.exp(-((dla - g) / 0.0025) ** 2) * (d > 0) * (g > 0.01)
        extra += 0.18 * line
        fill[pt["side"]] = np.maximum(fill[pt["side"]], 0.12 * ((dla > g) & (dla < g + 0.08)))

    if "airspace" in f:
        sp = f["airspace"]
        lobe = sp["lobe"]
        s = "right" if lobe[0] == "R" else "left"
        prof, d, u, dla, ddia = lungs[s]
        un = u / a.wt
        dome = a.dome_r if s == "right" else a.dome_l
        cu, cv, ru, rv = {"RUL": (0.5, -0.42, 0.3, 0.22), "RML": (0.35, 0.0, 0.3, 0.14),
                          "RLL": (0.55, dome - 0.12, 0.32, 0.18), "LUL": (0.5, -0.42, 0.3, 0.22),
                          "LINGULA": (0.6, -0.02, 0.26, 0.14), "LLL": (0.55, dome - 0.12, 0.3, 0.18)}[lobe]
        ext = sp["extent"]
        rr = ((un - cu) / (ru * ext)) ** 2 + ((Y - cv) / (rv * ext)) ** 2
        rs = np.random.default_rng(sp["seed"])
        nz = _gauss_field(None, rs, 14, size)
        patch = np.clip(1.25 * np.exp(-rr ** 1.5) + 0.35 * nz - 0.25, 0, 1)
        if lobe == "RUL":  # bounded below by the minor fissure
            patch = patch * (1 - _smoothstep(-0.13, -0.11, Y))
        if sp["bronchogram"]:
            br = _vessel_tree(a, size, sp["seed"], bronchi=True)
            patch = patch * (1 - 0.6 * np.clip(br * 2, 0, 1) * (patch > 0.5))
        fill[s] = np.maximum(fill[s], 0.9 * patch)

    if "Edema" in f:
        ed = f["Edema"]
        nz = _gauss_field(None, r, 20, size)
        for s, sg, hy in (("right", -1, -0.1), ("left", 1, -0.12)):
            prof, d, u, dla, ddia = lungs[s]
            haze = ed["severity"] * 0.6 * np.exp(-(((u - 0.16) / 0.3) ** 2 + ((Y - hy) / 0.33) ** 2))
            haze = haze * (0.8 + 0.25 * nz) + 0.1 * ed["severity"] * _smoothstep(-0.3, 0.3, Y)
            fill[s] = np.maximum(fill[s], np.clip(haze, 0, 0.75))
            if ed["kerley"]:
                kl = np.zeros((size, size), np.float32)
                rk = _rng("kerley", case.study_id, s)
                dome = a.dome_r if s == "right" else a.dome_l
                for _ in range(int(rk.integers(8, 16))):
                    yk = dome - rk.uniform(0.04, 0.28)
                    uo = float(_u_lat(a, np.float32(yk)))
                    ln = rk.uniform(0.03, 0.06)
                    _draw_curve(kl, a, [(sg * (uo - 0.004), yk), (sg * (uo - ln), yk + rk.uniform(-0.004, 0.004))], 1.0)
                extra += 0.10 * ndimage.gaussian_filter(kl, 0.7 * size / 1024) * (d > 0)

    if "Atelectasis" in f:
        at = f["Atelectasis"]
        s = at["side"]
        prof, d, u, dla, ddia = lungs[s]
        dome = a.dome_r if s == "right" else a.dome_l
        if at["type"] == "plate":
            yc = dome - 0.08 - 0.12 * (1 - at["pos"]) + at["tilt"] * (u / a.wt - 0.5) * 0.2
            band = np.exp(-((Y - yc) / 0.009) ** 2) * _smoothstep(0.2, 0.3, u / a.wt) * (1 - _smoothstep(0.75, 0.85, u / a.wt))
            fill[s] = np.maximum(fill[s], 0.95 * band)
        else:  # lower-lobe collapse: triangular retrocardiac / paraspinal opacity
            un = u / a.wt
            tri = (un < 0.45 - 0.9 * (dome - Y) * 0.8) & (Y > dome - 0.4)
            tri = ndimage.gaussian_filter(tri.astype(np.float32), 2 * size / 1024)
            fill[s] = np.maximum(fill[s], 0.85 * tri)

    if "Lung Lesion" in f:
        for nd in f["Lung Lesion"]["nodules"]:
            s = nd["side"]
            sg = -1 if s == "right" else 1
            dome = a.dome_r if s == "right" else a.dome_l
            ny = -0.6 + nd["v"] * (dome - 0.1 + 0.6)
            nx = sg * nd["u"] * float(_u_lat(a, np.float32(ny)))
            rad = nd["r"]
            dx, dy = X - nx, Y - ny
            rho = np.sqrt(dx * dx + dy * dy)
            if nd["lobulated"]:
                ang = np.arctan2(dy, dx)
                rad = rad * (1 + 0.12 * np.sin(3 * ang + 1.0) + 0.07 * np.sin(5 * ang))
            sph = np.sqrt(np.clip(1 - (rho / rad) ** 2, 0, 1)) * _smoothstep(rad + 0.002, rad - 0.002, rho)
            extra += 0.9 * sph * nd["r"] / 0.05 * 0.6 + 0.25 * sph

    if "Pleural Other" in f:
        po = f["Pleural Other"]
        for s in (("right", "left") if po["side"] == "bilateral" else (po["side"],)):
            prof, d, u, dla, ddia = lungs[s]
            if po["type"] == "thickening":
                th = 0.022 * (0.6 + 0.4 * np.sin(Y * 9.0 + (s == "left")))
                band = _smoothstep(th + 0.004, th, dla) * (dla > -0.01) * _smoothstep(-0.5, -0.3, Y) * (ddia > 0.02)
                extra += 0.35 * band
            else:
                rp = _rng("plaque", case.study_id, s)
                sg = -1 if s == "right" else 1
                for _ in range(int(rp.integers(2, 5))):
                    py_ = rp.uniform(-0.35, 0.15)
                    px_ = sg * (float(_u_lat(a, np.float32(py_))) - 0.012)
                    e = ((X - px_) / 0.012) ** 2 + ((Y - py_) / rp.uniform(0.04, 0.08)) ** 2
                    extra += 0.6 * (e < 1) * (0.7 + 0.3 * np.cos(40 * Y))
                dome = a.dome_r if s == "right" else a.dome_l
                cu = rp.uniform(0.35, 0.6)
                e = ((sg * X - cu * a.wt) / 0.07) ** 2 + ((Y - dome - 0.005) / 0.009) ** 2
                extra += 0.6 * (e < 1)

    # combine the lungs
    vess = _vessel_tree(a, size, a.vessel_seed)
    air = np.zeros((size, size), np.float32)
    tissue = np.zeros((size, size), np.float32)
    for s, (prof, d, u, dla, ddia) in lungs.items():
        heart_over = _smoothstep(0.03, -0.05, hd)
        lung_t = prof * (1 - 0.55 * heart_over)
        air += 1.05 * lung_t * (1 - fill[s]) * (1 + 0.07 * ptx_mask[s])
        vm = vess * _smoothstep(0.0, 0.03, d) * (1 - ptx_mask[s]) * (1 - 0.8 * fill[s])
        tissue += 0.16 * np.clip(vm, 0, 1.5)
    mu = mu - air + tissue + extra
    # hila (pulmonary arteries)
    for hx, hy in ((-0.15, -0.1), (0.15, -0.16)):
        mu += 0.12 * np.exp(-(((X - hx) / 0.05) ** 2 + ((Y - hy) / 0.1) ** 2))

    # heart and great vessels add a little density over the mediastinum
    mu += 0.05 * _smoothstep(0.02, -0.06, hd)
    # trachea and main bronchi (air)
    tr = np.exp(-(X / 0.022) ** 4) * _smoothstep(-1.0, -0.9, Y) * (1 - _smoothstep(-0.34, -0.3, Y))
    for sg in (-1, 1):
        bx = X - sg * 0.25 * (Y + 0.32) * (-1)
        tr += np.exp(-(bx / 0.016) ** 4) * _smoothstep(-0.34, -0.3, Y) * (1 - _smoothstep(-0.2, -0.14, Y))
    mu -= 0.22 * np.clip(tr, 0, 1)
    # gastric bubble
    gb = ((X - 0.3) / 0.1) ** 2 + ((Y - a.dome_l - 0.09) / 0.05) ** 2
    mu -= 0.25 * np.sqrt(np.clip(1 - gb, 0, 1)) * (Y > a.dome_l + 0.06)

    # bones: spine, ribs, clavicles, scapulae
    xs = X - a.spine_dx
    sp_w = 0.06 + 0.015 * _smoothstep(-0.8, 0.6, Y)
    body = np.exp(-(xs / sp_w) ** 6)
    per = np.cos(2 * np.pi * (Y + 0.9) / (0.075 + 0.02 * _smoothstep(-0.8, 0.8, Y)))
    vert = body * (0.8 + 0.08 * per) + 0.12 * np.exp(-(xs / 0.012) ** 2) * (per > 0.3)
    vert += 0.12 * (np.exp(-((np.abs(xs) - sp_w * 0.75) / 0.014) ** 2)) * (per > 0.2)
    mu += 0.30 * vert * _smoothstep(-1.0, -0.85, Y)
    fx = f.get("Fracture")
    for s, (prof, d, u, dla, ddia) in lungs.items():
        frac = (fx["rib"], fx["u"], fx["step"]) if fx and fx["side"] == s else None
        post, ant = _rib_field(a, Y, u, _u_lat(a, Y) - u, fracture=frac)
        mu += 0.17 * post + 0.06 * ant
        uc = u - 0.04
        yc = -0.60 - 0.16 * uc + 0.025 * np.sin(2 * np.pi * uc / 0.55)
        clav = np.exp(-((Y - yc) / 0.026) ** 4) * _smoothstep(-0.01, 0.02, uc) * (1 - _smoothstep(0.5, 0.55, uc))
        mu += 0.28 * clav
        sc = ((u - a.wt - 0.02) / 0.09) ** 2 + ((Y + 0.45) / 0.3) ** 2
        mu += 0.12 * np.sqrt(np.clip(1 - sc, 0, 1))

    # anatomical noise
    mu += 0.03 * _gauss_field(None, r, 48, size)

    if "Support Devices" in f:
        mu += _support_devices(a, X, Y, size, f["Support Devices"], a.dome_l)

    if masks is not None:
        masks["heart"] = (hd < 0) & (Y < a.dome_l + 0.05)
        masks["lungs"] = (lungs["right"][1] > 0) | (lungs["left"][1] > 0)
        masks["thorax_half_width"] = a.wt
    return mu.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Lateral and nonchest phantoms
# --------------------------------------------------------------------------------------------


def _mu_lateral(case: PhantomCase, size: int) -> np.ndarray:
    a = _patient_anatomy(case)
    f = case.findings
    X, Y = _grid(size, a)  # X: anterior (-) to posterior (+)
    r = _rng("texture-lat", case.anatomy_seed, case.study_id)
    bd = 0.62 + 0.12 * a.habitus
    half = bd * np.sqrt(np.clip(_smoothstep(-1.05, -0.6, Y), 0.15, 1))
    cxb = 0.02
    tb = np.sqrt(np.clip(1 - ((X - cxb) / half) ** 2, 0, 1))
    mu = 2.4 * tb
    # lungs: one large lucent region (both lungs superimposed)
    dome = a.dome_r + 0.02
    dia = dome + 0.32 * ((X + 0.05) / 0.6) ** 2 * (X > -0.05) + 0.12 * ((X + 0.05) / 0.6) ** 2 * (X <= -0.05)
    e = ((X - 0.02) / 0.55) ** 2 + ((Y + 0.05) / 0.78) ** 2
    lung = (e < 1) & (Y < dia)
    dist = np.minimum(1 - e, (dia - Y) * 3)
    prof = np.sqrt(np.clip(dist / 0.3, 0, 1)) * lung
    th = math.radians(35)
    hxc, hyc = -0.18, a.heart_cy + 0.08
    hk = a.ctr / 0.44
    p = (X - hxc) * math.cos(th) + (Y - hyc) * math.sin(th)
    q = -(X - hxc) * math.sin(th) + (Y - hyc) * math.cos(th)
    heart = np.sqrt((p / (0.3 * hk)) ** 2 + (q / (0.22 * hk)) ** 2)
    hmask = _smoothstep(1.02, 0.96, heart)
    fill = np.zeros_like(X)
    extra = np.zeros_like(X)
    if "Pleural Effusion" in f:
        lvl = {"small": 0.05, "moderate": 0.18, "large": 0.35}[f["Pleural Effusion"]["size"]]
        yl = dome + 0.3 - lvl - 0.18 * np.clip(X, 0, 1)
        fill = np.maximum(fill, 0.9 * _smoothstep(yl - 0.03, yl + 0.03, Y) * (X > 0.0))
    if "airspace" in f:
        rr = ((X - 0.2) / 0.22) ** 2 + ((Y - 0.05) / 0.18) ** 2
        fill = np.maximum(fill, 0.8 * np.clip(1.3 * np.exp(-rr ** 1.5) + 0.3 * _gauss_field(None, r, 12, size) - 0.3, 0, 1))
    if "Edema" in f:
        fill = np.maximum(fill, 0.4 * np.exp(-((X / 0.35) ** 2 + ((Y + 0.05) / 0.3) ** 2)))
    if "Lung Lesion" in f:
        nd = f["Lung Lesion"]["nodules"][0]
        rho = np.sqrt((X - 0.1 - 0.3 * (nd["u"] - 0.5)) ** 2 + (Y + 0.5 - nd["v"] * 0.6) ** 2)
        extra += 0.6 * np.sqrt(np.clip(1 - (rho / nd["r"]) ** 2, 0, 1))
    mu -= 1.5 * prof * (1 - 0.6 * hmask) * (1 - fill)
    mu += 0.2 * hmask
    # trachea
    tx = -0.05 + 0.12 * (Y + 1.0)
    mu -= 0.25 * np.exp(-((X - tx) / 0.03) ** 4) * (Y < -0.2)
    # spine: vertebral bodies posterior with disc spaces
    sx = 0.48 - 0.05 * (Y + 1) * (1 - Y) * 0.5
    per = np.cos(2 * np.pi * (Y + 0.9) / 0.085)
    vb = np.exp(-((X - sx) / 0.075) ** 6) * (0.75 + 0.25 * (per > -0.7))
    mu += 0.55 * vb + 0.25 * np.exp(-((X - sx - 0.12) / 0.03) ** 2) * (per > 0)
    # sternum anterior
    stx = -0.55 + 0.08 * (Y + 0.6)
    mu += 0.4 * np.exp(-((X - stx) / 0.02) ** 2) * _smoothstep(-0.65, -0.55, Y) * (1 - _smoothstep(0.1, 0.15, Y))
    # ribs: faint oblique bands
    rb = np.cos(2 * np.pi * (Y - 0.35 * X) / 0.11)
    mu += 0.06 * (rb > 0.5) * lung
    # arms raised over the upper chest
    mu += 0.5 * np.exp(-(((X + 0.25) / 0.18) ** 2 + ((Y + 0.85) / 0.12) ** 2))
    mu += extra + 0.03 * _gauss_field(None, r, 48, size)
    if "Support Devices" in f:
        lines = np.zeros((size, size), np.float32)
        _draw_curve(lines, a, [(-0.08, -1.1), (0.0, -0.6), (0.05, -0.35)], 0.9)
        _draw_curve(lines, a, [(0.1, -1.1), (0.2, -0.3), (0.3, 0.2), (0.1, dome + 0.15)], 0.8)
        mu += 2.0 * ndimage.gaussian_filter(lines, 0.8 * size / 1024)
    return mu.astype(np.float32)


def _capsule(X, Y, p0, p1, rad):
    p0 = np.asarray(p0, np.float32)
    p1 = np.asarray(p1, np.float32)
    d = p1 - p0
    t = np.clip(((X - p0[0]) * d[0] + (Y - p0[1]) * d[1]) / float(d @ d), 0, 1)
    dist = np.sqrt((X - p0[0] - t * d[0]) ** 2 + (Y - p0[1] - t * d[1]) ** 2)
    outer = np.sqrt(np.clip(1 - (dist / rad) ** 2, 0, 1)) * rad
    inner = np.sqrt(np.clip(1 - (dist / (0.55 * rad)) ** 2, 0, 1)) * 0.55 * rad
    return (outer - 0.7 * inner) / 0.03, dist


def _mu_nonchest(case: PhantomCase, size: int) -> np.ndarray:
    a = _patient_anatomy(case)
    n = size // 2
    X, Y = _grid(n, a)
    mu = np.zeros((n, n), np.float32)
    if case.nonchest_part == "HAND":
        soft = np.zeros((n, n), np.float32)
        bone = np.zeros((n, n), np.float32)
        soft += np.sqrt(np.clip(1 - ((X / 0.42) ** 2 + ((Y - 0.35) / 0.38) ** 2), 0, 1))
        soft += np.sqrt(np.clip(1 - (X / 0.28) ** 2, 0, 1)) * (Y > 0.6)
        fingers = [(-0.42, -0.05, 0.6, 4), (-0.2, -0.55, 0.0, 3), (0.0, -0.65, 0.0, 3),
                   (0.2, -0.58, 0.0, 3), (0.36, -0.4, -0.05, 3)]
        for i, (fx, fy, tilt, _) in enumerate(fingers):
            base = np.array([0.06 * (i - 2), 0.45])
            tip = np.array([fx, fy])
            if i == 0:
                base = np.array([-0.16, 0.48])
            seg = tip - base
            knots = [0.0, 0.42, 0.68, 0.86, 1.0] if i else [0.0, 0.45, 0.75, 1.0]
            for j in range(len(knots) - 1):
                p0 = base + seg * (knots[j] + 0.012)
                p1 = base + seg * (knots[j + 1] - 0.012)
                rad = 0.035 * (1 - 0.35 * knots[j])
                b, dist = _capsule(X, Y, p0, p1, rad)
                bone += b
                st, _ = _capsule(X, Y, p0, p1, rad * 2.0)
                soft += 0.5 * st
        rs = _rng("carpals", case.anatomy_seed)
        for k in range(8):
            cxp, cyp = -0.12 + 0.08 * (k % 4), 0.5 + 0.07 * (k // 4)
            b, _ = _capsule(X, Y, (cxp, cyp), (cxp + 0.01, cyp + 0.01), 0.04 + 0.005 * rs.random())
            bone += 0.8 * b
        for bx in (-0.1, 0.12):
            b, _ = _capsule(X, Y, (bx, 0.64), (bx * 1.1, 1.2), 0.07 if bx < 0 else 0.05)
            bone += b
        mu = 0.9 * soft + 0.8 * bone
    else:  # abdomen / pelvis AP
        tb = np.sqrt(np.clip(1 - (X / 0.9) ** 2, 0, 1))
        mu = 2.3 * tb
        for sg in (-1, 1):
            il = ((X - sg * 0.42) / 0.3) ** 2 + ((Y + 0.15) / 0.32) ** 2
            mu += 0.35 * np.sqrt(np.clip(1 - il, 0, 1)) * (Y < 0.15) + 0.25 * np.exp(-((np.sqrt(il) - 1) / 0.04) ** 2) * (Y < 0.15)
            fh = ((X - sg * 0.5) ** 2 + (Y - 0.3) ** 2) / 0.1 ** 2
            mu += 0.45 * np.sqrt(np.clip(1 - fh, 0, 1))
            b, _ = _capsule(X, Y, (sg * 0.5, 0.3), (sg * 0.62, 1.2), 0.075)
            mu += 0.3 * b
            ob = ((X - sg * 0.22) / 0.1) ** 2 + ((Y - 0.45) / 0.13) ** 2
            mu -= 0.2 * np.sqrt(np.clip(1 - ob, 0, 1))
        sac = (X / 0.13) ** 2 + ((Y + 0.05) / 0.22) ** 2
        mu += 0.35 * np.sqrt(np.clip(1 - sac, 0, 1))
        per = np.cos(2 * np.pi * (Y + 1) / 0.17)
        mu += 0.45 * np.exp(-(X / 0.09) ** 6) * (Y < -0.3) * (0.8 + 0.2 * (per > -0.6))
        rg = _rng("bowel", case.anatomy_seed, case.study_id)
        gas = _gauss_field(None, rg, 24, n)
        mu -= 0.2 * np.clip(gas - 0.9, 0, 1) * (Y < 0.2)
    mu = np.asarray(Image.fromarray(mu.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    return mu


# --------------------------------------------------------------------------------------------
# Rendering through a device
# --------------------------------------------------------------------------------------------


def _text_mask(text: str, height: int) -> np.ndarray:
    font = ImageFont.load_default()
    l, t, r_, b = font.getbbox(text)
    im = Image.new("L", (max(1, r_ - l + 2), max(1, b - t + 2)), 0)
    ImageDraw.Draw(im).text((1 - l, 1 - t), text, fill=255, font=font)
    k = max(1, height // im.size[1])
    return np.kron(np.asarray(im) > 127, np.ones((k, k), bool))


def _paste(img: np.ndarray, mask: np.ndarray, y: int, x: int, value: float):
    h, w = mask.shape
    H, W = img.shape
    y = max(0, min(H - h, y))
    x = max(0, min(W - w, x))
    sub = img[y:y + h, x:x + w]
    sub[mask[: sub.shape[0], : sub.shape[1]]] = value


def _resize(a: np.ndarray, n: int, resample=Image.BILINEAR) -> np.ndarray:
    if a.shape[0] == n:
        return a
    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((n, n), resample), dtype=np.float32)


def attenuation(case: PhantomCase, size: int = 1024) -> np.ndarray:
    """The line-integral attenuation map mu (before the device)."""
    if case.kind == "nonchest":
        return _mu_nonchest(case, size)
    # smooth anatomy is computed on a half-resolution grid and interpolated (speed); detector
    # noise, blur and quantisation are applied at full resolution in `render`.
    n = size // 2 if size >= 512 else size
    mu = _mu_lateral(case, n) if case.view == "lateral" else _mu_frontal(case, n)
    return _resize(mu, size, Image.BICUBIC)


def anatomy_masks(case: PhantomCase, size: int = 512) -> dict:
    """Heart and lung masks of a frontal chest case (native grid), for tests and checks."""
    masks: dict = {}
    _mu_frontal(case, size, masks)
    return masks


def cardiothoracic_ratio(case: PhantomCase, size: int = 512) -> float:
    """Max horizontal heart width over max inner thoracic width, measured on the masks."""
    m = anatomy_masks(case, size)

    def width(mask):
        cols = np.where(mask.any(axis=0))[0]
        rows_w = [np.ptp(np.where(row)[0]) + 1 for row in mask if row.any()]
        return max(rows_w) if rows_w else 0

    thor = m["lungs"]
    # inner thoracic width: widest extent across both lungs on one row
    tw = 0
    for row in thor:
        idx = np.where(row)[0]
        if idx.size:
            tw = max(tw, idx[-1] - idx[0] + 1)
    return float(width(m["heart"]) / max(tw, 1))


def render(case: PhantomCase, seed: int, shift: float = 0.0, size: int = 1024,
           devices=None, mu: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Stored pixel values (uint16 within BitsStored) and their metadata.

    mu: `attenuation(case, size)` when the caller already has it (shifted copies of one case
    share it; it is most of the cost).
    """
    dev = _device(case.device, devices).shifted(shift)
    mu = attenuation(case, size) if mu is None else mu
    r = _rng("render", seed, case.study_id)
    sc = size / 1024
    I = np.exp(-mu)
    if dev.blur > 0:
        I = ndimage.gaussian_filter(I, dev.blur * sc, truncate=3.0)
    if dev.resolution < 1.0:
        lo = max(16, int(round(size * dev.resolution)))
        I = _resize(_resize(I, lo, Image.BOX), size, Image.BILINEAR)
    noise = r.standard_normal(I.shape, dtype=np.float32)
    noise2 = r.standard_normal(I.shape, dtype=np.float32)
    I = I + dev.quantum_noise * np.sqrt(np.clip(I, 0, None)) * noise * 0.35 + dev.electronic_noise * noise2
    L = -np.log(np.clip(I, 2e-3, None))
    sub = L[::8, ::8]
    lo_v, hi_v = np.percentile(sub, (0.5, 99.7))
    v = (L - lo_v) / max(hi_v - lo_v, 1e-6)
    v = np.clip(0.5 + dev.contrast * (v - 0.5), 0, 1) ** dev.gamma
    # collimation
    c = dev.collimation
    if c > 0:
        rc = _rng("collim", case.study_id)
        edges = [int(size * c * rc.uniform(0.6, 1.4)) for _ in range(4)]
        val = 0.02 if dev.collimation_value == "dark" else 0.97
        v[: edges[0]] = val
        v[size - edges[1]:] = val
        v[:, : edges[2]] = val
        v[:, size - edges[3]:] = val
    # burned-in marker and text
    if dev.marker and case.kind == "chest":
        m = _text_mask(dev.marker, int(48 * sc))
        box = np.ones((m.shape[0] + 8, m.shape[1] + 8), bool)
        xpos = int(size * 0.08) if dev.marker == "R" else int(size * 0.86)
        if case.view == "lateral":
            xpos = int(size * 0.08)
        _paste(v, box, int(size * 0.1), xpos, 1.0)
        _paste(v, np.pad(m, 4), int(size * 0.1), xpos, 0.0)
    if dev.text:
        m = _text_mask(dev.text, int(24 * sc))
        _paste(v, m, int(size * 0.92), int(size * 0.06), 1.0)
    n = max(64, int(round(size * dev.matrix_scale)))
    v = _resize(v, n, Image.BILINEAR)
    maxv = (1 << dev.bits_stored) - 1
    stored = np.round(np.clip(v, 0, 1) * maxv).astype(np.uint16)
    if dev.photometric == "MONOCHROME1":
        stored = (maxv - stored).astype(np.uint16)
    spacing = dev.fov_mm / n
    meta = {"bits_stored": dev.bits_stored, "photometric": dev.photometric,
            "pixel_spacing": (round(spacing, 4), round(spacing, 4)), "device": dev.name,
            "modality": dev.modality, "shift": float(shift), "burned_in": bool(dev.marker or dev.text),
            "view_position": ("LL" if case.view == "lateral" else ("AP" if case.kind == "nonchest" and case.nonchest_part == "PELVIS" else ("PA" if case.kind == "nonchest" else dev.view_position))),
            "window_center": maxv / 2.0, "window_width": float(maxv)}
    return stored, meta


# --------------------------------------------------------------------------------------------
# DICOM and dataset writing
# --------------------------------------------------------------------------------------------


def _uid(*parts: str) -> str:
    """Deterministic UUID-derived UID (2.25.<128-bit int>) from the given strings.

    pydicom 3's generate_uid(prefix=None, entropy_srcs=...) ignores entropy_srcs and returns a
    random UUID4, so the same 2.25 form is derived here from a SHA-256 of the sources.
    """
    h = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return "2.25." + str(int(h[:32], 16))


def to_dicom(pixels: np.ndarray, meta: dict, case: PhantomCase, uid_seed: str):
    """A DX (For Presentation) or CR image with deterministic UIDs and dates."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    dx = meta.get("modality", "DX") == "DX"
    sop_class = "1.2.840.10008.5.1.4.1.1.1.1" if dx else "1.2.840.10008.5.1.4.1.1.1"
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
        px, meta = render(case, seed=seed * 1000003 + i, shift=shift, size=size)
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
