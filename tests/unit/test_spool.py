import errno
import json
import os

import pytest

from dicom_node.spool import OutOfSpace, Spool


def _files(d):
    return sorted(p.name for p in d.rglob("*") if p.is_file())


def test_layout(tmp_path):
    s = Spool(tmp_path / "spool")
    for name in ("incoming", "results", "dead-letter", "quarantine", "tmp"):
        assert (tmp_path / "spool" / name).is_dir()
    assert s.incoming_path("abc123") == s.root / "incoming" / "abc123.dcm"
    assert s.result_dir("abc123").is_dir()


def test_write_atomic(tmp_path):
    s = Spool(tmp_path)
    dest = s.write_atomic(s.incoming_path("job1"), b"DICM" * 100)
    assert dest.read_bytes() == b"DICM" * 100
    assert _files(s.tmp) == []
    assert s.relative(dest) == "incoming/job1.dcm"


def test_overwrite_is_atomic_replace(tmp_path):
    s = Spool(tmp_path)
    s.write_atomic(s.incoming_path("job1"), b"old")
    s.write_atomic(s.incoming_path("job1"), b"new")
    assert s.incoming_path("job1").read_bytes() == b"new"


def test_watermark_refuses_and_leaves_nothing(tmp_path):
    s = Spool(tmp_path, min_free_bytes=10**18)
    with pytest.raises(OutOfSpace) as err:
        s.write_atomic(s.incoming_path("job1"), b"x" * 1000)
    assert err.value.errno == errno.ENOSPC
    assert isinstance(err.value, OSError)
    assert _files(tmp_path) == []


def test_enospc_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    s = Spool(tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OutOfSpace):
        s.write_atomic(s.incoming_path("job1"), b"x" * 1000)
    monkeypatch.undo()
    assert _files(tmp_path) == []


def test_other_error_leaves_no_partial_file(tmp_path, monkeypatch):
    s = Spool(tmp_path)

    def broken(src, dst):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "rename", broken)
    with pytest.raises(OSError) as err:
        s.write_atomic(s.incoming_path("job1"), b"x")
    monkeypatch.undo()
    assert not isinstance(err.value, OutOfSpace)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("bad", ["../evil", "a/b", "", "1.2.840.10008/../x", "x" * 65])
def test_ids_from_outside_are_refused(tmp_path, bad):
    s = Spool(tmp_path)
    with pytest.raises(ValueError):
        s.incoming_path(bad)


def test_write_outside_spool_refused(tmp_path):
    s = Spool(tmp_path / "spool")
    with pytest.raises(ValueError):
        s.write_atomic(tmp_path / "elsewhere.dcm", b"x")


def test_quarantine(tmp_path):
    s = Spool(tmp_path)
    p = s.quarantine(b"garbage", "unparseable header", "q1")
    assert p.read_bytes() == b"garbage"
    assert json.loads((s.quarantine_dir / "q1.json").read_text())["reason"] == "unparseable header"


def test_quarantine_file_moves(tmp_path):
    s = Spool(tmp_path)
    src = s.write_atomic(s.incoming_path("j"), b"garbage")
    p = s.quarantine_file(src, "bad", "j")
    assert not src.exists() and p.read_bytes() == b"garbage"
    assert json.loads((s.quarantine_dir / "j.json").read_text())["reason"] == "bad"


def test_dead_letter_round_trip(tmp_path):
    s = Spool(tmp_path)
    rd = s.result_dir("job7")
    files = [s.write_atomic(rd / "sr.dcm", b"SR"), s.write_atomic(rd / "sc.dcm", b"SC")]
    d = s.dead_letter("job7", files, "destination refused 5 times")
    assert d == s.dead / "job7"
    assert not any(f.exists() for f in files)
    assert sorted(p.name for p in d.iterdir()) == ["reason.json", "sc.dcm", "sr.dcm"]
    reason = json.loads((d / "reason.json").read_text())
    assert reason["reason"] == "destination refused 5 times" and reason["job_id"] == "job7"
    assert s.dead_letters() == ["job7"]

    back = s.take_back_dead_letter("job7")
    assert sorted(p.name for p in back) == ["sc.dcm", "sr.dcm"]
    assert all(p.parent == rd for p in back)
    assert (rd / "sr.dcm").read_bytes() == b"SR" and (rd / "sc.dcm").read_bytes() == b"SC"
    assert s.dead_letters() == []
    assert not (s.dead / "job7").exists()


def test_take_back_unknown(tmp_path):
    with pytest.raises(FileNotFoundError):
        Spool(tmp_path).take_back_dead_letter("nope")


def test_adopt_links_a_file_on_the_same_filesystem(tmp_path):
    """The listener's received file becomes the spool's without a copy; the source stays."""
    s = Spool(tmp_path / "spool")
    src = tmp_path / "received.tmp"
    src.write_bytes(b"DICM" * 1000)
    dest = s.adopt(src, s.incoming_path("job1"))
    assert dest.read_bytes() == b"DICM" * 1000
    assert os.stat(dest).st_ino == os.stat(src).st_ino  # a hard link, not a copy
    assert src.exists() and _files(s.tmp) == []


def test_adopt_copies_across_filesystems(tmp_path, monkeypatch):
    s = Spool(tmp_path / "spool")
    src = tmp_path / "received.tmp"
    src.write_bytes(b"x" * 5000)

    def cross_device(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    dest = s.adopt(src, s.incoming_path("job1"))
    assert dest.read_bytes() == b"x" * 5000
    assert os.stat(dest).st_ino != os.stat(src).st_ino
    assert _files(s.tmp) == []


def test_adopt_under_the_watermark_refuses_and_leaves_nothing(tmp_path):
    s = Spool(tmp_path / "spool", min_free_bytes=10**18)
    src = tmp_path / "received.tmp"
    src.write_bytes(b"x" * 1000)
    with pytest.raises(OutOfSpace):
        s.adopt(src, s.incoming_path("job1"))
    assert _files(s.root) == [] and src.exists()
