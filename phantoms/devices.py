"""Acquisition devices: detector physics, processing and the DICOM each writes, and the device-shift knob."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

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

    def shifted(self, shift: float) -> Device:
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

