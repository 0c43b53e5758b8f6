"""The node's metrics and readiness over real sockets: the listener counts what DCMTK's storescu
sends, /readyz checks a destination (DCMTK storescp answering C-ECHO, or a closed port) and the
broker (a closed port). The in-process metric tests: tests/unit/test_node_metrics.py."""

from __future__ import annotations

import subprocess
import time

import pydicom
import pytest
from fastapi.testclient import TestClient

from console.app import Readiness, create_app
from dicom_node import metrics
from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.listener import start_listener
from dicom_node.spool import Spool
from models.bundle import load_bundle
from tests.conftest import free_port, require_peer, storescp
from tests.unit.test_node_metrics import scrape, settings_for, value
from worker.node import Node
from worker.settings import Settings

pytestmark = pytest.mark.integration


def test_listener_counts_received_skipped_and_refused_by_calling_ae(tmp_path, phantom_dir):
    port = free_port()
    spool = Spool(tmp_path / "var")
    server = start_listener(Node(Settings()).listener_config(port=port, host="127.0.0.1"), spool, JobStore(spool.root / "jobs.sqlite"),
                            AuditLog(spool.root / "audit.jsonl"), lambda job: None)
    src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
    lateral = pydicom.dcmread(src)
    lateral.ViewPosition, lateral.SOPInstanceUID = "LL", lateral.SOPInstanceUID + ".7"
    lateral.save_as(tmp_path / "lateral.dcm")
    received = value("medsam2_instances_received_total", calling_aet="METRICSCU")
    skipped = value("medsam2_instances_skipped_total", calling_aet="METRICSCU")
    try:
        out = subprocess.run([require_peer("storescu"), "-aet", "METRICSCU", "-aec", "MEDSAM2CXR", "127.0.0.1", str(port),
                              str(src), str(tmp_path / "lateral.dcm")], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    finally:
        server.shutdown()
    assert value("medsam2_instances_received_total", calling_aet="METRICSCU") == received + 1
    assert value("medsam2_instances_skipped_total", calling_aet="METRICSCU") == skipped + 1

    # The same job store, read by the HTTP app at scrape time: one queued, one skipped.
    settings = settings_for(tmp_path)
    client = TestClient(create_app(settings, Readiness(settings, echo=lambda d: None)))
    got = scrape(client)
    per_state = {s.labels["state"]: s.value for s in got["medsam2_jobs"]}
    assert per_state == {**{s.value: 0 for s in JobState}, "queued": 1, "skipped": 1}
    assert got["medsam2_oldest_queued_job_age_seconds"][0].value > 0
    assert got["medsam2_spool_free_bytes"][0].value > 0 and got["medsam2_spool_min_free_bytes"][0].value == 2**20
    assert {s.labels["calling_aet"] for s in got["medsam2_instances_received"] if s.name.endswith("_total")} >= {"METRICSCU"}


def test_readyz_says_which_check_failed(tmp_path, tiny_bundle):
    down = free_port()  # nothing listens there
    settings = settings_for(tmp_path, dest_port=down, destination_timeout_s=1.0)
    client = TestClient(create_app(settings))
    assert client.get("/healthz").json() == {"status": "alive"}
    t0 = time.monotonic()
    r = client.get("/readyz")
    assert time.monotonic() - t0 < 5
    body = r.json()
    assert r.status_code == 503 and body["ready"] is False and body["failed"] == ["model", "destination"]
    assert "not built yet" in body["checks"]["model"]["detail"]
    assert f"PACS@127.0.0.1:{down}" in body["checks"]["destination"]["detail"]
    assert body["checks"]["jobs"]["ok"] and body["checks"]["broker"]["ok"]
    got = scrape(client)
    assert {s.labels["check"]: s.value for s in got["medsam2_ready"]} == {"jobs": 1, "broker": 1, "model": 0,
                                                                       "destination": 0}
    assert [(s.labels, s.value) for s in got["medsam2_destination_up"]] == [
        ({"destination": f"PACS@127.0.0.1:{down}"}, 0.0)]

    # A built bundle and a destination answering C-ECHO (DCMTK storescp): ready.
    pacs_port = free_port()
    pacs = storescp(tmp_path, pacs_port)
    try:
        time.sleep(0.5)
        settings = settings_for(tmp_path, bundle=tiny_bundle, dest_port=pacs_port)
        client = TestClient(create_app(settings))
        r = client.get("/readyz")
        assert r.status_code == 200, r.json()
        assert r.json()["failed"] == []
        got = scrape(client)
    finally:
        pacs.terminate()
        pacs.wait(timeout=10)
    model = metrics.model_label(load_bundle(tiny_bundle).digest)
    assert [(s.labels, s.value) for s in got["medsam2_model_card_ood_rate"]] == [({"model": model}, pytest.approx(0.01))]
    assert got["medsam2_destination_up"][0].value == 1.0


def test_readyz_fails_on_an_unreachable_broker(tmp_path):
    settings = Settings(paths={"spool": tmp_path / "var"}, broker={"url": f"redis://127.0.0.1:{free_port()}/0"},
                        console={"destination_timeout_s": 1.0})
    body = Readiness(settings, echo=lambda d: None).run()
    assert "broker" in body["failed"] and "Connection refused" in body["checks"]["broker"]["detail"]
