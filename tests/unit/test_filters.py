import pytest
from pydicom.dataset import Dataset

from dicom_node.filters import (
    CR_IMAGE,
    DX_PRESENTATION,
    DX_PROCESSING,
    SECONDARY_CAPTURE,
    Decision,
    classify,
)

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
GSPS = "1.2.840.10008.5.1.4.1.1.11.1"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def make(sop_class=CR_IMAGE, **kw) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "1.2.3.4"
    ds.PatientName = "DOE^JANE"
    defaults = {"Modality": "CR", "BodyPartExamined": "CHEST", "ViewPosition": "PA"}
    for key, value in {**defaults, **kw}.items():
        if value is None:
            continue
        setattr(ds, key, value)
    return ds


def seq_item(**kw) -> Dataset:
    item = Dataset()
    for k, v in kw.items():
        setattr(item, k, v)
    return item


# -- processed ---------------------------------------------------------------------------
@pytest.mark.parametrize("sop_class,modality", [
    (CR_IMAGE, "CR"), (DX_PRESENTATION, "DX"), (DX_PROCESSING, "DX"), (CR_IMAGE, None),
])
def test_frontal_chest_radiographs_processed(sop_class, modality):
    assert classify(make(sop_class, Modality=modality)) == Decision(True, None)


@pytest.mark.parametrize("view", ["PA", "AP", None, ""])
def test_frontal_or_absent_view(view):
    assert classify(make(ViewPosition=view)).process


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # real vendors send these
@pytest.mark.parametrize("body", ["CHEST", "THORAX", "LUNG", "TÓRAX", "chest"])
def test_chest_body_part_words(body):
    assert classify(make(BodyPartExamined=body)) == Decision(True, None)


@pytest.mark.parametrize("field,text", [
    ("StudyDescription", "XR CHEST 1 VIEW"),
    ("SeriesDescription", "Thorax p.a."),
    ("ProtocolName", "CXR portable"),
    ("StudyDescription", "RX TÓRAX PA"),
])
def test_no_body_part_but_description_says_chest(field, text):
    assert classify(make(BodyPartExamined=None, **{field: text})) == Decision(True, None)


def test_no_body_part_anywhere_is_processed_with_reason():
    d = classify(make(BodyPartExamined=None, StudyDescription="XR PORTABLE"))
    assert d == Decision(True, "body part not stated")


def test_frontal_view_code_processed():
    ds = make(ViewPosition=None)
    ds.ViewCodeSequence = [seq_item(CodeValue="399348003", CodingSchemeDesignator="SCT",
                                    CodeMeaning="antero-posterior")]
    assert classify(ds).process


def test_secondary_capture_of_chest_processed():
    assert classify(make(SECONDARY_CAPTURE, Modality="OT")).process
    ds = make(SECONDARY_CAPTURE, Modality=None, BodyPartExamined=None,
              SeriesDescription="scanned chest film")
    assert classify(ds).process


# -- lateral -----------------------------------------------------------------------------
@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL", "LAT"])
def test_lateral_view_position(view):
    assert classify(make(ViewPosition=view)) == Decision(False, "lateral view")


@pytest.mark.parametrize("value,scheme,meaning", [
    ("399067008", "SCT", "lateral"),
    ("R-10236", "SRT", "left lateral"),
    ("123", "99LOCAL", "Lateral projection"),
])
def test_lateral_view_code(value, scheme, meaning):
    ds = make(ViewPosition=None)
    ds.ViewCodeSequence = [seq_item(CodeValue=value, CodingSchemeDesignator=scheme, CodeMeaning=meaning)]
    assert classify(ds) == Decision(False, "lateral view")


def test_lateral_from_patient_orientation():
    assert classify(make(ViewPosition=None, PatientOrientation=["A", "F"])) == Decision(False, "lateral view")
    assert classify(make(ViewPosition=None, PatientOrientation=["L", "F"])).process


def test_lateral_from_series_description_when_view_absent():
    assert classify(make(ViewPosition=None, SeriesDescription="Chest LAT")) == Decision(False, "lateral view")
    # a study description covering both views does not make a frontal image lateral
    assert classify(make(ViewPosition=None, StudyDescription="CHEST PA AND LAT")).process


def test_image_laterality_is_not_a_view():
    assert classify(make(ImageLaterality="L")).process


@pytest.mark.parametrize("view", ["LLD", "RAO", "LLO"])
def test_other_views_skipped(view):
    d = classify(make(ViewPosition=view))
    assert not d.process and d.reason == f"view position {view} not frontal"


# -- not a chest radiograph --------------------------------------------------------------
@pytest.mark.parametrize("sop_class,name", [
    (CT_IMAGE, "CT Image Storage"),
    (BASIC_TEXT_SR, "Basic Text SR Storage"),
    (COMPREHENSIVE_3D_SR, "Comprehensive 3D SR Storage"),
    (GSPS, "Grayscale Softcopy Presentation State Storage"),
    (KOS, "Key Object Selection Document Storage"),
])
def test_other_sop_classes_skipped(sop_class, name):
    d = classify(make(sop_class, Manufacturer="ACME"))
    assert d == Decision(False, f"SOP class not processed: {name}")


def test_missing_sop_class():
    ds = make()
    del ds.SOPClassUID
    assert classify(ds) == Decision(False, "no SOP Class UID")


def test_sop_class_from_file_meta():
    ds = make()
    del ds.SOPClassUID
    ds.file_meta = Dataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE
    assert classify(ds).process


@pytest.mark.parametrize("modality", ["CT", "MR", "MG"])
def test_wrong_modality_in_radiograph_class(modality):
    assert classify(make(Modality=modality)) == Decision(False, f"modality {modality} not processed")


def test_secondary_capture_of_ct_skipped():
    d = classify(make(SECONDARY_CAPTURE, Modality="CT"))
    assert d == Decision(False, "secondary capture of modality CT not processed")


def test_secondary_capture_without_chest_evidence_skipped():
    d = classify(make(SECONDARY_CAPTURE, Modality="OT", BodyPartExamined=None))
    assert d == Decision(False, "secondary capture not stated to be chest")


@pytest.mark.parametrize("body", ["HAND", "KNEE", "ABDOMEN", "SKULL"])
def test_other_body_parts_skipped(body):
    assert classify(make(BodyPartExamined=body)) == Decision(False, f"body part {body} not chest")


def test_description_naming_other_anatomy_skipped():
    d = classify(make(BodyPartExamined=None, StudyDescription="XR HAND 2 VIEWS"))
    assert d == Decision(False, "body part not chest (description says hand)")
    d = classify(make(BodyPartExamined=None, SeriesDescription="Thoracic spine AP"))
    assert d == Decision(False, "body part not chest (description says spine)")


# -- our own results routed back -----------------------------------------------------------
def test_own_manufacturer_skipped():
    assert classify(make(Manufacturer="medsam2-cxr")) == Decision(False, "own result (no loop)")
    assert classify(make(Manufacturer="ACME"), own_manufacturer="ACME").reason == "own result (no loop)"


def test_own_contributing_equipment_skipped():
    ds = make(SECONDARY_CAPTURE, Manufacturer="Hospital PACS")
    ds.ContributingEquipmentSequence = [seq_item(Manufacturer="Other"),
                                        seq_item(Manufacturer="medsam2-cxr")]
    assert classify(ds) == Decision(False, "own result (no loop)")


@pytest.mark.parametrize("sop_class", [COMPREHENSIVE_3D_SR, BASIC_TEXT_SR, SECONDARY_CAPTURE])
def test_own_series_description_prefix_skipped(sop_class):
    ds = make(sop_class, Manufacturer="Rewritten by PACS", SeriesDescription="AI chest findings")
    assert classify(ds) == Decision(False, "own result (no loop)")


def test_ai_prefix_on_a_cr_is_not_ours():
    # a modality series called "AI ..." on a real CR is not taken for our result
    assert classify(make(SeriesDescription="AI trial chest")).process


def test_reason_never_quotes_free_text():
    d = classify(make(BodyPartExamined=None, StudyDescription="DOE^JANE hand"))
    assert "DOE" not in d.reason and "JANE" not in d.reason


# -- what the encoders write is recognised: loop prevention rests on the shared markers ----
@pytest.fixture(scope="module")
def encoded_results() -> dict:
    """SR, SC and text SR of one synthetic DX as a PACS sends them back: Part 10 bytes, read header-only."""
    import datetime as dt
    import io

    import pydicom

    from dicom_node.encoders.sc import encode_sc
    from dicom_node.encoders.sr import encode_sr
    from dicom_node.encoders.text import encode_text_sr
    from dicom_node.uids import ResultUIDs
    from index.draft import bootstrap_draft
    from models.labels import LABELS
    from models.preprocess import read_image
    from tests.unit.test_encoders import _model, _prediction, _synthetic_dx

    source, model, prediction = _synthetic_dx(), _model(), _prediction()
    now = dt.datetime(2025, 3, 4, 5, 6, 7)
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, model.digest)
    draft = bootstrap_draft({k: 0.6 for k in LABELS}, {k: 0.5 for k in LABELS})
    results = {"sr": encode_sr(source, prediction, model, uids, now),
               "sc": encode_sc(source, read_image(source), prediction, model, uids, now),
               "text": encode_text_sr(source, prediction, model, draft, uids, now)}
    out = {}
    for kind, ds in results.items():
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out[kind] = pydicom.dcmread(io.BytesIO(buf.getvalue()), stop_before_pixels=True)
    return out


@pytest.mark.parametrize("kind", ["sr", "sc", "text"])
def test_every_encoded_result_carries_the_shared_markers_and_is_skipped(encoded_results, kind):
    from dicom_node import sop

    ds = encoded_results[kind]
    assert ds.SOPClassUID == sop.RESULT_CLASSES[kind]
    assert ds.Manufacturer == sop.MANUFACTURER
    assert str(ds.SeriesDescription).startswith(sop.OWN_SERIES_PREFIX)
    assert ds.SOPClassUID in sop.IMAGE_STORAGE + sop.STORED_AND_SKIPPED  # the listener takes it back
    if kind == "sc":
        assert ds.file_meta.TransferSyntaxUID == sop.SC_TRANSFER_SYNTAX
        assert sop.SC_TRANSFER_SYNTAX in sop.TRANSFER_SYNTAXES
    assert classify(ds) == Decision(False, "own result (no loop)")


@pytest.mark.parametrize("kind", ["sr", "sc", "text"])
def test_each_marker_alone_marks_an_encoded_result_as_ours(encoded_results, kind):
    """A PACS may rewrite the Manufacturer or the series description: either marker still stops a loop."""
    import copy

    only_series = copy.deepcopy(encoded_results[kind])
    only_series.Manufacturer = "Hospital PACS"
    del only_series.ContributingEquipmentSequence
    assert classify(only_series) == Decision(False, "own result (no loop)")

    only_manufacturer = copy.deepcopy(encoded_results[kind])
    only_manufacturer.SeriesDescription = "Chest findings"
    assert classify(only_manufacturer) == Decision(False, "own result (no loop)")

    only_equipment = copy.deepcopy(only_manufacturer)
    only_equipment.Manufacturer = "Hospital PACS"
    assert classify(only_equipment) == Decision(False, "own result (no loop)")  # our Contributing Equipment item
