"""Coded concepts for the results: one place to review every code a PACS will see.

Standard codes (SNOMED CT "SCT", DICOM "DCM", UCUM) where one concept fits a CheXpert label;
the private scheme "99MSCXR" only where none does, declared in CODING_SCHEME_IDENTIFICATION so a
receiver can tell what it is. Verify against the current SNOMED CT release before clinical use.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.sop import MANUFACTURER  # noqa: F401 - one of the own-result markers, kept under its old name here
from models.labels import LABELS

ALGORITHM_NAME = "MedSAM2-CXR box-latent"

PRIVATE_SCHEME = "99MSCXR"

CODING_SCHEME_IDENTIFICATION = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="MedSAM2-CXR private codes",
    version="1",
    responsible_organization=MANUFACTURER,
)

# --- findings -------------------------------------------------------------------------------
NO_ABNORMALITY = codes.DCM.NoAbnormality  # DCM 111286: reads better than "Normal: present"
ENLARGED_CARDIOMEDIASTINUM = Code("ECM", PRIVATE_SCHEME, "Enlarged cardiomediastinum")
CARDIOMEGALY = Code("8186001", "SCT", "Cardiomegaly")
LUNG_OPACITY = codes.DCM.Opacity  # DCM 112001
LESION = codes.SCT.Lesion  # SCT 52988006, finding site lung
PULMONARY_EDEMA = codes.SCT.PulmonaryEdema  # SCT 19242006
CONSOLIDATION = Code("95436008", "SCT", "Lung consolidation")
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
ATELECTASIS = Code("46621007", "SCT", "Atelectasis")
PNEUMOTHORAX = codes.SCT.Pneumothorax  # SCT 36118008
PLEURAL_EFFUSION = codes.SCT.PleuralEffusion  # SCT 60046008
PLEURAL_OTHER = Code("PLOTHER", PRIVATE_SCHEME, "Other pleural abnormality")
FRACTURE = Code("125605004", "SCT", "Fracture of bone")
SUPPORT_DEVICES = codes.DCM.Device  # DCM 121007

LABEL_CODES: Mapping[str, Code] = MappingProxyType(
    {
        "No Finding": NO_ABNORMALITY,
        "Enlarged Cardiomediastinum": ENLARGED_CARDIOMEDIASTINUM,
        "Cardiomegaly": CARDIOMEGALY,
        "Lung Opacity": LUNG_OPACITY,
        "Lung Lesion": LESION,
        "Edema": PULMONARY_EDEMA,
        "Consolidation": CONSOLIDATION,
        "Pneumonia": PNEUMONIA,
        "Atelectasis": ATELECTASIS,
        "Pneumothorax": PNEUMOTHORAX,
        "Pleural Effusion": PLEURAL_EFFUSION,
        "Pleural Other": PLEURAL_OTHER,
        "Fracture": FRACTURE,
        "Support Devices": SUPPORT_DEVICES,
    }
)
if set(LABEL_CODES) != set(LABELS):  # import-time guard: a renamed label must not go uncoded
    raise ImportError(f"LABEL_CODES does not cover LABELS: {set(LABELS) ^ set(LABEL_CODES)}")

# Where a finding code alone is too general, the anatomic site that completes it.
LABEL_FINDING_SITES: Mapping[str, Code] = MappingProxyType(
    {
        "Enlarged Cardiomediastinum": codes.SCT.Mediastinum,  # SCT 72410000
        "Lung Lesion": codes.SCT.Lung,  # SCT 39607008
        "Lung Opacity": codes.SCT.Lung,
        "Pleural Other": codes.SCT.Pleura,  # SCT 3120008
    }
)

# --- evaluations and measurements -----------------------------------------------------------
PRESENT = codes.SCT.Present  # SCT 52101004
ABSENT = codes.SCT.Absent  # SCT 272519000 (as pydicom codes it)
PROBABILITY = codes.DCM.Probability  # DCM 122157
CERTAINTY = codes.DCM.CertaintyOfFinding  # DCM 111012
TIER_CODES: Mapping[str, Code] = MappingProxyType(
    {
        "high": codes.DCM.High,  # DCM 111575
        "medium": codes.DCM.Medium,  # DCM 111576
        "low": codes.DCM.Low,  # DCM 111577
        # A bundle not validated on real images states no confidence (models.calibration.tier).
        "not validated": Code("NOTVALID", PRIVATE_SCHEME, "Confidence not validated"),
    }
)
UNITLESS = codes.UCUM.NoUnits  # UCUM "1"

OOD_SCORE = Code("OODSCORE", PRIVATE_SCHEME, "Out of distribution score")
OOD_THRESHOLD = Code("OODTHR", PRIVATE_SCHEME, "Out of distribution threshold")
OUTSIDE_EXPERIENCE = Code("OODIMG", PRIVATE_SCHEME, "Image outside the model's experience")
# Which image of a study a study-level result (the RIS report, ris/) comes from: its SOP Instance UID.
SOURCE_IMAGE = Code("SRCIMG", PRIVATE_SCHEME, "Source image SOP Instance UID")
YES = codes.SCT.Yes  # SCT 373066001
NO = codes.SCT.No  # SCT 373067005

# --- document level -------------------------------------------------------------------------
PLAIN_CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row
COMMENT = codes.DCM.Comment  # DCM 121106
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")  # IHE AIR
DEVICE_OBSERVER = codes.DCM.Device  # observer type in TID 1002; same concept as Support Devices

# --- draft report (TID 1500 qualitative evaluations, Basic Text SR sections) ------------------
# DCM where one exists, the private scheme for similar cases and guideline references.
DRAFT_FINDING = Code("121071", "DCM", "Finding")
DRAFT_IMPRESSION = Code("121073", "DCM", "Impression")
SIMILAR_CASES = Code("SIMCASES", PRIVATE_SCHEME, "Similar prior cases")
SIMILAR_CASE = Code("SIMCASE", PRIVATE_SCHEME, "Similar prior case")
GUIDELINE_REFERENCES = Code("GUIDEREFS", PRIVATE_SCHEME, "Guideline references")
GUIDELINE_REFERENCE = Code("GUIDEREF", PRIVATE_SCHEME, "Guideline reference")
