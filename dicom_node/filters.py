"""Is this instance a frontal chest radiograph the model should see?

:func:`classify` looks only at the header (a dataset read with ``stop_before_pixels=True``).
Rules, in order; the first that decides wins:

1. Our own results routed back (Manufacturer is ours, an entry of ContributingEquipmentSequence
   names us, or an SR/SC whose SeriesDescription starts with ``"AI "``: the markers the encoders
   write, dicom_node.sop) -> skip, "own result (no loop)".
2. SOP class must be CR, DX (for presentation or for processing) or Secondary Capture; SR,
   presentation states, KOS and everything else -> skip, naming the SOP class.
3. Modality: CR/DX SOP classes need Modality CR or DX (or none); Secondary Capture may carry
   CR, DX, OT or none, but no other modality (a CT screen capture is not a radiograph).
4. Body part: BodyPartExamined CHEST (or a chest-like word: THORAX, LUNG, TORAX, ...) -> go on;
   any other stated body part -> skip. When it is absent, the Study/Series descriptions and
   Protocol Name decide: a non-chest anatomy word (hand, spine, abdomen, ...) -> skip; a chest
   word -> go on. Secondary Capture needs positive chest evidence.
   Decision for CR/DX with no body part anywhere: *process*, with reason "body part not stated".
   A PACS autoroute to this node usually filters on chest already, portable ICU films often
   carry no body part, and the result is a draft for a radiologist; the reason is kept on the
   job and in the audit trail so such cases can be reviewed.
5. View: lateral (ViewPosition LL/RL/LATERAL/LAT, a lateral View Code, PatientOrientation
   whose row direction is A or P, or a SeriesDescription saying lateral and not frontal when
   ViewPosition is absent) -> skip, "lateral view". Other stated views (oblique, decubitus)
   -> skip. PA, AP or absent -> process.
   ImageLaterality (R/L/U/B) names the side of a paired body part, not the projection, so it
   cannot mark a lateral view and is not used.

Reasons never quote free-text fields (they may carry names); only code strings and matched
words from fixed lists.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

# The SOP class tables and our results' markers are the encoders' own (dicom_node.sop), so a
# result routed back is always recognised.
from dicom_node.sop import (  # noqa: F401 - CR_IMAGE, DX_*: this module's vocabulary for its callers
    CR_IMAGE,
    DX_PRESENTATION,
    DX_PROCESSING,
    MANUFACTURER,
    OWN_SERIES_PREFIX,
    PROCESSED_CLASSES,
    SECONDARY_CAPTURE,
    may_be_own_result,
)

LATERAL_VIEW_POSITIONS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLAT", "RLAT"})
FRONTAL_VIEW_POSITIONS = frozenset({"PA", "AP"})
OWN_RESULT = "own result (no loop)"  # the reason of a skipped result of ours (the listener's report intake reads it)
# An edge node's listener for its hub (worker/edge.py) takes every instance as a result to pass on, unclassified.
TO_RELAY = "result from the hub, to re-identify and store"

# View Code Sequence codes meaning a lateral projection (SNOMED CT and the legacy SRT ids).
LATERAL_VIEW_CODES = frozenset({
    "399067008", "399173006", "399198007", "399352003", "399012007", "399197002",
    "R-10232", "R-10236", "R-10244", "R-10242", "R-10228",
})
CHEST_WORDS = frozenset({
    "chest", "thorax", "thoracic", "thx", "cxr", "lung", "lungs", "pulmonary", "torax",
    "torace", "toracica", "pecho", "brustkorb", "poumon", "poumons", "pulmones", "pulmao",
})
NON_CHEST_WORDS = frozenset({
    "abdomen", "abd", "kub", "pelvis", "hip", "hips", "knee", "knees", "hand", "hands", "wrist",
    "finger", "fingers", "foot", "feet", "toe", "toes", "ankle", "leg", "tibia", "fibula", "femur",
    "arm", "forearm", "humerus", "elbow", "shoulder", "clavicle", "scapula", "skull", "head",
    "sinus", "sinuses", "facial", "mandible", "dental", "spine", "cervical", "lumbar", "sacrum",
    "coccyx", "mammo", "mammography", "breast", "extremity",
})
LATERAL_WORDS = frozenset({"lat", "lateral", "lateraal", "seitlich"})
FRONTAL_WORDS = frozenset({"pa", "ap", "frontal", "frontale"})
OTHER_SC_MODALITIES_OK = frozenset({"", "CR", "DX", "OT"})


@dataclass(frozen=True)
class Decision:
    process: bool
    reason: str | None


def _words(text: object) -> set[str]:
    if not text:
        return set()
    s = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode().lower()
    return set(re.split(r"[^a-z0-9]+", s)) - {""}


def _code(value: object) -> str:
    """A code string value, upper case, restricted to safe characters for a reason text."""
    s = unicodedata.normalize("NFKD", str(value or "")).encode("ascii", "ignore").decode()
    return re.sub(r"[^A-Z0-9 _-]", "", s.strip().upper())[:16]


def _sop_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "unknown")


def _is_own(ds: Dataset, sop_class: str, own: str) -> bool:
    own_n = own.strip().lower()
    if str(ds.get("Manufacturer", "") or "").strip().lower() == own_n:
        return True
    for item in ds.get("ContributingEquipmentSequence", None) or []:
        if isinstance(item, Dataset) and str(item.get("Manufacturer", "") or "").strip().lower() == own_n:
            return True
    return may_be_own_result(sop_class) and str(ds.get("SeriesDescription", "") or "").startswith(OWN_SERIES_PREFIX)


def _description_words(ds: Dataset) -> set[str]:
    words: set[str] = set()
    for kw in ("StudyDescription", "SeriesDescription", "ProtocolName"):
        words |= _words(ds.get(kw, ""))
    return words


def _is_lateral(ds: Dataset, view: str) -> bool:
    if view in LATERAL_VIEW_POSITIONS:
        return True
    for item in ds.get("ViewCodeSequence", None) or []:
        if not isinstance(item, Dataset):
            continue
        value = str(item.get("CodeValue", "") or "").strip()
        meaning = _words(item.get("CodeMeaning", ""))
        if value in LATERAL_VIEW_CODES:
            return True
        if "lateral" in meaning and not meaning & {"decubitus", "oblique"}:
            return True
    orientation = ds.get("PatientOrientation", None)
    if orientation and view not in FRONTAL_VIEW_POSITIONS:
        first = str(orientation[0] if not isinstance(orientation, str) else orientation).upper()
        if first[:1] in {"A", "P"}:  # rows run front-to-back: a lateral projection
            return True
    if not view:
        series = _words(ds.get("SeriesDescription", ""))
        if series & LATERAL_WORDS and not series & FRONTAL_WORDS:
            return True
    return False


def classify(ds: Dataset, own_manufacturer: str = MANUFACTURER) -> Decision:
    """Decide whether a header-only dataset is a frontal chest radiograph to process.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The instance header (pixels not needed).
    own_manufacturer : str
        Manufacturer this node writes into its results; instances carrying it are skipped.

    Returns
    -------
    Decision
        ``process`` and, when skipped (or processed on weak evidence), a ``reason``.
    """
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not sop_class and getattr(ds, "file_meta", None) is not None:
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")

    if _is_own(ds, sop_class, own_manufacturer):
        return Decision(False, OWN_RESULT)
    if not sop_class:
        return Decision(False, "no SOP Class UID")
    if sop_class not in PROCESSED_CLASSES:
        return Decision(False, f"SOP class not processed: {_sop_name(sop_class)}")

    modality = _code(ds.get("Modality", ""))
    is_sc = sop_class == SECONDARY_CAPTURE
    if is_sc and modality not in OTHER_SC_MODALITIES_OK:
        return Decision(False, f"secondary capture of modality {modality} not processed")
    if not is_sc and modality not in {"", "CR", "DX"}:
        return Decision(False, f"modality {modality} not processed")

    body_part = _code(ds.get("BodyPartExamined", ""))
    reason: str | None = None
    if body_part:
        if not _words(body_part) & CHEST_WORDS:
            return Decision(False, f"body part {body_part} not chest")
    else:
        words = _description_words(ds)
        other = sorted(words & NON_CHEST_WORDS)
        if other:
            return Decision(False, f"body part not chest (description says {other[0]})")
        if not words & CHEST_WORDS:
            if is_sc:
                return Decision(False, "secondary capture not stated to be chest")
            reason = "body part not stated"

    view = _code(ds.get("ViewPosition", ""))
    if _is_lateral(ds, view):
        return Decision(False, "lateral view")
    if view and view not in FRONTAL_VIEW_POSITIONS:
        return Decision(False, f"view position {view} not frontal")
    return Decision(True, reason)
