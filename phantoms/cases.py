"""Cases: patients with 1-3 studies, their labels, how each finding is drawn, and the report.

A case is a frozen description; nothing here draws pixels. Co-occurrence of findings follows a
few latent causes (heart failure, infection, ICU, trauma); see `_sample_labels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from models.labels import LABELS, OPACITY_CHILDREN
from phantoms.devices import DEVICES
from phantoms.reports import write_report
from phantoms.seeds import rng as _rng


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
    if any(lab[k] for k in OPACITY_CHILDREN):
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
                    lab["Lung Opacity"] = int(any(lab[x] for x in OPACITY_CHILDREN))  # Atelectasis is 0 here
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
