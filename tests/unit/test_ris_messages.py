"""The ORU^R01 and FHIR Bundle builders (ris/), without a network: structure, character sets, identifiers."""

from __future__ import annotations

import base64
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node import codes
from models.labels import LABELS
from models.prediction import Finding, ModelIdentity, Prediction
from ris import charset, fhir, hl7v2
from ris.content import DraftText, Inferred, ReportContent, gather

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
MODEL = ModelIdentity("MedSAM2-CXR", "1.0", "ab" * 32, "medsam2-cxr", True, "synthetic phantoms", "research only")


def _prediction(present: tuple[str, ...] = ("Pneumothorax",)) -> Prediction:
    findings = tuple(Finding(label, 0.91 if label in present else 0.08, 0.5, "high", 0.01,
                             "sensitivity:0.90" if label == "Pneumothorax" else "") for label in LABELS)
    return Prediction(findings=findings, ood_score=0.2, ood_threshold=0.6, center=np.zeros(2), radius=np.zeros(2))


def _source(tmp_path: Path, name: str, charset_value, **extra) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SpecificCharacterSet = charset_value
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = name, "ID|7^1", "19700101", "M"
    ds.AccessionNumber, ds.StudyDate, ds.StudyTime = "ACC1", "20261128", "101500"
    for k, v in extra.items():
        setattr(ds, k, v)
    path = tmp_path / f"{generate_uid()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _content(tmp_path, name="Doe^John", charset_value="ISO_IR 100", urgent=False, language="en", **extra):
    return gather([Inferred("job-1", _source(tmp_path, name, charset_value, **extra), _prediction(), MODEL, None,
                            urgent)], NOW, language)


def _build(content) -> tuple[str, charset.Charset]:
    return hl7v2.build(content, control=hl7v2.control_id(content.key), sending_application="MEDSAM2CXR",
                       receiving_application="RIS")


def _strict(er7: str):
    msg = parse_message(er7.strip("\r"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    msg.validate()
    return msg


def test_oru_parses_against_the_251_structure_with_escaped_values(tmp_path):
    er7, cs = _build(_content(tmp_path))
    msg = _strict(er7)
    assert msg.name == "ORU_R01" and cs.names == ("8859/1",)
    pid = [s for s in er7.split("\r") if s.startswith("PID|")][0].split("|")
    assert pid[3].startswith("ID\\F\\7\\S\\1^")  # delimiters inside a value are escaped, not fields
    assert msg.children[1].children[0].pid.pid_3.cx_1.to_er7() == "ID\\F\\7\\S\\1"
    tq1 = [s for s in er7.split("\r") if s.startswith("TQ1|")][0].split("|")
    assert tq1[9] == "R^Routine^HL70485"
    urgent, _ = _build(_content(tmp_path, urgent=True))
    assert "|S^Stat^HL70485" in urgent and "^^^^^S" in urgent


def test_one_coded_obx_per_finding_with_probability_tier_and_operating_point(tmp_path):
    er7, _ = _build(_content(tmp_path))
    obx = [s.split("|") for s in er7.split("\r") if s.startswith("OBX|")]
    coded = {o[4]: o for o in obx if o[2] == "CWE" and o[17].startswith("Newcode1")}
    assert len(coded) == len(LABELS)
    ptx = next(o for o in coded.values() if o[3].startswith("36118008^Pneumothorax^SCT"))
    sub = ptx[4]
    assert ptx[5] == "52101004^Present^SCT" and ptx[8] == "A"
    group = {o[3].split("^")[0]: o for o in obx if o[4] == sub}
    assert group["122157"][5] == "0.9100" and group["122157"][7] == ">=0.5000" and group["122157"][6].endswith("UCUM")
    assert group["111012"][5] == "111575^High^DCM"
    assert group["OPPOINT"][2] == "ST" and group["OPPOINT"][5] == "sensitivity:0.90"
    assert [int(o[1]) for o in obx] == list(range(1, len(obx) + 1))


def test_control_id_is_the_studys_and_fits_msh10(tmp_path):
    assert hl7v2.control_id("1.2.3") == hl7v2.control_id("1.2.3") != hl7v2.control_id("1.2.4")
    assert len(hl7v2.control_id("x" * 100)) <= 20
    content = _content(tmp_path)
    assert content.key == "1.2.826.0.1.3680043.8.498.1"  # the study's, whichever job or target sends it


def test_japanese_study_keeps_iso2022_and_the_three_name_groups(tmp_path):
    content = _content(tmp_path, name="Yamada^Tarou=山田^太郎=やまだ^たろう", charset_value=["", "ISO 2022 IR 87"])
    er7, cs = _build(content)
    assert cs.names == ("ISO IR6", "ISO IR87") and cs.scheme == "ISO 2022-1994"
    data = cs.encode(er7)
    assert b"\x1b$B" in data  # JIS X 0208 designated by an escape sequence, as ISO 2022 does
    text = data.decode("iso2022_jp")
    msh = text.split("\r")[0].split("|")
    assert msh[17] == "ISO IR6~ISO IR87" and msh[19] == "ISO 2022-1994"
    pid5 = [s for s in text.split("\r") if s.startswith("PID|")][0].split("|")[5].split("~")
    assert pid5 == ["Yamada^Tarou^^^^^L^A", "山田^太郎^^^^^L^I", "やまだ^たろう^^^^^L^P"]
    _strict(text)


@pytest.mark.parametrize("dicom,hl7", [("ISO_IR 192", ("UNICODE UTF-8",)), ("", ("ASCII",)),
                                       ("ISO_IR 100", ("8859/1",)), ("GB18030", ("GB 18030-2000",)),
                                       ("ISO_IR 144", ("8859/5",))])
def test_character_set_names(dicom, hl7):
    assert charset.from_dicom(dicom).names == hl7


def test_text_the_study_set_cannot_hold_goes_as_utf8(tmp_path):
    # a Japanese draft for a Latin-1 study: MSH-18 says UTF-8 and the bytes are UTF-8
    er7, cs = _build(_content(tmp_path, charset_value="ISO_IR 100", language="ja"))
    assert cs.names == ("UNICODE UTF-8",) and "|UNICODE UTF-8|" in er7
    cs.encode(er7).decode("utf-8")
    _strict(er7)


def test_long_draft_lines_are_wrapped_into_tx_lines(tmp_path):
    content = _content(tmp_path)
    long = ReportContent(**{**content.__dict__, "draft": DraftText("word " * 200, "An | impression ^ here.")})
    er7, _ = _build(long)
    tx = [s.split("|") for s in er7.split("\r") if s.startswith("OBX|") and "|TX|" in s]
    assert all(len(o[5]) <= hl7v2.TX_LINE for o in tx)
    assert " ".join(o[5] for o in tx if o[3].startswith("59776-5")).split() == ["word"] * 200
    assert [o[5] for o in tx if o[3].startswith("19005-8")] == ["An \\F\\ impression \\S\\ here."]
    _strict(er7)


def test_fhir_bundle_validates_and_its_identifiers_derive_from_the_study(tmp_path):
    from fhir.resources.R4B.bundle import Bundle

    content = _content(tmp_path)
    bundle = fhir.build_bundle(content)
    Bundle.model_validate(bundle)
    assert bundle == fhir.build_bundle(content), "the same study makes the same Bundle"
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Observation"] * (len(LABELS) + 1) + ["DiagnosticReport"]
    for e in bundle["entry"]:
        ident = e["resource"]["identifier"][0]
        assert e["request"] == {"method": "POST", "url": e["resource"]["resourceType"],
                                "ifNoneExist": f"identifier={ident['system']}|{ident['value']}"}
        assert e["fullUrl"] == ident["value"]
    report = bundle["entry"][-1]["resource"]
    assert report["imagingStudy"][0]["identifier"]["value"] == "urn:oid:1.2.826.0.1.3680043.8.498.1"
    assert report["conclusion"] == content.draft.impression
    assert [c["coding"][0]["code"] for c in report["conclusionCode"]] == ["36118008"]
    assert "FINDINGS:" in base64.b64decode(report["presentedForm"][0]["data"]).decode()
    other = fhir.build_bundle(ReportContent(**{**content.__dict__, "key": "1.2.826.0.1.3680043.8.498.2"}))
    assert other["entry"][-1]["fullUrl"] != bundle["entry"][-1]["fullUrl"]
    json.dumps(bundle)


def test_draft_is_read_from_the_text_sr_the_pacs_got(tmp_path):
    from dicom_node.encoders.text import encode_text_sr
    from dicom_node.uids import ResultUIDs, results_key
    from index.draft import Drafter
    from index.labelers import get_extractor

    src = _source(tmp_path, "Doe^John", "ISO_IR 100", SeriesInstanceUID=generate_uid(), Modality="CR")
    ds = pydicom.dcmread(src)
    prediction = _prediction()
    draft = Drafter(get_extractor("lexicon")).draft(prediction, None)
    uids = ResultUIDs.for_source(ds.StudyInstanceUID, ds.SOPInstanceUID, results_key(MODEL))
    text_sr = tmp_path / "text.dcm"
    encode_text_sr(ds, prediction, MODEL, draft, uids, NOW).save_as(text_sr, enforce_file_format=True)
    content = gather([Inferred("job-1", src, prediction, MODEL, text_sr, False)], NOW)
    assert content.draft.findings == draft.findings and content.draft.impression == draft.impression
    assert any("not for primary diagnosis" in n for n in content.notices)


def _two_images(tmp_path) -> ReportContent:
    """A study of two frontal images: the PA shows a pneumothorax, the AP a higher effusion
    probability, is out of distribution and urgent."""
    pa = _prediction(present=("Pneumothorax",))
    ap = Prediction(findings=tuple(Finding(f.label, 0.77 if f.label == "Pleural Effusion" else 0.05, f.threshold,
                                           "medium", 0.02) for f in pa.findings),
                    ood_score=0.9, ood_threshold=0.6, center=np.zeros(2), radius=np.zeros(2))
    one = _source(tmp_path, "Doe^John", "ISO_IR 100", ViewPosition="PA")
    two = _source(tmp_path, "Doe^John", "ISO_IR 100", ViewPosition="AP")
    return gather([Inferred("job-1", one, pa, MODEL, None, False), Inferred("job-2", two, ap, MODEL, None, True)], NOW)


def test_a_two_image_study_is_one_report_naming_the_image_of_each_finding(tmp_path):
    content = _two_images(tmp_path)
    pa, ap = content.images
    assert content.job_ids == ["job-1", "job-2"] and content.urgent and (pa.view, ap.view) == ("PA", "AP")
    by_label = {sf.finding.label: sf for sf in content.findings}
    assert len(by_label) == len(LABELS)
    assert by_label["Pneumothorax"].image == 0 and by_label["Pneumothorax"].finding.probability == 0.91
    assert by_label["Pleural Effusion"].image == 1 and by_label["Pleural Effusion"].finding.present
    assert by_label["Cardiomegaly"].finding.probability == 0.08 and by_label["Cardiomegaly"].image == 0
    assert content.draft.findings.startswith("Image 1 (PA): ") and "\nImage 2 (AP): " in content.draft.findings
    assert f"Image 2 (AP): SOP Instance UID {ap.sop_instance_uid}" in content.draft.notes

    er7, _ = _build(content)
    _strict(er7)
    obx = [s.split("|") for s in er7.split("\r") if s.startswith("OBX|")]
    source = {o[4]: o[5] for o in obx if o[3].startswith("SRCIMG^")}
    coded = {o[3].split("^")[0]: o[4] for o in obx if o[2] == "CWE" and o[17].startswith("Newcode1")}
    assert source[coded[codes.LABEL_CODES["Pneumothorax"].value]] == pa.sop_instance_uid
    assert source[coded[codes.LABEL_CODES["Pleural Effusion"].value]] == ap.sop_instance_uid
    ood = [o for o in obx if o[3].startswith("OODIMG^")]
    assert [source[o[4]] for o in ood] == [pa.sop_instance_uid, ap.sop_instance_uid]
    assert [o[5].split("^")[1] for o in ood] == ["No", "Yes"] and [o[8] for o in ood] == ["N", "A"]
    assert "|S^Stat^HL70485" in er7, "urgent when any image is"
    assert sum(s.startswith("MSH|") for s in er7.split("\r")) == 1

    bundle = fhir.build_bundle(content)
    observations = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert len(observations) == len(LABELS) + 2  # one per label, one out-of-distribution per image
    effusion = next(o for o in observations if o["code"].get("text") == "Pleural Effusion")
    assert {"code": fhir.concept(codes.SOURCE_IMAGE), "valueString": ap.sop_instance_uid} in effusion["component"]
    assert len({e["fullUrl"] for e in bundle["entry"]}) == len(bundle["entry"])
