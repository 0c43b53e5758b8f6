"""The SR and SC encoders' files checked by DICOM's own tools: dciodvfy (dicom3tools) finds no
error, DCMTK's dsrdump reads the SR's labels, algorithm and synthetic notice."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dicom_node import codes
from models.labels import LABELS
from tests.conftest import require_peer
from tests.unit.test_encoders import SOURCES, encode_both


@pytest.fixture(scope="module", params=sorted(SOURCES))
def encoded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return encode_both(request.param, tmp_path_factory.mktemp(request.param))


def _dciodvfy(path: Path) -> list[str]:
    proc = subprocess.run([require_peer("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    return (proc.stdout + proc.stderr).splitlines()


@pytest.mark.parametrize("kind", ["sr_path", "sc_path"])
def test_dciodvfy_reports_no_errors(encoded: dict, kind: str) -> None:
    lines = _dciodvfy(encoded[kind])
    for line in lines:
        if "Warning" in line:
            print(f"{kind}: {line}")  # shown with -s; warnings are information only
    errors = [line for line in lines if "Error" in line]
    assert not errors, "\n".join(errors)


def test_dsrdump_shows_labels_algorithm_and_synthetic_notice(encoded: dict) -> None:
    proc = subprocess.run(
        [require_peer("dsrdump"), "+Pi", "+Pn", str(encoded["sr_path"])], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    dump = proc.stdout
    for label in LABELS:
        assert f'"{label}"' in dump, label  # tracking identifier
    assert codes.ALGORITHM_NAME in dump
    assert "Trained on synthetic" in dump
