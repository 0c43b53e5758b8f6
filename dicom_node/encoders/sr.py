"""Prediction -> Comprehensive 3D SR with a TID 1500 Measurement Report (IHE AIR style).

One measurement group (TID 1501) per CheXpert label carries: finding type, Present/Absent, the
calibrated probability, the confidence tier as Certainty of Finding (a private "not validated" code
from a bundle never validated on real images), and the operating point that chose its threshold
as a TID 4019 Algorithm Parameter. One more group carries the
out-of-distribution score. Warnings a reader must see (not for primary diagnosis, synthetic
training) go in the TID 1500 "Qualitative Evaluations" container as TEXT items, and the synthetic
notice also as a TID 4019 Algorithm Parameter so each group repeats it.

When a similar cases index is configured, the same container also carries the drafted report
(FINDINGS and IMPRESSION as DCM Finding / Impression TEXT items), one TEXT item per similar prior
case (case id, similarity, key findings) and one per guideline reference; without one it says
"No similar cases index configured". Every sentence a reader sees comes from the report wording
(index/wording.py, `[report] language`); coded concepts keep their standard code meanings.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

import highdicom as hd
from pydicom.sr.coding import Code
from pydicom import Dataset
from pydicom.valuerep import DA, DT, TM

from dicom_node import codes
from dicom_node.encoders.header import SourceHeader, carry_identity, clean_header, set_character_set
from dicom_node.uids import ResultUIDs, derive_uid
from index.wording import ENGLISH, Wording
from models.operating_points import describe as describe_operating_point
from models.operating_points import summary as operating_points_summary
from models.prediction import NOT_VALIDATED, Finding, ModelIdentity, Prediction

if TYPE_CHECKING:
    from index.draft import Draft

SR_SERIES_NUMBER = 9901
# The English notices (header attributes and the SC always use these); results take their wording's.
NOT_FOR_DIAGNOSIS = ENGLISH.not_for_diagnosis
SYNTHETIC_NOTICE = ENGLISH.synthetic_notice
OOD_NOTICE = ENGLISH.ood_notice
NOT_VALIDATED_NOTICE = ENGLISH.not_validated_notice
DRAFT_NOTICE = ENGLISH.draft_notice

# Draft report concepts: DCM where one exists, the project's private scheme (declared in
# codes.CODING_SCHEME_IDENTIFICATION) for similar cases and guideline references.
DRAFT_FINDING = Code("121071", "DCM", "Finding")
DRAFT_IMPRESSION = Code("121073", "DCM", "Impression")
SIMILAR_CASES = Code("SIMCASES", codes.PRIVATE_SCHEME, "Similar prior cases")
SIMILAR_CASE = Code("SIMCASE", codes.PRIVATE_SCHEME, "Similar prior case")
GUIDELINE_REFERENCES = Code("GUIDEREFS", codes.PRIVATE_SCHEME, "Guideline references")
GUIDELINE_REFERENCE = Code("GUIDEREF", codes.PRIVATE_SCHEME, "Guideline reference")


def software_version(model: ModelIdentity) -> str:
    """Version plus short bundle digest: the version alone does not identify the weights."""
    return f"{model.version}+{model.short_digest}"


def device_uid(model: ModelIdentity) -> str:
    """One Device UID per model bundle, stable across runs and hosts."""
    return derive_uid("device", model.digest)


def series_description(model: ModelIdentity, kind: str) -> str:
    """Series description (LO, 64 chars) that says what the series is and what it is not."""
    if model.synthetic_training:
        text = f"AI {kind} - MedSAM2-CXR (phantom-trained, not for diagnosis)"
    else:
        text = f"AI {kind} - MedSAM2-CXR (not for primary diagnosis)"
    return text[:64]


def contributing_equipment(model: ModelIdentity, now: datetime.datetime) -> Dataset:
    """The IHE AIR "Processing Algorithm" item naming this model.

    Built by hand: highdicom's ContributingEquipment only accepts DCM purposes, and AIR wants
    (Newcode1, 99IHE) plus a Device UID.
    """
    item = Dataset()
    item.Manufacturer = model.manufacturer or codes.MANUFACTURER
    item.ManufacturerModelName = model.name[:64]
    item.SoftwareVersions = software_version(model)[:64]
    item.DeviceUID = device_uid(model)
    item.ContributionDateTime = DT(now)
    item.ContributionDescription = f"{codes.ALGORITHM_NAME}; {NOT_FOR_DIAGNOSIS}"[:64]
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(codes.PROCESSING_ALGORITHM)]
    return item


def equipment_and_dates(model: ModelIdentity, now: datetime.datetime) -> dict:
    """The constructor keywords every result object shares: who made it, and when (from `now`)."""
    return dict(manufacturer=codes.MANUFACTURER, manufacturer_model_name=model.name,
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


def operating_point_line(finding: Finding) -> str:
    """How the finding's threshold was chosen, e.g. "operating point sensitivity:0.90 (validation
    sensitivity >= 90%), threshold 0.1234" (an algorithm parameter: English, like the codes)."""
    if not finding.operating_point:
        return f"threshold {finding.threshold:.4f}"
    return (f"operating point {finding.operating_point} ({describe_operating_point(finding.operating_point)}), "
            f"threshold {finding.threshold:.4f}")


def _algorithm(model: ModelIdentity, wording: Wording = ENGLISH,
               extra: tuple[str, ...] = ()) -> hd.sr.AlgorithmIdentification:
    params = [f"bundle sha256 {model.digest}"[:1024], *extra]
    if model.operating_points:
        params.append(f"site operating points {model.operating_points}"[:1024])
    if model.synthetic_training:
        params.append(wording.synthetic_notice)
    return hd.sr.AlgorithmIdentification(
        name=codes.ALGORITHM_NAME, version=software_version(model), parameters=params
    )


def _finding_groups(
    source: Dataset,
    prediction: Prediction,
    model: ModelIdentity,
    uids: ResultUIDs,
    wording: Wording = ENGLISH,
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    groups = []
    for finding in prediction.findings:
        algorithm = _algorithm(model, wording, (operating_point_line(finding),))  # names the operating point
        concept = codes.LABEL_CODES[finding.label]
        site = codes.LABEL_FINDING_SITES.get(finding.label)
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derive_uid("tracking", uids.sr_instance, finding.label),
                    identifier=finding.label,
                ),
                finding_type=concept,
                finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=codes.PROBABILITY,
                        value=round(float(finding.probability), 4),
                        unit=codes.UNITLESS,
                    )
                ],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=concept, value=codes.PRESENT if finding.present else codes.ABSENT
                    ),
                    hd.sr.QualitativeEvaluation(
                        name=codes.CERTAINTY, value=codes.TIER_CODES[finding.tier]
                    ),
                ],
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
            )
        )
    return groups


def _ood_group(
    source: Dataset,
    prediction: Prediction,
    algorithm: hd.sr.AlgorithmIdentification,
    uids: ResultUIDs,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid("tracking", uids.sr_instance, "ood"),
            identifier="Out of distribution",
        ),
        finding_type=codes.OUTSIDE_EXPERIENCE,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.OOD_SCORE,
                value=round(float(prediction.ood_score), 4),
                unit=codes.UNITLESS,
            ),
            hd.sr.Measurement(
                name=codes.OOD_THRESHOLD,
                value=round(float(prediction.ood_threshold), 4),
                unit=codes.UNITLESS,
            ),
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=codes.OUTSIDE_EXPERIENCE,
                value=codes.YES if prediction.out_of_distribution else codes.NO,
            )
        ],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )


def notices(prediction: Prediction, model: ModelIdentity, wording: Wording = ENGLISH) -> list[str]:
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


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def draft_items(draft: Draft | None, wording: Wording = ENGLISH) -> list[hd.sr.TextContentItem]:
    """TEXT items for the drafted report, the similar cases and the guideline references."""
    w = wording
    if draft is None:
        return [_text(codes.COMMENT, w.sentence(w.capitalised(w.no_index)))]
    items = [_text(codes.COMMENT, w.sentence(w.draft_notice)),
             _text(DRAFT_FINDING, draft.findings), _text(DRAFT_IMPRESSION, draft.impression)]
    items += [_text(SIMILAR_CASE, line) for line in draft.similar_lines()]
    items += [_text(GUIDELINE_REFERENCE, line) for line in draft.reference_lines()]
    items += [_text(codes.COMMENT, note) for note in draft.notes]
    return items


def _notice_container(prediction: Prediction, model: ModelIdentity,
                      draft: Draft | None = None, wording: Wording = ENGLISH) -> hd.sr.ContainerContentItem:
    """TID 1500 rows 10-12: document-level qualitative evaluations: free-text notices, the draft."""
    container = hd.sr.ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.COMMENT,
                value=line[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for line in notices(prediction, model, wording)
        ]
        + draft_items(draft, wording)
    )
    return container


def _library_describable(source: Dataset) -> bool:
    """Whether highdicom can write TID 1600 Image Library descriptors for this source.

    For CR/DX/MG/etc. it needs Patient Orientation and Imager Pixel Spacing; many real CRs lack
    the latter. Rather than invent a spacing we then omit the optional library: every measurement
    group and the evidence sequence still reference the source image.
    """
    projection = str(source.get("Modality", "")) in {"CR", "DX", "MG", "IO", "PX", "RF", "XA"}
    if not projection:
        return True
    return bool(source.get("PatientOrientation")) and bool(source.get("ImagerPixelSpacing"))


def encode_sr(
    source: Dataset,
    prediction: Prediction,
    model: ModelIdentity,
    uids: ResultUIDs,
    now: datetime.datetime,
    draft: Draft | None = None,
    wording: Wording | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Encode one prediction as a TID 1500 SR in the source's study, in the model's SR series.

    draft: the drafted report and similar cases (index/draft.py); None when no index is configured.
    wording: the language of the notices (index/wording.py); None: the draft's, else English.

    Raises
    ------
    KeyError
        A finding label or tier without a code (a contract violation upstream).
    HeaderError
        The source lacks a Type 1 attribute the SR must reference (encoders.header).
    """
    header = clean_header(source)
    source = header.dataset
    wording = wording or (draft.wording if draft is not None else ENGLISH)
    algorithm = _algorithm(model, wording)
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DEVICE_OBSERVER,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_uid(model),
                name=model.name,
                manufacturer_name=model.manufacturer or codes.MANUFACTURER,
                model_name=codes.ALGORITHM_NAME,
            ),
        )
    )
    groups = _finding_groups(source, prediction, model, uids, wording)
    groups.append(_ood_group(source, prediction, algorithm, uids))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
        referenced_images=[source] if _library_describable(source) else None,
    )
    report[0].ContentSequence.append(_notice_container(prediction, model, draft, wording))

    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=uids.sr_series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        is_complete=True,
        is_final=False,
        is_verified=False,
        coding_schemes=[codes.CODING_SCHEME_IDENTIFICATION],
        series_description=series_description(model, "findings"),
        **equipment_and_dates(model, now),
    )
    finish(sr, model, now, header)
    return sr
