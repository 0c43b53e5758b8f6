"""Source headers as Japanese and European sites send them: character sets and dirty values.

Each `Case` takes a clean, small DX chest image and changes its header the way a real modality
or PACS does, written to bytes and read back so that the node decodes it as it would a received
file. `expect` says what a result must do with the attributes the case dirtied (every other
identity attribute must decode equal to the source's):
- a value: the result carries that (a repair);
- "" : the result has the attribute empty (Type 2 with an invalid value);
- None: the result leaves the attribute out (Type 3 with an invalid value);
- KEEP: the result carries it exactly as received, although invalid (Patient ID, Study Instance
  UID, Accession Number: what the PACS matches on); dciodvfy may name only these.
A case with `fails` set must make the encoders raise HeaderError naming that tag.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

KEEP = "<kept as received>"
IDENTITY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
            "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "InstitutionName", "ReferringPhysicianName")
PYDICOM_CHARSET_FILES = Path(pydicom.__file__).parent / "data" / "charset_files"


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    change: Callable[[Dataset], None]
    expect: dict[str, object] = field(default_factory=dict)
    fails: str | None = None  # keyword of the Type 1 attribute the encoders must refuse


def base() -> Dataset:
    """A small, complete and valid DX For Presentation chest image (256 x 200, 12 bits)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.511.3.1001"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.511.1.1001"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.511.2.1001"
    ds.PatientName = "Test^Chest"
    ds.PatientID = "P-0001"
    ds.PatientBirthDate = "19550301"
    ds.PatientSex = "F"
    ds.PatientAge = "070Y"
    ds.StudyDate = "20250301"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDescription = "Chest PA"
    ds.ReferringPhysicianName = "Doctor^Referring"
    ds.InstitutionName = "General Hospital"
    ds.Modality = "DX"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "Phantom Devices"
    ds.ManufacturerModelName = "PD-1"
    ds.StationName = "XR1"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.2, 0.2]
    ds.Rows, ds.Columns = 256, 200
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    y, x = np.mgrid[0:256, 0:200]
    ds.PixelData = ((np.sin(x / 20.0) + np.cos(y / 25.0) + 2) * 1000).astype(np.uint16).tobytes()
    return ds


def received(case: Case) -> Dataset:
    """The case's header written to bytes and read back, as the node reads a received file."""
    ds = base()
    case.change(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _set(**values: object) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return change


def _raw(tag: int, vr: str, value: bytes) -> Callable[[Dataset], None]:
    """A value as raw bytes, as a sender put it on the wire (padding and all)."""
    def change(ds: Dataset) -> None:
        ds.add_new(tag, vr, value)
    return change


def _charset(charset: str | list[str], **identity: str) -> Callable[[Dataset], None]:
    def change(ds: Dataset) -> None:
        ds.SpecificCharacterSet = charset
        for keyword, value in identity.items():
            setattr(ds, keyword, value)
    return change


def _from_pydicom_file(name: str) -> Callable[[Dataset], None]:
    """The character set and identity of one of pydicom's real character-set test files."""
    def change(ds: Dataset) -> None:
        src = pydicom.dcmread(PYDICOM_CHARSET_FILES / name)
        ds.SpecificCharacterSet = src.SpecificCharacterSet
        for keyword in ("PatientName", "InstitutionName", "StudyDescription", "ReferringPhysicianName"):
            if src.get(keyword):
                setattr(ds, keyword, src[keyword].value)
    return change


JAPANESE = dict(PatientName="Yamada^Tarou=山田^太郎=やまだ^たろう", InstitutionName="博多中央病院",
                StudyDescription="胸部単純X線 正面", ReferringPhysicianName="Suzuki^Ichiro=鈴木^一郎=すずき^いちろう")

CHARSETS: list[Case] = [
    Case("utf-8", "character set", _charset("ISO_IR 192", PatientName="Wang^XiaoDong=王^小東",
                                            InstitutionName="Universitätsklinikum Köln", StudyDescription="胸部 Thorax")),
    Case("latin-1", "character set", _charset("ISO_IR 100", PatientName="Buc^Jérôme", InstitutionName="Hôpital Saint-Éloi",
                                              StudyDescription="Thorax de face", ReferringPhysicianName="Müller^Jürgen")),
    Case("latin-2", "character set", _charset("ISO_IR 101", PatientName="Dvořák^Antonín",
                                              InstitutionName="Fakultní nemocnice Plzeň")),
    Case("latin-3", "character set", _charset("ISO_IR 109", PatientName="Borġ^Ġużeppi")),
    Case("latin-4", "character set", _charset("ISO_IR 110", PatientName="Bērziņš^Jānis")),
    Case("cyrillic", "character set", _charset("ISO_IR 144", PatientName="Иванов^Иван", InstitutionName="Городская больница")),
    Case("arabic", "character set", _charset("ISO_IR 127", PatientName="قباني^لنزار")),
    Case("greek", "character set", _charset("ISO_IR 126", PatientName="Διονυσιος", InstitutionName="Νοσοκομείο")),
    Case("hebrew", "character set", _charset("ISO_IR 138", PatientName="שרון^דבורה")),
    Case("latin-5", "character set", _charset("ISO_IR 148", PatientName="Öztürk^Ayşe", InstitutionName="Şehir Hastanesi")),
    Case("thai", "character set", _charset("ISO_IR 166", PatientName="สมชาย^ใจดี")),
    Case("jis-x0201", "character set", _charset("ISO_IR 13", PatientName="ﾔﾏﾀﾞ^ﾀﾛｳ")),
    Case("japanese \\ISO 2022 IR 87", "character set", _charset(["", "ISO 2022 IR 87"], **JAPANESE)),
    Case("japanese ISO 2022 IR 6\\ISO 2022 IR 87", "character set", _charset(["ISO 2022 IR 6", "ISO 2022 IR 87"], **JAPANESE)),
    Case("japanese ISO 2022 IR 13\\ISO 2022 IR 87", "character set",
         _charset(["ISO 2022 IR 13", "ISO 2022 IR 87"], **{**JAPANESE, "PatientName": "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"})),
    Case("japanese with IR 159 (JIS X 0212)", "character set",
         _charset(["", "ISO 2022 IR 87", "ISO 2022 IR 159"], PatientName="Mori^Ougai=森^鷗外=もり^おうがい")),
    Case("korean \\ISO 2022 IR 149", "character set",
         _charset(["", "ISO 2022 IR 149"], PatientName="Hong^Gildong=洪^吉洞=홍^길동", InstitutionName="서울병원")),
    Case("gb18030", "character set", _charset("GB18030", PatientName="Wang^XiaoDong=王^小东", InstitutionName="北京协和医院")),
    Case("latin-1 bytes, no character set declared", "character set", _raw(0x00100010, "PN", b"Buc^J\xe9r\xf4me")),
    Case("unknown character set term", "character set", _charset("ISO-8859-1", PatientName="Plain^Name")),
]
CHARSETS += [Case(f"pydicom {f.name}", "character set (real file)", _from_pydicom_file(f.name))
             for f in sorted(PYDICOM_CHARSET_FILES.glob("*.dcm"))
             if pydicom.dcmread(f, stop_before_pixels=True).get("PatientName")]

DIRTY: list[Case] = [
    Case("age without unit", "age string", _set(PatientAge="45")),
    Case("age in lower case", "age string", _set(PatientAge="045y")),
    Case("impossible birth date", "date", _set(PatientBirthDate="19551345"), {"PatientBirthDate": ""}),
    Case("zero study date", "date", _set(StudyDate="00000000"), {"StudyDate": ""}),
    Case("ACR-NEMA study date", "date", _set(StudyDate="2025.03.01"), {"StudyDate": "20250301"}),
    Case("ISO birth date with dashes", "date", _set(PatientBirthDate="1955-03-01"), {"PatientBirthDate": "19550301"}),
    Case("ACR-NEMA time", "time", _set(StudyTime="10:15:00"), {"StudyTime": "101500"}),
    Case("time with colons, no seconds", "time", _set(StudyTime="10:15"), {"StudyTime": "1015"}),
    Case("impossible time", "time", _set(StudyTime="256100"), {"StudyTime": ""}),
    Case("time with an offset", "time", _set(StudyTime="101500+0900"), {"StudyTime": ""}),
    Case("acquisition date-time with words", "time", _set(AcquisitionDateTime="yesterday")),
    Case("LO over 64", "length", _set(StudyDescription="Chest PA " * 9), {"StudyDescription": None}),
    Case("institution over 64", "length", _set(InstitutionName="Regional " * 10), {"InstitutionName": None}),
    Case("SH over 16", "length", _set(StudyID="STUDY-2025-03-01-0001"), {"StudyID": ""}),
    Case("PN over 64", "length", _set(PatientName="Verylongfamilyname" * 4 + "^Given"), {"PatientName": ""}),
    Case("referring PN over 64", "length", _set(ReferringPhysicianName="Dr" * 40), {"ReferringPhysicianName": ""}),
    Case("DS over 16", "length", _set(ImagerPixelSpacing=["0.14300000000000001", "0.14300000000000001"])),
    Case("manufacturer over 64", "length", _set(Manufacturer="Manufacturer " * 6)),
    Case("empty Study Instance UID", "empty type 1", _raw(0x0020000D, "UI", b""), fails="StudyInstanceUID"),
    Case("empty Series Instance UID", "empty type 1", _raw(0x0020000E, "UI", b""), fails="SeriesInstanceUID"),
    Case("Study Description with two values", "multi-value", _set(StudyDescription=["Chest", "PA"]),
         {"StudyDescription": None}),
    Case("two referring physicians", "multi-value", _set(ReferringPhysicianName=["Doctor^A", "Doctor^B"]),
         {"ReferringPhysicianName": ""}),
    Case("Patient Orientation with three values", "multi-value", _set(PatientOrientation=["L", "F", "A"])),
    Case("Patient's Sex spelled out", "code string", _set(PatientSex="Male"), {"PatientSex": ""}),
    Case("Patient's Sex in lower case", "code string", _set(PatientSex="m"), {"PatientSex": "M"}),
    Case("Body Part in lower case", "code string", _set(BodyPartExamined="chest")),
    Case("control character in station name", "control character", _set(StationName="XR\x011")),
    Case("Study UID with trailing space", "uid padding", _raw(0x0020000D, "UI", b"1.2.826.0.1.3680043.10.511.1.77 "),
         {"StudyInstanceUID": "1.2.826.0.1.3680043.10.511.1.77"}),
    Case("Series UID with NUL padding", "uid padding", _raw(0x0020000E, "UI", b"1.2.826.0.1.3680043.10.511.2.77\x00\x00")),
    Case("SOP Instance UID with a leading space", "uid padding",
         _raw(0x00080018, "UI", b" 1.2.826.0.1.3680043.10.511.3.77")),
    Case("Patient ID over 64", "kept for matching", _set(PatientID="ID" * 40), {"PatientID": KEEP}),
    Case("Accession Number over 16", "kept for matching", _set(AccessionNumber="ACC-2025-03-01-000123"),
         {"AccessionNumber": KEEP}),
    Case("Patient ID with a backslash", "kept for matching", _set(PatientID=["12", "34"]), {"PatientID": KEEP}),
]

CORPUS: list[Case] = CHARSETS + DIRTY
