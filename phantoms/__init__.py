"""Synthetic phantom radiographs: patients, findings, acquisition devices, DICOM output.

Nothing here is real patient data. A case is a frozen description (patient, labels, finding
parameters, device, report); `render` turns it into stored pixel values via a line-integral
attenuation map mu (I = exp(-mu)) seen through a device model, and `to_dicom` / `generate`
write DX/CR DICOM files, reports and a manifest.

Coordinates: the image spans x, y in [-1, 1] (y down). Anatomy is built in patient coordinates
(X, Y) related to the image by the patient's offset, size and rotation; in the PA view the
patient's right side is on the image left (X < 0).

Modules, by what they draw: devices (detector physics and the device-shift knob), cases (patients,
labels, finding parameters), reports (the report text), anatomy and findings (the frontal chest),
views (the attenuation map per view), rendering (through a device), dicom (files and `generate`), seeds.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

from models.digests import bytes_digest
from phantoms.cases import PhantomCase, manifest_label_value, sample_cases
from phantoms.devices import DEVICES, REFERENCE_DEVICE, Device
from phantoms.dicom import generate, to_dicom
from phantoms.rendering import render
from phantoms.seeds import render_seed
from phantoms.views import anatomy_masks, attenuation, cardiothoracic_ratio

__all__ = [
    "Device", "DEVICES", "REFERENCE_DEVICE", "PhantomCase", "sample_cases", "render", "render_seed", "attenuation",
    "to_dicom", "generate", "anatomy_masks", "cardiothoracic_ratio", "manifest_label_value", "code_digest",
]


@lru_cache(maxsize=1)
def code_digest() -> str:
    """Digest of the generator's source: feature caches key phantom images by it, so a changed
    generator never reuses a stale cached feature."""
    from phantoms import (
        anatomy,
        cases,
        devices,
        dicom,
        findings,
        rendering,
        reports,
        seeds,
        views,
    )

    modules = (seeds, devices, cases, reports, anatomy, findings, views, rendering, dicom)
    src = "".join(inspect.getsource(m) for m in modules)
    return bytes_digest(src.encode())[:16]
