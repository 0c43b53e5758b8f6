"""De-identification (PS3.15 Basic profile via dicognito) and re-identification at the sending site."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from dicom_node.deid import DeidentificationError, ReidentificationMap, deidentify, forward, reidentify


def _source() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "DOE^JANE", "PID-4711", "19700101", "F"
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "ACC-99", "20240301", "101500"
    ds.InstitutionName, ds.ReferringPhysicianName = "St Elsewhere", "HOUSE^GREG"
    ds.StudyDescription, ds.Modality, ds.BurnedInAnnotation = "CHEST PA for Jane Doe", "DX", "NO"
    return ds


def test_basic_profile_removes_identifiers_and_says_so():
    src = _source()
    out = deidentify(src, key="site-secret")
    text = str(out)
    for value in ("DOE", "JANE", "PID-4711", "19700101", "ACC-99", "St Elsewhere", "HOUSE"):
        assert value not in text, value
    assert out.StudyInstanceUID != src.StudyInstanceUID and out.SOPInstanceUID != src.SOPInstanceUID
    assert out.SOPClassUID == src.SOPClassUID and out.Modality == "DX"
    assert out.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    assert src.PatientName == "DOE^JANE"  # the input is untouched


def test_same_key_same_pseudonyms_other_key_other_pseudonyms():
    src = _source()
    a, b = deidentify(src, "k1"), deidentify(src, "k1")
    c = deidentify(src, "k2")
    assert (a.PatientID, a.StudyInstanceUID) == (b.PatientID, b.StudyInstanceUID)
    assert a.PatientID != c.PatientID and a.StudyInstanceUID != c.StudyInstanceUID


def test_burned_in_annotation_and_empty_key_refused():
    src = _source()
    src.BurnedInAnnotation = "YES"
    with pytest.raises(DeidentificationError, match="Burned In Annotation"):
        deidentify(src, "k")
    assert deidentify(src, "k", allow_burned_in_annotation=True).PatientIdentityRemoved == "YES"
    with pytest.raises(DeidentificationError, match="site key"):
        deidentify(_source(), "")


def test_forward_to_hub_and_reidentify_the_returned_result(tmp_path):
    reid = ReidentificationMap(tmp_path / "spool" / "reid.sqlite")
    src = _source()
    sent = forward(src, "site-secret", reid)
    assert "DOE" not in str(sent)
    # The hub reads the pseudonymous study and returns an SR referencing it.
    result = Dataset()
    result.SOPClassUID, result.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.34", generate_uid()
    result.StudyInstanceUID, result.SeriesInstanceUID = sent.StudyInstanceUID, generate_uid()
    result.PatientName, result.PatientID = sent.PatientName, sent.PatientID
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = sent.SOPClassUID, sent.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID, series.ReferencedSOPSequence = sent.SeriesInstanceUID, Sequence([ref])
    study = Dataset()
    study.StudyInstanceUID, study.ReferencedSeriesSequence = sent.StudyInstanceUID, Sequence([series])
    result.CurrentRequestedProcedureEvidenceSequence = Sequence([study])
    result.PatientIdentityRemoved = "YES"

    back = reidentify(result, reid)
    assert back.PatientName == "DOE^JANE" and back.PatientID == "PID-4711" and back.PatientBirthDate == "19700101"
    assert back.StudyInstanceUID == src.StudyInstanceUID and back.AccessionNumber == "ACC-99"
    ev = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.StudyInstanceUID == src.StudyInstanceUID
    assert ev.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert back.SOPInstanceUID == result.SOPInstanceUID  # the hub's own result keeps its UID
    assert "PatientIdentityRemoved" not in back
    stranger = Dataset()
    stranger.StudyInstanceUID = generate_uid()
    with pytest.raises(KeyError, match="not forwarded from this site"):
        reidentify(stranger, reid)


def test_deidentify_a_phantom_file(phantom_dir):
    f = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    ds = pydicom.dcmread(f)
    out = deidentify(ds, "k", allow_burned_in_annotation=True)
    assert str(ds.PatientID) not in str(out) and out.PixelData == ds.PixelData


def test_echoed_pseudonymous_values_are_put_back_and_the_results_own_are_kept(tmp_path):
    reid = ReidentificationMap(tmp_path / "reid.sqlite")
    src = _source()
    src.AcquisitionDate, src.StationName, src.ContentDate = "20240301", "XRAY-ROOM-3", "20240301"
    sent = forward(src, "site-secret", reid)
    assert sent.AcquisitionDate != "20240301" and sent.StationName != "XRAY-ROOM-3"
    result = Dataset()  # a hub's SC echoing the source's acquisition date and station, made today
    result.SOPClassUID, result.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid()
    result.StudyInstanceUID, result.SeriesInstanceUID = sent.StudyInstanceUID, generate_uid()
    result.AcquisitionDate, result.StationName, result.ContentDate = sent.AcquisitionDate, sent.StationName, "20261203"
    result.SeriesDescription = "medsam2-cxr saliency"
    equipment = Dataset()  # the SC's "acquisition equipment" item echoes the source's institution
    equipment.InstitutionName, equipment.Manufacturer = sent.InstitutionName, "ACME"
    result.ContributingEquipmentSequence = Sequence([equipment])
    back = reidentify(result, reid)
    assert back.ContributingEquipmentSequence[0].InstitutionName == "St Elsewhere"
    assert (back.AcquisitionDate, back.StationName) == ("20240301", "XRAY-ROOM-3")
    assert back.ContentDate == "20261203" and back.SeriesDescription == "medsam2-cxr saliency"
    assert back.StudyDate == "20240301" and back.ReferringPhysicianName == "HOUSE^GREG"
