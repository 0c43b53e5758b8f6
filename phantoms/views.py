"""The line-integral attenuation map mu per view: frontal chest, lateral chest, non-chest (hand, pelvis).

The frontal map is anatomy (phantoms.anatomy) with the findings (phantoms.findings) drawn in;
the lateral and non-chest phantoms are simpler and draw their few findings inline.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage

from phantoms.anatomy import (
    _bones,
    _draw_curve,
    _gauss_field,
    _grid,
    _lungs,
    _lungs_and_mediastinum,
    _patient_anatomy,
    _resize,
    _smoothstep,
    _soft_tissue,
)
from phantoms.cases import PhantomCase
from phantoms.findings import _support_devices, lung_findings
from phantoms.seeds import rng as _rng


def _mu_frontal(case: PhantomCase, size: int, masks: dict | None = None) -> np.ndarray:
    a = _patient_anatomy(case)
    f = case.findings
    X, Y = _grid(size, a)
    lungs, hd = _lungs(a, X, Y)
    r = _rng("texture", case.anatomy_seed, case.study_id)
    mu = _soft_tissue(a, X, Y)
    # lungs: air replaces tissue; findings refill it (fill in 0..1)
    fill, extra, ptx_mask = lung_findings(case, a, X, Y, lungs, size, r)
    mu = _lungs_and_mediastinum(mu, a, X, Y, size, lungs, hd, fill, extra, ptx_mask)
    mu = _bones(mu, a, X, Y, lungs, f.get("Fracture"))

    # anatomical noise
    mu += 0.03 * _gauss_field(None, r, 48, size)

    if "Support Devices" in f:
        mu += _support_devices(a, X, Y, size, f["Support Devices"], a.dome_l)

    if masks is not None:
        masks["heart"] = (hd < 0) & (Y < a.dome_l + 0.05)
        masks["lungs"] = (lungs["right"][1] > 0) | (lungs["left"][1] > 0)
        masks["thorax_half_width"] = a.wt
    return mu.astype(np.float32)




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
    mu = np.asarray(Image.fromarray(mu.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR))
    return mu


# --------------------------------------------------------------------------------------------


def attenuation(case: PhantomCase, size: int = 1024) -> np.ndarray:
    """The line-integral attenuation map mu (before the device)."""
    if case.kind == "nonchest":
        return _mu_nonchest(case, size)
    # smooth anatomy is computed on a half-resolution grid and interpolated (speed); detector
    # noise, blur and quantisation are applied at full resolution in `render`.
    n = size // 2 if size >= 512 else size
    mu = _mu_lateral(case, n) if case.view == "lateral" else _mu_frontal(case, n)
    return _resize(mu, size, Image.Resampling.BICUBIC)


def anatomy_masks(case: PhantomCase, size: int = 512) -> dict:
    """Heart and lung masks of a frontal chest case (native grid), for tests and checks."""
    masks: dict = {}
    _mu_frontal(case, size, masks)
    return masks


def cardiothoracic_ratio(case: PhantomCase, size: int = 512) -> float:
    """Max horizontal heart width over max inner thoracic width, measured on the masks."""
    m = anatomy_masks(case, size)

    def width(mask):
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
