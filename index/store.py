"""The case store: de-identified prior cases (report text, labels, box) in one SQLite file.

What a case is, is fixed by `new_case`: report text, labels, a box and a source name. There is no
parameter for a patient name, ID, birth date, accession number or UID, so none can be stored by
mistake, and the report text is scrubbed of the identifiers the caller knows about (the source
DICOM header's) and of anything shaped like a UID or a date before it is accepted.

Row position `pos` (0, 1, 2, ...) is also the case's id in the FAISS index over box centers
(index/vectors.py); the store is the source of truth and the vector index can always be rebuilt
from it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.labels import LABELS

SCHEMA_VERSION = 1
REDACTED = "XXXX"  # the Open-i de-identification token, so labelers treat both alike
_SOURCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,63}$")
# UIDs (1.2.840...), ISO / US / DICOM dates: never part of a finding, always of an identity.
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")
_DATES = re.compile(r"\b(?:\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}/\d{2,4}|(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))\b")
_SECTION = re.compile(r"^\s*(FINDINGS|IMPRESSION|CONCLUSION|COMPARISON|INDICATION|HISTORY|TECHNIQUE)\s*:\s*",
                      re.IGNORECASE | re.MULTILINE)


class StoreError(ValueError):
    """A case store that is missing, from another schema, or a case that cannot be stored."""


@dataclass(frozen=True)
class Case:
    """One prior case as stored: nothing in it identifies the patient."""

    case_id: str
    findings: str
    impression: str
    labels: Mapping[str, int | None]  # LABELS -> 1 positive, 0 negative, -1 uncertain, None not mentioned
    center: np.ndarray
    radius: np.ndarray
    source: str

    @property
    def report(self) -> str:
        parts = []
        if self.findings:
            parts.append(f"FINDINGS: {self.findings}")
        if self.impression:
            parts.append(f"IMPRESSION: {self.impression}")
        return "\n".join(parts)

    def positive(self, uncertain: bool = True) -> list[str]:
        """Labels other than No Finding that are 1 (and -1 when uncertain counts), in LABELS order."""
        ok = (1, -1) if uncertain else (1,)
        return [k for k in LABELS if k != "No Finding" and self.labels.get(k) in ok]


def scrub(text: str, identifiers: Iterable[str] = ()) -> str:
    """Replace known identifiers, UID-shaped and date-shaped tokens by XXXX.

    identifiers: strings the caller read from the source (patient name, ID, birth date, accession,
    UIDs); a DICOM person name is also matched with its components and with spaces for "^".
    """
    out = text
    needles: set[str] = set()
    for ident in identifiers:
        ident = str(ident or "").strip()
        if len(ident) < 3:  # "M", "F", "" would redact ordinary words
            continue
        needles.add(ident)
        if "^" in ident:
            needles.add(ident.replace("^", " ").strip())
            needles.update(p for p in ident.split("^") if len(p) >= 3)
    for needle in sorted(needles, key=len, reverse=True):
        out = re.sub(re.escape(needle), REDACTED, out, flags=re.IGNORECASE)
    out = _UID.sub(REDACTED, out)
    return _DATES.sub(REDACTED, out)


def split_sections(report: str) -> tuple[str, str]:
    """(FINDINGS, IMPRESSION) of a report; text before any header counts as findings.

    Other sections (COMPARISON, INDICATION, ...) are dropped: they carry history, not the image.
    """
    matches = list(_SECTION.finditer(report))
    if not matches:
        return " ".join(report.split()), ""
    sections: dict[str, str] = {}
    head = report[: matches[0].start()].strip()
    for m, nxt in zip(matches, matches[1:] + [None]):
        body = report[m.end(): nxt.start() if nxt else len(report)]
        name = m.group(1).upper()
        name = "IMPRESSION" if name == "CONCLUSION" else name
        sections[name] = (sections.get(name, "") + " " + " ".join(body.split())).strip()
    findings = " ".join(x for x in (head, sections.get("FINDINGS", "")) if x)
    return " ".join(findings.split()), sections.get("IMPRESSION", "")


def _label_value(v) -> int | None:
    if v is None:
        return None
    if isinstance(v, str):
        v = v.strip()
        if v in ("", "nan", "None", "null"):
            return None
        v = float(v)
    if isinstance(v, float) and np.isnan(v):
        return None
    iv = int(v)
    if iv not in (1, 0, -1):
        raise StoreError(f"label value {v!r} is not 1, 0, -1 or empty")
    return iv


def new_case(report: str, labels: Mapping[str, object], center: np.ndarray, radius: np.ndarray, source: str,
             identifiers: Iterable[str] = ()) -> Case:
    """Build a case from what a case may hold; the id is a digest of that content.

    Raises
    ------
    StoreError
        Labels that are not the 14 CheXpert names, a bad label value, a box of the wrong shape, an
        empty report, or a source name that is not a short plain name (it must not be a path or an id).
    """
    unknown = set(labels) - set(LABELS)
    if unknown:
        raise StoreError(f"labels {sorted(unknown)} are not CheXpert labels {list(LABELS)}")
    if not _SOURCE.match(source or ""):
        raise StoreError(f"source {source!r}: use a short site or dataset name (letters, digits, space, _ . -)")
    findings, impression = split_sections(scrub(report, identifiers))
    if not findings and not impression:
        raise StoreError("empty report: a case needs FINDINGS or IMPRESSION text")
    c = np.asarray(center, np.float32).reshape(-1)
    r = np.asarray(radius, np.float32).reshape(-1)
    if c.shape != r.shape or not np.all(np.isfinite(c)) or not np.all(np.isfinite(r)) or np.any(r < 0):
        raise StoreError(f"box: center {c.shape} and radius {r.shape} must be finite, the same shape, radius >= 0")
    lab = {k: _label_value(labels.get(k)) for k in LABELS}
    h = hashlib.sha256()
    for part in (source, findings, impression, json.dumps(lab, sort_keys=True)):
        h.update(part.encode())
        h.update(b"\x1f")
    h.update(c.tobytes())
    return Case(case_id="C" + h.hexdigest()[:15], findings=findings, impression=impression, labels=lab,
                center=c, radius=r, source=source)


class CaseStore:
    """SQLite file of cases plus the model bundle digest their boxes came from."""

    def __init__(self, path: Path, conn: sqlite3.Connection, digest: str, dim: int) -> None:
        self.path, self._conn, self.digest, self.dim = Path(path), conn, digest, dim
        self._centers: np.ndarray | None = None
        self._radii: np.ndarray | None = None

    @classmethod
    def create(cls, path: Path, digest: str, dim: int) -> CaseStore:
        path = Path(path)
        if path.exists():
            raise StoreError(f"{path}: a case store exists already; use `medsam2-cxr index add` to extend it")
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, check_same_thread=False)
        with conn:
            conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute("CREATE TABLE cases (pos INTEGER PRIMARY KEY, case_id TEXT UNIQUE NOT NULL, source TEXT NOT NULL,"
                         " findings TEXT NOT NULL, impression TEXT NOT NULL, labels TEXT NOT NULL,"
                         " center BLOB NOT NULL, radius BLOB NOT NULL)")
            conn.executemany("INSERT INTO meta VALUES (?, ?)", [("schema", str(SCHEMA_VERSION)),
                                                               ("bundle_digest", digest), ("dim", str(dim))])
        return cls(path, conn, digest, dim)

    @classmethod
    def open(cls, path: Path) -> CaseStore:
        path = Path(path)
        if not path.exists():
            raise StoreError(f"{path}: no case store; build one with `medsam2-cxr index build`")
        conn = sqlite3.connect(path, check_same_thread=False)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: not a case store ({exc})") from exc
        if meta.get("schema") != str(SCHEMA_VERSION):
            raise StoreError(f"{path}: case store schema {meta.get('schema')}, this code reads {SCHEMA_VERSION}; rebuild it")
        return cls(path, conn, meta["bundle_digest"], int(meta["dim"]))

    def close(self) -> None:
        self._conn.close()

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM cases").fetchone()[0]

    def add(self, cases: Sequence[Case]) -> list[int]:
        """Append cases not stored yet (same content = same id); returns the new rows' positions."""
        new: list[int] = []
        with self._conn:
            n = len(self)
            for case in cases:
                if case.center.shape != (self.dim,):
                    raise StoreError(f"{self.path}: box of dimension {case.center.shape[0]}, the store holds {self.dim}")
                cur = self._conn.execute(
                    "INSERT OR IGNORE INTO cases VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (n, case.case_id, case.source, case.findings, case.impression, json.dumps(dict(case.labels)),
                     case.center.astype("<f4").tobytes(), case.radius.astype("<f4").tobytes()))
                if cur.rowcount:
                    new.append(n)
                    n += 1
        if new:
            self._centers = self._radii = None
        return new

    def _load_boxes(self) -> None:
        rows = self._conn.execute("SELECT center, radius FROM cases ORDER BY pos").fetchall()
        self._centers = np.frombuffer(b"".join(r[0] for r in rows), "<f4").reshape(-1, self.dim).copy()
        self._radii = np.frombuffer(b"".join(r[1] for r in rows), "<f4").reshape(-1, self.dim).copy()

    @property
    def centers(self) -> np.ndarray:
        """(n, d) float32, row i = position i; read once and kept (51 MB at 100k cases, d = 128)."""
        if self._centers is None:
            self._load_boxes()
        return self._centers  # type: ignore[return-value]

    @property
    def radii(self) -> np.ndarray:
        if self._radii is None:
            self._load_boxes()
        return self._radii  # type: ignore[return-value]

    def get(self, positions: Sequence[int]) -> list[Case]:
        """Cases at these positions, in the order asked."""
        if not len(positions):
            return []
        pos = [int(p) for p in positions]
        marks = ",".join("?" * len(pos))
        rows = self._conn.execute(f"SELECT pos, case_id, source, findings, impression, labels FROM cases WHERE pos IN ({marks})",
                                  pos).fetchall()
        by_pos = {r[0]: r for r in rows}
        out = []
        for p in pos:
            r = by_pos[p]
            out.append(Case(case_id=r[1], source=r[2], findings=r[3], impression=r[4], labels=json.loads(r[5]),
                            center=self.centers[p], radius=self.radii[p]))
        return out

    def sources(self) -> dict[str, int]:
        return dict(self._conn.execute("SELECT source, COUNT(*) FROM cases GROUP BY source ORDER BY source"))

    def positions_of(self, source: str) -> np.ndarray:
        return np.array([r[0] for r in self._conn.execute("SELECT pos FROM cases WHERE source = ? ORDER BY pos", (source,))],
                        dtype=np.int64)
