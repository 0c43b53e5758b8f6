"""What the pipeline delivers passes dciodvfy (dicom3tools): the SR and SC of a phantom image, as
the unit test tests/unit/test_pipeline.py::test_infer_then_deliver_once makes them."""

from __future__ import annotations

from pathlib import Path

import pydicom

from dicom_node.jobstore import JobState
from dicom_node.sender import Destination
from tests.conftest import dciodvfy_errors
from tests.unit.test_pipeline import _receive, ctx, predictor  # noqa: F401  (ctx, predictor: fixtures)
from worker import pipeline


def test_delivered_results_pass_dciodvfy(ctx, predictor, phantom_dir):  # noqa: F811
    src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    _receive(ctx, src, "job1")
    assert pipeline.infer_jobs(["job1"], ctx, predictor, lambda job_id: None) == ["job1"]
    delivered: list[list[Path]] = []
    dest = Destination("PACS", "127.0.0.1", 4242)
    assert pipeline.deliver_job("job1", ctx, lambda aet: dest, lambda f, d: delivered.append(f)) == JobState.DONE
    files = delivered[0]
    assert {pydicom.dcmread(f).SOPClassUID.name for f in files} >= {"Comprehensive 3D SR Storage"}, files
    for f in files:
        assert not dciodvfy_errors(f), f
