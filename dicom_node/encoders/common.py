"""What every result encoder (SR, SC, text SR) shares: who made the object, how its series is
described, the notices it carries, and the finishing that makes it depend on its inputs only.

A draft report reaches the encoders as `DraftLines`: ready-made lines in its own language
(index/draft.py writes them), which the SR and the text SR only place, so the DICOM layer never
imports the index.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Protocol

import highdicom as hd
from pydicom import Dataset
from pydicom.valuerep import DA, DT, TM

from dicom_node import codes
from dicom_node.encoders.header import SourceHeader, carry_identity, set_character_set
from dicom_node.encoders.notices import ENGLISH, NOT_FOR_DIAGNOSIS, Notices
from dicom_node.sop import MANUFACTURER, OWN_SERIES_PREFIX
from dicom_node.uids import derive_uid
from models.operating_points import summary as operating_points_summary
from models.prediction import NOT_VALIDATED, ModelIdentity, Prediction


class DraftLines(Protocol):
    """A drafted report as the encoders place it (index.draft.Draft is one)."""

    @property
    def findings(self) -> str: ...

    @property
    def impression(self) -> str: ...

    @property
    def notes(self) -> Sequence[str]: ...

    @property
    def wording(self) -> Notices: ...  # the language it is written in; the results' notices follow it

    def reference_lines(self) -> list[str]: ...

    def similar_lines(self) -> list[str]: ...


def software_version(model: ModelIdentity) -> str:
    """Version plus short bundle digest: the version alone does not identify the weights."""
    return f"{model.version}+{model.short_digest}"


def device_uid(model: ModelIdentity) -> str:
    """One Device UID per model bundle, stable across runs and hosts."""
    return derive_uid("device", model.digest)


def series_description(model: ModelIdentity, kind: str) -> str:
    """Series description (LO, 64 chars) that says what the series is and what it is not.

    It starts with OWN_SERIES_PREFIX, which the filter reads as "our own result"."""
    if model.synthetic_training:
        text = f"{OWN_SERIES_PREFIX}{kind} - MedSAM2-CXR (phantom-trained, not for diagnosis)"
    else:
        text = f"{OWN_SERIES_PREFIX}{kind} - MedSAM2-CXR (not for primary diagnosis)"
    return text[:64]


def device_observer(model: ModelIdentity) -> hd.sr.ObservationContext:
    """The SR observation context: this model as the observing device."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE_OBSERVER,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid(model),
                name=model.name,
                manufacturer_name=model.manufacturer or MANUFACTURER,
                model_name=codes.ALGORITHM_NAME,
            ),
        )
    )


def contributing_equipment(model: ModelIdentity, now: datetime.datetime) -> Dataset:
    """The IHE AIR "Processing Algorithm" item naming this model.

    Built by hand: highdicom's ContributingEquipment only accepts DCM purposes, and AIR wants
    (Newcode1, 99IHE) plus a Device UID.
    """
    item = Dataset()
    item.Manufacturer = model.manufacturer or MANUFACTURER
    item.ManufacturerModelName = model.name[:64]
    item.SoftwareVersions = software_version(model)[:64]
    item.DeviceUID = device_uid(model)
    item.ContributionDateTime = DT(now)
    item.ContributionDescription = f"{codes.ALGORITHM_NAME}; {NOT_FOR_DIAGNOSIS}"[:64]
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(codes.PROCESSING_ALGORITHM)]
    return item


def equipment_and_dates(model: ModelIdentity, now: datetime.datetime) -> dict:
    """The constructor keywords every result object shares: who made it, and when (from `now`)."""
    return dict(manufacturer=MANUFACTURER, manufacturer_model_name=model.name,
                software_versions=software_version(model), content_date=now.date(), content_time=now.time(),
                series_date=now.date(), series_time=now.time())


def finish(ds: Dataset, model: ModelIdentity, now: datetime.datetime, header: SourceHeader) -> None:
    """Replace highdicom's own clock readings with `now`, add our equipment item, the identity
    highdicom leaves out and a character set that holds every string (encoders.header).

    Outputs then depend only on their inputs: encoding twice gives identical objects.
    """
    for date_kw, time_kw in (
        ("InstanceCreationDate", "InstanceCreationTime"),
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
        ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"),
    ):
        if date_kw in ds or date_kw == "SeriesDate":
            setattr(ds, date_kw, DA(now.date()))
            setattr(ds, time_kw, TM(now.time()))
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("Manufacturer") == "Highdicom open-source contributors":
            item.ContributionDateTime = DT(now)
    if "ContributingEquipmentSequence" not in ds:
        ds.ContributingEquipmentSequence = []
    ds.ContributingEquipmentSequence.append(contributing_equipment(model, now))
    carry_identity(ds, header)
    set_character_set(ds, header.character_set)


def notices(prediction: Prediction, model: ModelIdentity, wording: Notices = ENGLISH) -> list[str]:
    """The sentences every rendering of a result must carry, most important first.

    The model card's intended use and training data are quoted as the card writes them.
    """
    w = wording
    lines = [w.sentence(w.not_for_diagnosis)]
    if model.synthetic_training:
        lines.append(w.sentence(w.synthetic_notice))
    if prediction.out_of_distribution:
        lines.append(w.sentence(w.ood_notice))
    if any(f.tier == NOT_VALIDATED for f in prediction.findings):
        lines.append(w.sentence(w.not_validated_notice))
    if ops := operating_points_summary({f.label: f.operating_point for f in prediction.findings}):
        lines.append(w.operating_points_line.format(ops=ops))
    lines.append(w.model_line.format(name=model.name, version=software_version(model)))
    if model.intended_use:
        lines.append(w.intended_use_line.format(text=model.intended_use))
    if model.training_data:
        lines.append(w.training_data_line.format(text=model.training_data))
    return lines
