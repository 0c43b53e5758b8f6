"""The durable spool: every byte the node accepts or owes lands here before anyone is told "done".

Layout under the spool root (one filesystem, so ``os.rename`` is atomic)::

    incoming/<job_id>.dcm        instances received by the listener
    results/<job_id>/...         result objects owed to the destination
    dead-letter/<job_id>/...     results given up on after the last send attempt, + reason.json
    quarantine/<id>.dcm|.pdu, .json  bytes that could not be understood (an instance or a
                                 refused PDU), + why, where and at which stage
    tmp/                         partial writes; renamed into place only when complete

File names are built only from ids the node generated itself (``uuid4().hex`` by default), never
from a UID or any other received string; :func:`_check_id` enforces that.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from dicom_node.layout import SpoolLayout

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
REASON_FILE = "reason.json"


class OutOfSpace(OSError):
    """The spool filesystem is full, or a write would take it under the free-space watermark."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


def _check_id(value: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise ValueError(f"not a node-generated id: {value!r}")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Atomic, durable file store for the node.

    Parameters
    ----------
    root : Path
        Spool directory; created with its subfolders if missing.
    min_free_bytes : int
        Free-space watermark: a write that would leave less than this free on the spool
        filesystem is refused with :class:`OutOfSpace` (the listener answers 0xA700).
    """

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self.min_free_bytes = int(min_free_bytes)
        layout = SpoolLayout(self.root)
        self.incoming = layout.incoming
        self.results = layout.results
        self.dead = layout.dead_letter
        self.quarantine_dir = layout.quarantine
        self.tmp = layout.tmp
        for d in (self.incoming, self.results, self.dead, self.quarantine_dir, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    # -- space -----------------------------------------------------------------------------
    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_space(self, nbytes: int) -> None:
        """Raise :class:`OutOfSpace` when writing ``nbytes`` would cross the watermark."""
        free = self.free_bytes()
        if free - nbytes < self.min_free_bytes:
            raise OutOfSpace(
                f"spool {self.root}: {free} bytes free, write of {nbytes} would go under "
                f"the {self.min_free_bytes}-byte watermark"
            )

    # -- writing ---------------------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        path = Path(path)
        path = (path if path.is_absolute() else self.root / path).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"{path} is outside the spool {self.root}")
        return path

    def write_atomic(self, dest: Path, data: bytes) -> Path:
        """Write ``data`` to ``dest`` all-or-nothing and durably.

        The bytes go to ``tmp/<random>``, are flushed and fsync'd, renamed into place, and the
        destination directory is fsync'd. On any failure the temp file is removed, so no partial
        file is ever visible.

        Raises
        ------
        OutOfSpace
            Under the watermark, or the filesystem reported ENOSPC/EDQUOT.
        OSError
            Any other I/O failure (nothing is left behind).
        """
        def write(tmp: Path) -> None:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            finally:
                os.close(fd)

        return self._commit(dest, len(data), write)

    def adopt(self, src: Path, dest: Path) -> Path:
        """Put a finished file from outside the spool at ``dest``, durably, never in memory.

        The listener receives each instance straight into a temporary file; this makes it the
        spool's. A hard link when ``src`` is on the spool's filesystem (no copy at all), else a
        kernel-side copy. ``src`` stays where it is for its owner to remove. Same guarantees and
        errors as :meth:`write_atomic`.
        """
        def place(tmp: Path) -> None:
            try:
                os.link(src, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copyfile(src, tmp)

        return self._commit(dest, os.stat(src).st_size, place)

    def _commit(self, dest: Path, nbytes: int, fill: Callable[[Path], None]) -> Path:
        """``fill`` a fresh temp file, fsync it, rename it to ``dest``, fsync the directory."""
        dest = self._inside(dest)
        self.check_space(nbytes)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / uuid.uuid4().hex
        try:
            fill(tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, dest)
            _fsync_dir(dest.parent)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, OutOfSpace) and exc.errno in _DISK_FULL:
                raise OutOfSpace(f"spool {self.root} is full: {exc}") from exc
            raise
        return dest

    def _write_json(self, dest: Path, payload: dict) -> Path:
        return self.write_atomic(dest, (json.dumps(payload, sort_keys=True, indent=1) + "\n").encode())

    def _move(self, src: Path, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dest)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            shutil.move(str(src), dest)  # a file from outside the spool filesystem
        return dest

    # -- paths -----------------------------------------------------------------------------
    def incoming_path(self, job_id: str) -> Path:
        return self.incoming / f"{_check_id(job_id)}.dcm"

    def result_dir(self, job_id: str) -> Path:
        d = self.results / _check_id(job_id)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def relative(self, path: Path) -> str:
        """Path relative to the spool root, as stored in the job table."""
        return str(self._inside(path).relative_to(self.root))

    # -- quarantine ------------------------------------------------------------------------
    _SUFFIX = re.compile(r"^[a-z]{1,8}$")

    def quarantine(self, data: bytes, reason: str, id: str, suffix: str = "dcm", **context: object) -> Path:
        """Keep bytes we could not understand as ``quarantine/<id>.<suffix>`` plus ``<id>.json``.

        ``suffix`` says what the bytes are (``dcm`` a dataset, ``pdu`` a refused network PDU);
        ``context`` (peer, calling AE, stage) goes into the JSON beside the reason. It must carry
        no patient data: callers pass addresses, AE titles and ids only.
        """
        if not self._SUFFIX.match(suffix):
            raise ValueError(f"quarantine suffix {suffix!r}: lower-case letters only")
        dest = self.quarantine_dir / f"{_check_id(id)}.{suffix}"
        self.write_atomic(dest, data)
        self._write_json(self.quarantine_dir / f"{id}.json",
                         {"id": id, "reason": reason, "file": dest.name, **context})
        return dest

    def quarantine_file(self, src: Path, reason: str, id: str, **context: object) -> Path:
        """Like :meth:`quarantine` for bytes already in the spool: a rename, no second copy."""
        dest = self.quarantine_dir / f"{_check_id(id)}.dcm"
        self._move(self._inside(src), dest)
        _fsync_dir(self.quarantine_dir)
        self._write_json(self.quarantine_dir / f"{id}.json",
                         {"id": id, "reason": reason, "file": dest.name, **context})
        return dest

    def take_back_quarantined(self, id: str, dest: Path) -> Path:
        """Move ``quarantine/<id>.dcm`` back to ``dest`` (a resend after a fix) and drop its record."""
        src = self.quarantine_dir / f"{_check_id(id)}.dcm"
        if not src.is_file():
            raise FileNotFoundError(f"nothing quarantined as {id}")
        dest = self._move(src, self._inside(dest))
        _fsync_dir(dest.parent)
        (self.quarantine_dir / f"{id}.json").unlink(missing_ok=True)
        _fsync_dir(self.quarantine_dir)
        return dest

    def quarantined(self) -> list[dict]:
        """The quarantine's records (reason, file, context), oldest first."""
        records = []
        for f in sorted(self.quarantine_dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                records.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                continue
        return records

    # -- recovery after a crash --------------------------------------------------------------
    def sweep_tmp(self, older_than_s: float | None = None, now: Callable[[], float] = time.time) -> int:
        """Remove partial writes left in ``tmp/`` by a killed process; returns how many.

        With ``older_than_s`` None every file goes: only safe while no writer runs on this spool
        (the listener does it before it serves). With a number, only files not modified for that
        long go, which is safe while workers write: :meth:`write_atomic` renames its file away
        within moments, so an old one belongs to a writer that was killed (a SIGKILLed worker
        leaves one behind). A writer stalled for longer than that loses its file and its write
        fails with an ``OSError``, which every caller already retries; nothing half-written is
        ever renamed into place.
        """
        n = 0
        cutoff = None if older_than_s is None else now() - older_than_s
        for f in self.tmp.iterdir():
            try:
                if not f.is_file() or (cutoff is not None and f.stat().st_mtime >= cutoff):
                    continue
            except FileNotFoundError:  # renamed into place meanwhile
                continue
            f.unlink(missing_ok=True)
            n += 1
        return n

    def sweep_incoming(self, known: Callable[[str], bool]) -> int:
        """Remove ``incoming/<id>.dcm`` files no job records (``known(id)`` false); returns how many.

        Such a file was written by a listener killed before it recorded the job, so the sender
        never got a success status and will send the instance again: keeping it would only
        leave bytes nobody owns.
        """
        n = 0
        for f in self.incoming.glob("*.dcm"):
            if _ID.match(f.stem) and not known(f.stem):
                f.unlink(missing_ok=True)
                n += 1
        if n:
            _fsync_dir(self.incoming)
        return n

    # -- dead letters ----------------------------------------------------------------------
    def dead_letter(self, job_id: str, files: list[Path], reason: str) -> Path:
        """Move a job's result files into ``dead-letter/<job_id>/`` with ``reason.json``."""
        d = self.dead / _check_id(job_id)
        d.mkdir(parents=True, exist_ok=True)
        names = []
        for f in files:
            f = self._inside(f)
            if f.name == REASON_FILE:
                raise ValueError(f"a result file may not be called {REASON_FILE}")
            self._move(f, d / f.name)
            names.append(f.name)
        _fsync_dir(d)
        self._write_json(d / REASON_FILE, {"job_id": job_id, "reason": reason, "files": names})
        return d

    def dead_letters(self) -> list[str]:
        return sorted(p.name for p in self.dead.iterdir() if p.is_dir())

    def take_back_dead_letter(self, job_id: str) -> list[Path]:
        """Move a dead-lettered job's files back into ``results/<job_id>/`` for a resend."""
        d = self.dead / _check_id(job_id)
        if not d.is_dir():
            raise FileNotFoundError(f"no dead letter for job {job_id}")
        out = self.result_dir(job_id)
        moved = [
            self._move(f, out / f.name)
            for f in sorted(d.iterdir())
            if f.is_file() and f.name != REASON_FILE
        ]
        _fsync_dir(out)
        (d / REASON_FILE).unlink(missing_ok=True)
        d.rmdir()
        _fsync_dir(self.dead)
        return moved
