"""Urgency -> Key Object Selection document: the image flagged "Of Interest" for the worklist.

Made only for an urgent study (models.urgency). A PACS or worklist that sorts on key objects
shows the study first; the document's description says why, that it is an AI result, and, for
the phantom-trained default bundle, that the confidence behind the flag is not validated.

Title: DCM 113000 "Of Interest" (PS3.16 CID 7010, Key Object Selection Document Title). "For
Referring Provider" (113002) would say a person chose the image for the referring clinician; the
node selected it for the reader, for a finding, and "Of Interest" says exactly that.
"""

from __future__ import annotations

import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.valuerep import DA, TM

from dicom_node import codes
from dicom_node.encoders.common import (
    device_uid,
    finish,
    series_description,
    software_version,
)
from dicom_node.encoders.header import clean_header
from dicom_node.encoders.notices import ENGLISH
from dicom_node.uids import ResultUIDs
from models.prediction import ModelIdentity
from models.urgency import Urgency

KO_SERIES_NUMBER = 9905
TITLE = dcm_codes.DCM.OfInterest  # DCM 113000, CID 7010


def description(urgency: Urgency, model: ModelIdentity) -> str:
    """The Key Object Description (TEXT): why the study is flagged, and what the flag is worth."""
    parts = [f"{urgency.describe()}.", f"{ENGLISH.not_for_diagnosis}."]
    if not urgency.confidence_validated:
        parts.append(f"{ENGLISH.not_validated_notice}.")
    if model.synthetic_training:
        parts.append(f"{ENGLISH.synthetic_notice}.")
    return " ".join(parts)


def encode_ko(
    source: Dataset,
    urgency: Urgency,
    model: ModelIdentity,
    uids: ResultUIDs,
    now: datetime.datetime,
) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS selecting the source image, in its study, in the model's key object series.

    Raises
    ------
    ValueError
        The study is not urgent (there is nothing to select it for).
    HeaderError
        The source lacks a Type 1 attribute the document must reference (encoders.header).
    """
    if not urgency.is_urgent:
        raise ValueError("encode_ko: the study is not urgent; a Key Object Selection is made for urgent studies only")
    header = clean_header(source)
    source = header.dataset
    content = hd.ko.KeyObjectSelection(
        document_title=TITLE,
        referenced_objects=[source],
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE_OBSERVER,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid(model), name=model.name,
                manufacturer_name=model.manufacturer or codes.MANUFACTURER, model_name=codes.ALGORITHM_NAME),
        ),
        description=description(urgency, model),
    )
    ko = hd.ko.KeyObjectSelectionDocument(
        evidence=[source],
        content=content,
        series_instance_uid=uids.ko_series,
        series_number=KO_SERIES_NUMBER,
        sop_instance_uid=uids.ko_instance,
        instance_number=1,
        manufacturer=codes.MANUFACTURER,
    )
    ko.SeriesDescription = series_description(model, "urgent")
    ko.ManufacturerModelName = model.name
    ko.SoftwareVersions = software_version(model)
    ko.ContentDate, ko.ContentTime = DA(now.date()), TM(now.time())
    finish(ko, model, now, header)
    return ko
