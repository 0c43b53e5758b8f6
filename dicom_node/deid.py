"""De-identification for anything that leaves the site, and re-identification of what comes back.

:func:`deidentify` applies the PS3.15 Annex E Basic Application Level Confidentiality Profile
with dicognito (names, IDs, dates shifted consistently, UIDs remapped, free text removed) and
records what was done in the dataset (Patient Identity Removed, De-identification Method Code
Sequence). The same ``key`` gives the same pseudonyms, so a patient's studies stay linked in a
case index without their identity.

A remote reading hub sees only de-identified studies. :class:`ReidentificationMap` keeps, in an
SQLite table in the spool that never leaves the site, which pseudonymous UIDs and patient IDs
stand for which real ones; :func:`forward` de-identifies a study for the hub and records it, and
:func:`reidentify` puts the real patient and UIDs back into a result the hub returns (its own
SOP Instance UID is kept; references to the study, series and images are restored).

Usage (case index)::

    from dicom_node.deid import deidentify
    clean = deidentify(ds, key=site_secret)      # a copy; ds is untouched
"""

from __future__ import annotations

import copy
import json
import sqlite3
from contextlib import closing
from pathlib import Path

from dicognito.anonymizer import Anonymizer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

from dicom_node.identifiers import PATIENT_IDENTIFIERS

# DCM codes for PS3.15 E.1-1 profiles and options (CID 7050).
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
MODIFIED_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
# Patient and study identifiers restored at the sending site (PS3.15 E.1-1 "D"/"Z" attributes the
# hub's result will carry in pseudonymous form): the patient identifiers but Other Patient Names,
# which no result carries (encoders.header.COPIED), and the study attributes that date and place it.
PATIENT_KEYWORDS = (*(k for k in PATIENT_IDENTIFIERS if k != "OtherPatientNames"), "PatientSex", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName", "InstitutionName")


class DeidentificationError(ValueError):
    """The dataset cannot be de-identified safely as it is (e.g. identifiers burned into pixels)."""


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def deidentify(ds: Dataset, key: str, allow_burned_in_annotation: bool = False) -> Dataset:
    """A de-identified copy of ``ds`` (PS3.15 Basic profile, dates shifted consistently).

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance; not modified.
    key : str
        Site secret: the same key maps the same patient, study and UIDs to the same pseudonyms.
        Keep it out of logs and away from the data it protects.
    allow_burned_in_annotation : bool
        The Basic profile does not clean pixels; an image that says it has identifiers burned in
        (Burned In Annotation YES) is refused unless the caller knows better.

    Raises
    ------
    DeidentificationError
        Burned-in annotation without ``allow_burned_in_annotation``, or an empty key.
    """
    if not key:
        raise DeidentificationError("deidentify needs a non-empty site key (the pseudonyms derive from it)")
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" and not allow_burned_in_annotation:
        raise DeidentificationError(
            "(0028,0301) Burned In Annotation is YES: the Basic profile leaves pixels as they are; "
            "clean the pixels first or pass allow_burned_in_annotation=True")
    out = copy.deepcopy(ds)
    bare = getattr(out, "file_meta", None) is None
    if bare:  # dicognito also remaps the file meta's UIDs and needs one to be there
        out.file_meta = FileMetaDataset()
    Anonymizer(seed=key).anonymize(out)
    if bare:
        del out.file_meta
    out.PatientIdentityRemoved = "YES"
    out.LongitudinalTemporalInformationModified = "MODIFIED"
    out.DeidentificationMethod = "PS3.15 E.1 Basic Profile (dicognito), dates shifted"
    out.DeidentificationMethodCodeSequence = Sequence([_code(*BASIC_PROFILE), _code(*MODIFIED_DATES)])
    return out


def _uid_pairs(original: Dataset, pseudo: Dataset) -> list[tuple[str, str]]:
    """(pseudonym, original) for every UI value the de-identification changed, matched by tag
    and sequence position, nested sequences included."""
    pairs: list[tuple[str, str]] = []
    for elem in original:
        if elem.tag not in pseudo:
            continue
        other = pseudo[elem.tag]
        if elem.VR == "UI" and elem.value:
            a = elem.value if elem.VM > 1 else [elem.value]
            b = other.value if other.VM > 1 else [other.value]
            pairs += [(str(y), str(x)) for x, y in zip(a, b) if str(x) != str(y)]
        elif elem.VR == "SQ":
            for x, y in zip(elem.value, other.value):
                pairs += _uid_pairs(x, y)
    return pairs


# Text VRs whose de-identified value a result may echo (the encoders copy the source's equipment,
# acquisition date and description, encoders.header.COPIED): put back when the result holds exactly
# the pseudonymous value, so a reader sees the site's own, never the hub's.
_ECHOED_VRS = {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UT"}


def _value_pairs(original: Dataset, pseudo: Dataset) -> list[tuple[str, str, str]]:
    """(keyword, pseudonym, original) for every top-level single-valued text attribute the
    de-identification changed (UIDs are _uid_pairs'; removed attributes cannot come back)."""
    out = []
    for elem in original:
        if elem.VR not in _ECHOED_VRS or elem.VM != 1 or not elem.keyword or elem.keyword not in pseudo:
            continue
        mine, theirs = str(elem.value), str(pseudo[elem.tag].value)
        if mine != theirs and theirs:
            out.append((elem.keyword, theirs, mine))
    return out


class ReidentificationMap:
    """Pseudonym -> original, kept in ``<spool>/reid.sqlite`` at the sending site only."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(self.path)) as db, db:
            db.execute("CREATE TABLE IF NOT EXISTS uid_map (pseudo TEXT PRIMARY KEY, original TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS patient_map (pseudo_study TEXT PRIMARY KEY, identity TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS value_map (pseudo_study TEXT NOT NULL, keyword TEXT NOT NULL, "
                       "pseudo TEXT NOT NULL, original TEXT NOT NULL, PRIMARY KEY (pseudo_study, keyword, pseudo))")

    def record(self, original: Dataset, pseudo: Dataset) -> None:
        pairs = _uid_pairs(original, pseudo)
        identity = {kw: str(original.get(kw, "")) for kw in PATIENT_KEYWORDS if kw in original}
        with closing(sqlite3.connect(self.path)) as db, db:
            db.executemany("INSERT OR REPLACE INTO uid_map VALUES (?, ?)", pairs)
            db.execute("INSERT OR REPLACE INTO patient_map VALUES (?, ?)",
                       (str(pseudo.StudyInstanceUID), json.dumps(identity)))
            db.executemany("INSERT OR REPLACE INTO value_map VALUES (?, ?, ?, ?)",
                           [(str(pseudo.StudyInstanceUID), *p) for p in _value_pairs(original, pseudo)])

    def original_uid(self, pseudo: str) -> str | None:
        with closing(sqlite3.connect(self.path)) as db:
            row = db.execute("SELECT original FROM uid_map WHERE pseudo=?", (pseudo,)).fetchone()
        return row[0] if row else None

    def original_value(self, pseudo_study_uid: str, keyword: str, pseudo: str) -> str | None:
        with closing(sqlite3.connect(self.path)) as db:
            row = db.execute("SELECT original FROM value_map WHERE pseudo_study=? AND keyword=? AND pseudo=?",
                             (pseudo_study_uid, keyword, pseudo)).fetchone()
        return row[0] if row else None

    def identity(self, pseudo_study_uid: str) -> dict[str, str] | None:
        with closing(sqlite3.connect(self.path)) as db:
            row = db.execute("SELECT identity FROM patient_map WHERE pseudo_study=?", (pseudo_study_uid,)).fetchone()
        return json.loads(row[0]) if row else None


def forward(ds: Dataset, key: str, reid: ReidentificationMap, allow_burned_in_annotation: bool = False) -> Dataset:
    """De-identify an instance for the remote reading hub and remember how to undo it here."""
    pseudo = deidentify(ds, key, allow_burned_in_annotation)
    reid.record(ds, pseudo)
    return pseudo


def reidentify(result: Dataset, reid: ReidentificationMap) -> Dataset:
    """A copy of a hub's result with the real patient, study and referenced UIDs put back, and
    each other attribute that holds exactly a pseudonymous value of the source (the acquisition
    date, the station name) its original.

    Raises
    ------
    KeyError
        The result's study was never forwarded from this site (nothing to map it back to).
    """
    identity = reid.identity(str(result.get("StudyInstanceUID", "")))
    if identity is None:
        raise KeyError(f"study {result.get('StudyInstanceUID')} was not forwarded from this site; "
                       "it cannot be re-identified here")
    out = copy.deepcopy(result)
    study = str(result.get("StudyInstanceUID", ""))
    for elem in out.iterall():  # the source's equipment, dates and descriptions the result echoes, nested too
        if elem.VR in _ECHOED_VRS and elem.VM == 1 and elem.keyword:
            original = reid.original_value(study, elem.keyword, str(elem.value))
            if original is not None:
                elem.value = original
    own = str(out.get("SOPInstanceUID", ""))
    for elem in out.iterall():
        if elem.VR != "UI" or not elem.value:
            continue
        if elem.VM > 1:
            elem.value = [reid.original_uid(str(v)) or v for v in elem.value]
        elif str(elem.value) != own:
            elem.value = reid.original_uid(str(elem.value)) or elem.value
    for kw, value in identity.items():
        setattr(out, kw, value)
    for kw in ("PatientIdentityRemoved", "LongitudinalTemporalInformationModified", "DeidentificationMethod",
               "DeidentificationMethodCodeSequence"):
        if kw in out:
            delattr(out, kw)
    return out
