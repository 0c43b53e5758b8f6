"""deploy/prometheus (scrape configuration, alert rules) and deploy/grafana: every metric name they
use is one the node exports (promtool's own checks: tests/integration/test_promtool.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from console.app import Readiness, create_app
from dicom_node import metrics
from models.bundle import CARD, card_digest
from worker.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROM = DEPLOY / "prometheus"
NAME = re.compile(r"\b(medsam2_[a-z0-9_]+)\b")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"), "gauge": ("",)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[set[str], set[str]]:
    """(metric family names, sample names) the node exports: every metric dicom_node.metrics
    defines, and what the HTTP app's collectors report (with a model card)."""
    families, samples = set(), set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            families.add(obj._name)
            samples.update(obj._name + s for s in SUFFIXES[obj._type])
    tmp = tmp_path_factory.mktemp("node")
    bundle = tmp / "bundle"
    bundle.mkdir()
    card = {"name": "test", "version": "0", "ood": {"percentile_of_validation": 99.0},
            "drift": {"day_images": 50, "positive_rate": {"Cardiomegaly": [0.02, 0.3]}, "ood_rate": [0.0, 0.06],
                      "mean_radius": [0.08, 0.12]}}  # models.drift.reference's shape
    (bundle / CARD).write_text(json.dumps({**card, "digest": card_digest(card)}))
    settings = Settings(paths={"spool": tmp / "var"}, model={"bundle": str(bundle)})
    client = TestClient(create_app(settings, Readiness(settings, echo=lambda d: None)))
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name.startswith("medsam2_") and not family.name.endswith("_created"):
            families.add(family.name)
            samples.update(s.name for s in family.samples)
    return families, samples


def _exprs_of_dashboard() -> list[str]:
    dash = json.loads((DEPLOY / "grafana" / "medsam2-cxr.json").read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def _exprs_of_rules() -> list[str]:
    rules = yaml.safe_load((PROM / "medsam2-cxr.rules.yml").read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_expression_uses_exported_metrics(exported, source):
    _, samples = exported
    exprs = _exprs_of_dashboard() if source == "dashboard" else _exprs_of_rules()
    assert exprs
    unknown = sorted({n for e in exprs for n in NAME.findall(e)} - samples)
    assert unknown == [], f"{source} uses metrics the node does not export: {unknown}"


def test_the_dashboard_shows_every_series(exported):
    families, _ = exported
    used = {n for e in _exprs_of_dashboard() for n in NAME.findall(e)}
    shown = {f for f in families if any(u == f or u.startswith(f + "_") for u in used)}
    assert sorted(families - shown - {"medsam2_model_info"}) == []
