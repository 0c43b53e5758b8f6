"""SOP classes, transfer syntaxes and the marks of this node's own results, written once.

The listener accepts, the filter decides and the encoders write with these tables. Loop
prevention depends on them agreeing: a result routed back by the PACS is recognised as ours
(dicom_node.filters) because the encoders wrote exactly these markers into it (tests/unit/
test_filters.py encodes each result and feeds it to the filter). The checks at the end fail at
import when an edit makes them disagree.
"""

from __future__ import annotations

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
)

# -- the marks of our own results
MANUFACTURER = "medsam2-cxr"  # (0008,0070) of every result and its Contributing Equipment item
OWN_SERIES_PREFIX = "AI "  # how every result's Series Description starts (encoders.common.series_description)

# -- SOP classes
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
ENHANCED_SR = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
GRAYSCALE_PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
VERIFICATION = "1.2.840.10008.1.1"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."  # every SR document class

RADIOGRAPH_CLASSES = frozenset({CR_IMAGE, DX_PRESENTATION, DX_PROCESSING})
# Received and looked at (the filter decides whether to process), in the listener's context order.
IMAGE_STORAGE = (CR_IMAGE, DX_PRESENTATION, DX_PROCESSING, SECONDARY_CAPTURE)
PROCESSED_CLASSES = frozenset(IMAGE_STORAGE)
# Stored and skipped, so a PACS routing a whole study back (with our results) does not fail.
STORED_AND_SKIPPED = (BASIC_TEXT_SR, ENHANCED_SR, COMPREHENSIVE_SR, COMPREHENSIVE_3D_SR,
                      GRAYSCALE_PRESENTATION_STATE, KEY_OBJECT_SELECTION)
# What the encoders write: the TID 1500 SR (encoders.sr), the saliency SC (encoders.sc), the text SR.
RESULT_CLASSES = {"sr": COMPREHENSIVE_3D_SR, "sc": SECONDARY_CAPTURE, "text": BASIC_TEXT_SR}

# -- transfer syntaxes
# The SC is JPEG-LS lossless: the same pixels in about a fifth of the bytes (2 MB instead of 10 MB
# at 2048 px), which the PACS stores for every radiograph and which took most of the send at a 16 KB
# PDU. A peer that does not accept it gets the SC decompressed (dicom_node.sender).
SC_TRANSFER_SYNTAX = JPEGLSLossless
# What the listener accepts for every storage class.
TRANSFER_SYNTAXES = (
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,  # .4.50
    JPEGLossless,  # .4.57
    JPEGLosslessSV1,  # .4.70
    JPEGLSLossless,  # .4.80
    JPEG2000Lossless,  # .4.90
    JPEG2000,  # .4.91
)
UNCOMPRESSED = frozenset({str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian),
                          str(DeflatedExplicitVRLittleEndian), "1.2.840.10008.1.2.2"})


def may_be_own_result(sop_class: str) -> bool:
    """Whether an object of this class can be one of our results (then its series description
    prefix marks it as ours): any SR document or a Secondary Capture."""
    return sop_class.startswith(SR_PREFIX) or sop_class == SECONDARY_CAPTURE


def _check() -> None:
    problems = [f"result class {k} {uid} is not taken for a result by the filter"
                for k, uid in RESULT_CLASSES.items() if not may_be_own_result(uid)]
    problems += [f"result class {k} {uid} is not accepted by the listener"
                 for k, uid in RESULT_CLASSES.items() if uid not in IMAGE_STORAGE + STORED_AND_SKIPPED]
    if SC_TRANSFER_SYNTAX not in TRANSFER_SYNTAXES:
        problems.append(f"the SC's transfer syntax {SC_TRANSFER_SYNTAX} is not accepted by the listener")
    if problems:
        raise ImportError("dicom_node.sop tables disagree: " + "; ".join(problems))


_check()
