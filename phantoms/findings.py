"""Findings drawn into the frontal chest: each fills lung air, adds density, or opens a pneumothorax.

Each `_draw_*` reads its parameters from `case.findings` (phantoms.cases) and writes into the
shared `fill` (per lung, 0..1), `extra` (added density) and `ptx_mask` (per lung). They run in
the order of FRONTAL, which matters: edema draws its texture from the case's texture generator
before the anatomical noise does.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from phantoms.anatomy import (
    _Anat,
    _dome,
    _draw_curve,
    _gauss_field,
    _smoothstep,
    _u_lat,
    _vessel_tree,
)
from phantoms.cases import PhantomCase
from phantoms.seeds import rng as _rng


def _draw_effusion(case: PhantomCase, a: _Anat, X, Y, lungs: dict, fill: dict, extra: np.ndarray, ptx_mask: dict, size: int, r: np.random.Generator) -> None:
    """Pleural effusion: a meniscus filling the base, fluid in the costophrenic recess."""
    f = case.findings
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


def _draw_pneumothorax(case: PhantomCase, a: _Anat, X, Y, lungs: dict, fill: dict, extra: np.ndarray, ptx_mask: dict, size: int, r: np.random.Generator) -> None:
    """Pneumothorax: a lucent rim without vessels, the visceral pleural line."""
    f = case.findings
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


def _draw_airspace(case: PhantomCase, a: _Anat, X, Y, lungs: dict, fill: dict, extra: np.ndarray, ptx_mask: dict, size: int, r: np.random.Generator) -> None:
    """Consolidation / pneumonia: a lobar patch, optionally with air bronchograms."""
    f = case.findings
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


def _draw_edema(case: PhantomCase, a: _Anat, X, Y, lungs: dict, fill: dict, extra: np.ndarray, ptx_mask: dict, size: int, r: np.random.Generator) -> None:
    """Edema: perihilar haze (from the case's texture generator) and Kerley B lines."""
    f = case.findings
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


def _draw_atelectasis(case: PhantomCase, a: _Anat, X, Y, lungs: dict, fill: dict, extra: np.ndarray, ptx_mask: dict, size: int, r: np.random.Generator) -> None:
    """Atelectasis: a plate band or a lower-lobe collapse triangle."""
    f = case.findings
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


def _draw_lesion(case: PhantomCase, a: _Anat, X, Y, lungs: dict, fill: dict, extra: np.ndarray, ptx_mask: dict, size: int, r: np.random.Generator) -> None:
    """Lung lesion: nodules or a (lobulated) mass."""
    f = case.findings
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


def _draw_pleural_other(case: PhantomCase, a: _Anat, X, Y, lungs: dict, fill: dict, extra: np.ndarray, ptx_mask: dict, size: int, r: np.random.Generator) -> None:
    """Pleural thickening or calcified plaques."""
    f = case.findings
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



FRONTAL = (_draw_effusion, _draw_pneumothorax, _draw_airspace, _draw_edema, _draw_atelectasis, _draw_lesion,
           _draw_pleural_other)


def lung_findings(case: PhantomCase, a: _Anat, X, Y, lungs: dict, size: int,
                  r: np.random.Generator) -> tuple[dict, np.ndarray, dict]:
    """(fill per lung, extra density, pneumothorax mask per lung) of the case's frontal findings."""
    fill = {s: np.zeros((size, size), np.float32) for s in lungs}
    extra = np.zeros((size, size), np.float32)
    ptx_mask = {s: np.zeros((size, size), np.float32) for s in lungs}
    for draw in FRONTAL:
        draw(case, a, X, Y, lungs, fill, extra, ptx_mask, size, r)
    return fill, extra, ptx_mask


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
            end = (-0.07, -0.16 + r.uniform(-0.05, 0.06))
            path = [(sg * 0.62, -0.78), (sg * 0.35, -0.66), (sg * 0.12, -0.55), (-0.07, -0.35), end]
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
            for end in ((-0.02, 0.02), (0.14, a.dome_l - 0.02)):
                path = [(gx - 0.04, gy), (0.2, -0.58), (0.02, -0.45), (-0.04, -0.2), end]
                _draw_curve(lines, a, path, 0.9)
                _draw_curve(lines, a, path, 0.9, 0.002)
                solid += 0.9 * (((X - end[0]) ** 2 + (Y - end[1]) ** 2) < 0.008 ** 2)
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

