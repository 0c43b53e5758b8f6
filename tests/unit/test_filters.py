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
