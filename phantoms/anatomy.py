"""Frontal chest anatomy in patient coordinates: body, lungs, heart, mediastinum, vessels, ribs, spine.

The image spans x, y in [-1, 1] (y down). Anatomy is built in patient coordinates (X, Y) related to
the image by the patient's offset, size and rotation; in the PA view the patient's right side is
on the image left (X < 0). Findings (phantoms.findings) are drawn into the same coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from phantoms.cases import PhantomCase
from phantoms.seeds import rng as _rng


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
    img = Image.fromarray(g, mode="F").resize((zoom_to, zoom_to), Image.Resampling.BICUBIC)
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
    v = np.asarray(Image.fromarray(v.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR))
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



def _resize(a: np.ndarray, n: int, resample=Image.Resampling.BILINEAR) -> np.ndarray:
    if a.shape[0] == n:
        return a
    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((n, n), resample), dtype=np.float32)


def _soft_tissue(a: _Anat, X, Y) -> np.ndarray:
    """Body soft tissue: path length through an elliptic torso, shoulders, neck (and breasts)."""
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
    return mu


def _lungs_and_mediastinum(mu: np.ndarray, a: _Anat, X, Y, size: int, lungs: dict, hd, fill: dict,
                           extra: np.ndarray, ptx_mask: dict) -> np.ndarray:
    """Air in the lungs (refilled by the findings' fill), vessels, hila, heart, trachea, gastric bubble."""
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
    return mu


def _bones(mu: np.ndarray, a: _Anat, X, Y, lungs: dict, fx: dict | None) -> np.ndarray:
    """Spine, ribs (with a fracture's step and gap), clavicles, scapulae; added to mu in place."""
    xs = X - a.spine_dx
    sp_w = 0.06 + 0.015 * _smoothstep(-0.8, 0.6, Y)
    body = np.exp(-(xs / sp_w) ** 6)
    per = np.cos(2 * np.pi * (Y + 0.9) / (0.075 + 0.02 * _smoothstep(-0.8, 0.8, Y)))
    vert = body * (0.8 + 0.08 * per) + 0.12 * np.exp(-(xs / 0.012) ** 2) * (per > 0.3)
    vert += 0.12 * (np.exp(-((np.abs(xs) - sp_w * 0.75) / 0.014) ** 2)) * (per > 0.2)
    mu += 0.30 * vert * _smoothstep(-1.0, -0.85, Y)
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
    return mu
