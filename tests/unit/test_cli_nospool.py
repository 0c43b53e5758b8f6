"""`status`, `audit`, `resend`, `validate` and `recalibrate` where there is no spool: they say which spool they looked for and
how to name the right one, exit non-zero, and create nothing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", [["status"], ["audit"], ["resend"], ["resend", "--failed"],
                                     ["validate", "--since", "2026-01-01", "--out", "v"],
                                     ["recalibrate", "--since", "2026-01-01", "--out", "r"]])
def test_no_spool_here_says_where_it_looked_and_creates_nothing(tmp_path, command):
    out = _run(tmp_path, *command)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    assert f"no spool at {tmp_path / 'var'}" in out.stderr
    assert "--config" in out.stderr and "MEDSAM2_CXR_PATHS__SPOOL" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_spool_at_the_configured_path(tmp_path):
    spool = tmp_path / "elsewhere" / "var"
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[paths]\nspool = "{spool}"\n')
    out = _run(tmp_path, "status", "--config", str(cfg))
    assert out.returncode == 2
    assert f"no spool at {spool}" in out.stderr and str(cfg) in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node.toml"]
    out = _run(tmp_path, "audit", env={"MEDSAM2_CXR_PATHS__SPOOL": str(spool)})
    assert out.returncode == 2 and f"no spool at {spool}" in out.stderr


def test_card_file_name_matches_the_bundle_module():
    from models.bundle import CARD
    from worker.model_build import CARD_FILE

    assert CARD_FILE == CARD
