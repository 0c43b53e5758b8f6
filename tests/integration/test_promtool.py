"""deploy/prometheus checked by Prometheus's own promtool: the scrape configuration and the alert
rules parse, and the rules' unit tests (medsam2-cxr.rules.test.yml) pass."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import require_peer

PROM = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def test_promtool_checks_the_configuration_and_rules():
    tool = require_peer("promtool")
    for args in (["check", "rules", "medsam2-cxr.rules.yml"], ["check", "config", "prometheus.yml"]):
        out = subprocess.run([tool, *args], cwd=PROM, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_of_the_alerts():
    out = subprocess.run([require_peer("promtool"), "test", "rules", "medsam2-cxr.rules.test.yml"], cwd=PROM, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout
