"""bench/urgent.py at a small n: it runs, its counts add up, and its flags are the rules' flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import urgent
from phantoms import sample_cases

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.bench


def test_reference_standard_follows_the_phantoms_findings() -> None:
    cases = sample_cases(300, 4)
    for case in cases:
        truth, why = urgent.reference(case)
        assert truth == bool(case.labels["Pneumothorax"] or (case.labels["Pleural Effusion"]
                                                             and case.findings["Pleural Effusion"]["size"] == "large"))
        assert why.startswith("pneumothorax") or why.endswith("effusion") or why == "neither"
    assert {urgent.reference(c)[1] for c in cases} >= {"neither", "small effusion"}


def test_bench_urgent_small_n(tiny_bundle) -> None:
    out = subprocess.run([sys.executable, "-m", "bench.urgent", "--bundle", str(tiny_bundle), "--n", "12",
                          "--seed", "77", "--render-size", "256", "--device", "cpu"],
                         capture_output=True, text=True, check=False, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("{")]
    r = json.loads(line)
    assert r["benchmark"] == "urgent" and r["phantoms"]["n"] == 12
    assert r["urgent"]["n"] + r["not_urgent"]["n"] == 12
    assert sum(c["n"] for c in r["by_cause"].values()) == 12
    flagged = r["urgent"]["flagged"] + r["not_urgent"]["flagged"]
    assert flagged == sum(c["flagged"] for c in r["by_cause"].values())
    assert sum(r["flags_by_rule"].values()) >= flagged and set(r["flags_by_rule"]) <= set(r["rules"])
    for part in ("urgent", "not_urgent"):
        fraction = next(v for k, v in r[part].items() if k.startswith("fraction"))
        assert fraction is None or 0.0 <= fraction <= 1.0
    assert r["bundle"]["synthetic_training"] is True
    assert r["flags_with_confidence_not_validated"] == flagged  # a phantom-trained bundle states no tier
