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
"No similar cases index configured". Every sentence a reader sees is a notice in the configured
language (encoders/notices.py, `[report] language`) or a line of the draft, written by the drafter
in that language (index/draft.py); coded concepts keep their standard code meanings.
"""

from __future__ import annotations

import datetime

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.coding import Code

from dicom_node import codes
from dicom_node.encoders.common import (
    DraftLines,
    device_observer,
    equipment_and_dates,
    finish,
    notices,
    series_description,
    software_version,
)
from dicom_node.encoders.header import clean_header
from dicom_node.encoders.notices import ENGLISH, Notices
from dicom_node.uids import ResultUIDs, derive_uid
from models.operating_points import describe as describe_operating_point
from models.prediction import Finding, ModelIdentity, Prediction

SR_SERIES_NUMBER = 9901


def operating_point_line(finding: Finding) -> str:
    """How the finding's threshold was chosen, e.g. "operating point sensitivity:0.90 (validation
    sensitivity >= 90%), threshold 0.1234" (an algorithm parameter: English, like the codes)."""
    if not finding.operating_point:
        return f"threshold {finding.threshold:.4f}"
    return (f"operating point {finding.operating_point} ({describe_operating_point(finding.operating_point)}), "
            f"threshold {finding.threshold:.4f}")


def _algorithm(model: ModelIdentity, wording: Notices = ENGLISH,
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
    wording: Notices = ENGLISH,
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


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def draft_items(draft: DraftLines | None, wording: Notices = ENGLISH) -> list[hd.sr.TextContentItem]:
    """TEXT items for the drafted report, the similar cases and the guideline references."""
    w = wording
    if draft is None:
        return [_text(codes.COMMENT, w.sentence(w.capitalised(w.no_index)))]
    items = [_text(codes.COMMENT, w.sentence(w.draft_notice)),
             _text(codes.DRAFT_FINDING, draft.findings), _text(codes.DRAFT_IMPRESSION, draft.impression)]
    items += [_text(codes.SIMILAR_CASE, line) for line in draft.similar_lines()]
    items += [_text(codes.GUIDELINE_REFERENCE, line) for line in draft.reference_lines()]
    items += [_text(codes.COMMENT, note) for note in draft.notes]
    return items


def _notice_container(prediction: Prediction, model: ModelIdentity,
                      draft: DraftLines | None = None, wording: Notices = ENGLISH) -> hd.sr.ContainerContentItem:
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
    draft: DraftLines | None = None,
    wording: Notices | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Encode one prediction as a TID 1500 SR in the source's study, in the model's SR series.

    draft: the drafted report and similar cases (encoders.common.DraftLines, made by index/draft.py);
    None when no index is configured.
    wording: the language of the notices (encoders/notices.py; an index.wording.Wording is one);
    None: the draft's, else English.

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
    observation_context = device_observer(model)
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
