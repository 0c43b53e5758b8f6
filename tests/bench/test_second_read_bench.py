"""bench/second_read.py at a small n: reports over real MLLP, every one acknowledged and compared,
and its per-finding figures add up from the flags the node recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import second_read
from models.labels import LABELS, OPACITY_CHILDREN
from phantoms import sample_cases
from phantoms.reports import write_report
from ris.second_read import label_report

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.bench


def test_a_left_out_finding_is_silent_in_the_report() -> None:
    rng = np.random.default_rng(5)
    silent = 0
    for i, case in enumerate(sample_cases(80, 9)):
        omitted = second_read.left_out(case.labels, rng, 0.5)
        assert all(case.labels[k] for k in omitted) and "No Finding" not in omitted
        if any(case.labels[c] for c in OPACITY_CHILDREN) and all(c in omitted for c in OPACITY_CHILDREN
                                                                 if case.labels[c]):
            assert "Lung Opacity" in omitted
        report = label_report(write_report(case.labels, case.uncertain, case.findings, np.random.default_rng(i),
                                           left_out=omitted))
        for k in omitted:
            silent += not report.mentioned(k)
    assert silent > 20  # the labelers read most left-out findings as not mentioned


def test_bench_second_read_small_n(tiny_bundle) -> None:
    out = subprocess.run([sys.executable, "-m", "bench.second_read", "--bundle", str(tiny_bundle), "--n", "12",
                          "--seed", "31", "--render-size", "256", "--device", "cpu"],
                         capture_output=True, text=True, check=False, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("{")]
    r = json.loads(line)
    assert r["benchmark"] == "second_read" and r["reports"]["sent"] == r["reports"]["acked_AA"] == 12
    assert r["reports"]["reports"] == r["reports"]["comparisons"] == 12 and r["reports"]["waiting"] == 0
    per = r["per_label"]
    assert set(per) == set(LABELS) - {"No Finding"}
    assert sum(p["flagged"] for p in per.values()) == r["micro"]["flagged"] <= r["reports"]["discrepancies"]
    assert sum(p["left_out"] for p in per.values()) == r["micro"]["left_out"] > 0
    for p in per.values():
        for k in ("recall", "precision", "omissions_caught"):
            assert p[k] is None or 0.0 <= p[k] <= 1.0
