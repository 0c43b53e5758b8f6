"""Deterministic UIDs for result objects, so a re-run replaces rather than duplicates results.

A result UID is a pure function of what it describes (source instance, model bundle, kind): the
PACS sees the same SOP Instance UID when the same bundle re-processes the same image, and a new one
when anything that could change the content changes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from pydicom.uid import UID

from models.prediction import ModelIdentity

_KINDS = ("sr", "sc", "text", "pr", "ko")


def derive_uid(*parts: str) -> str:
    """A "2.25." UID from the SHA-256 of the parts (UUID v8 layout, ISO/IEC 9834-8).

    Each part is length-prefixed so ("ab", "c") and ("a", "bc") give different UIDs.

    Raises
    ------
    ValueError
        When called without parts (a constant UID would collide across results).
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part; a UID of nothing would collide")
    h = hashlib.sha256()
    for part in parts:
        data = str(part).encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    b = bytearray(h.digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x80  # version 8: custom, name-based
    b[8] = (b[8] & 0x3F) | 0x80  # RFC 4122 variant
    uid = UID(f"2.25.{int.from_bytes(b, 'big')}")
    if not uid.is_valid:  # cannot happen for a 128-bit integer; guards future edits
        raise ValueError(f"derived UID {uid!r} is not a valid DICOM UID")
    return str(uid)


def results_key(model: ModelIdentity) -> str:
    """What result UIDs derive from: the bundle digest, and the site's operating points when set
    (they change which findings are present, so a result made with them is a new object)."""
    if not model.operating_points:
        return model.digest
    return hashlib.sha256(f"{model.digest}|{model.operating_points}".encode()).hexdigest()


@dataclass(frozen=True)
class ResultUIDs:
    """Series and instance UIDs of every result object made for one source image."""

    sr_series: str
    sr_instance: str
    sc_series: str
    sc_instance: str
    text_series: str
    text_instance: str
    pr_series: str  # Grayscale Softcopy Presentation State (outlines)
    pr_instance: str
    ko_series: str  # Key Object Selection, urgent studies only
    ko_instance: str

    @classmethod
    def for_model(cls, study_uid: str, sop_instance_uid: str, model: ModelIdentity) -> ResultUIDs:
        """The UIDs of the results `model` makes for one source image: what the pipeline uses."""
        return cls.for_source(study_uid, sop_instance_uid, results_key(model))

    @classmethod
    def for_source(cls, study_uid: str, sop_instance_uid: str, bundle_digest: str) -> ResultUIDs:
        """Series per (study, model, kind) so one study's results group; instances per source.

        bundle_digest: results_key(model); the bundle digest alone for a bundle's own operating points."""
        values: dict[str, str] = {}
        for kind in _KINDS:
            values[f"{kind}_series"] = derive_uid("series", study_uid, bundle_digest, kind)
            values[f"{kind}_instance"] = derive_uid("instance", sop_instance_uid, bundle_digest, kind)
        return cls(**values)
