"""`medsam2-cxr infer`: the pipeline offline, on a real CR chest and a phantom, no network."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[2]


def test_infer_writes_sr_sc_and_summary(tmp_path, tiny_bundle, phantom_dir):
    lateral = pydicom.dcmread(sorted((phantom_dir / "images").glob("*.dcm"))[0])
    lateral.ViewPosition = "LL"
    lateral.save_as(tmp_path / "lateral.dcm")
    (tmp_path / "garbage.dcm").write_bytes(b"not dicom at all")
    files = [get_testdata_file("RG1_UNCI.dcm"), str(tmp_path / "garbage.dcm"), str(tmp_path / "lateral.dcm")]
    env_cfg = tmp_path / "c.toml"
    env_cfg.write_text(f'[paths]\nspool = "{tmp_path / "var"}"\n[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n')
    out = subprocess.run([sys.executable, "-m", "worker.cli", "infer", *files, "--out", str(tmp_path / "out"),
                          "--config", str(env_cfg)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 1, out.stderr  # one file could not be read: say so in the exit code
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [Path(line["file"]).name for line in lines] == ["RG1_UNCI.dcm", "garbage.dcm", "lateral.dcm"]
    assert "summary" in lines[0] and "lateral" in lines[2]["skipped"]  # a failure does not stop the rest
    assert lines[1]["error"].startswith("InvalidDicomError: ") and lines[1]["stage"] == "read"
    assert "2 of 3 files ok, 1 failed" in out.stderr
    summary = json.loads((tmp_path / "out" / lines[0]["summary"]).read_text())
    assert len(summary["findings"]) == 14 and summary["model"]["digest"]
    sr = pydicom.dcmread(tmp_path / "out" / summary["sr"])
    source = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"), stop_before_pixels=True)
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert "PHANTOM" not in out.stderr and str(source.PatientName) not in out.stderr


def test_default_index_makes_infer_draft_a_report(tmp_path, tiny_bundle, phantom_dir):
    from worker.model_build import ensure_default_index
    from worker.settings import load_settings

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[paths]\nspool = "{tmp_path / "var"}"\n[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n')
    settings = load_settings(cfg)
    assert settings.index_path is None
    ensure_default_index(settings, tiny_bundle, n=12)
    assert settings.index_path == tmp_path / "var" / "index"
    src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    out = subprocess.run([sys.executable, "-m", "worker.cli", "infer", str(src), "--out", str(tmp_path / "out"),
                          "--config", str(cfg)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "out" / json.loads(out.stdout.splitlines()[0])["summary"]).read_text())
    text = pydicom.dcmread(tmp_path / "out" / summary["text"])
    assert text.SOPClassUID.name == "Basic Text SR Storage"


def test_infer_goes_on_past_a_file_the_encoder_cannot_take(tmp_path, tiny_bundle, phantom_dir, monkeypatch):
    """Every file is processed; the one whose results cannot be encoded says so with the error's
    type and message (no patient identifiers), and the exit code is 1."""
    from typer.testing import CliRunner

    from worker import pipeline
    from worker.cli import app

    srcs = sorted((phantom_dir / "images").glob("*.dcm"))[:3]
    poison = pydicom.dcmread(srcs[1], stop_before_pixels=True)
    real = pipeline.encode_results

    def encode(source, *args, **kw):
        if source.SOPInstanceUID == poison.SOPInstanceUID:
            raise ValueError(f"Value '{source.PatientName}' is not valid for this VR")
        return real(source, *args, **kw)

    monkeypatch.setattr(pipeline, "encode_results", encode)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[paths]\nspool = "{tmp_path / "var"}"\n[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n')
    out = CliRunner().invoke(app, ["infer", *map(str, srcs), "--out", str(tmp_path / "out"), "--config", str(cfg)])
    assert out.exit_code == 1, out.output
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [Path(line["file"]).name for line in lines] == [s.name for s in srcs]
    assert "summary" in lines[0] and "summary" in lines[2] and "summary" not in lines[1]
    assert lines[1]["stage"] == "encode" and lines[1]["error"] == "ValueError: Value '***' is not valid for this VR"
    assert str(poison.PatientName) not in out.output
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [n for n in written if n.startswith("0001-")] == []  # nothing half-written for the failed file
    assert {n.split("-")[0] for n in written} == {"0000", "0002"}
