"""Prediction.to_json / from_json: the spool's prediction file read back is the prediction written."""

from __future__ import annotations

import numpy as np
import pytest

from models.prediction import NOT_VALIDATED, Finding, Prediction


def _prediction() -> Prediction:
    findings = (Finding("Pleural Effusion", 0.8123, 0.5, "high", 0.0312, "sensitivity:0.90"),
                Finding("Pneumothorax", 0.1, 0.35, NOT_VALIDATED, 0.2))
    return Prediction(findings, ood_score=1.25, ood_threshold=1.0, center=np.arange(4, dtype=np.float64),
                      radius=np.full(4, 0.5), saliency={"Pleural Effusion": np.eye(3)})


def test_from_json_reverses_to_json() -> None:
    p = _prediction()
    back = Prediction.from_json(p.to_json(), center=p.center, radius=p.radius, saliency=p.saliency)
    assert back.findings == p.findings and back.to_json() == p.to_json()
    assert back.out_of_distribution and back.findings[0].present and not back.findings[1].present
    assert np.array_equal(back.center, p.center) and np.array_equal(back.radius, p.radius)
    assert np.array_equal(back.saliency["Pleural Effusion"], np.eye(3))


def test_from_json_takes_the_box_from_the_body_and_names_what_is_missing() -> None:
    p = _prediction()
    body = {**p.to_json(), "center": p.center.tolist(), "radius": p.radius.tolist()}
    back = Prediction.from_json(body)
    assert np.array_equal(back.center, p.center) and back.saliency == {}
    with pytest.raises(KeyError, match="center"):
        Prediction.from_json(p.to_json())
