"""The console's second-read list: the discrepancies in the report store, page and API, behind a login."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobStore
from dicom_node.spool import Spool
from ris.reportstore import ReportStore
from ris.second_read import Discrepancy, label_report
from tests.console_helpers import PASSWORDS, console_app, users_toml
from worker.pipeline import Context
from worker.settings import load_settings


def _client(tmp_path) -> TestClient:
    spool = tmp_path / "var"
    config = tmp_path / "node.toml"
    config.write_text(f'[paths]\nspool = "{spool}"\n[console]\nsession_secret = "s"\n'
                      '[second_read]\nenabled = true\n' + users_toml())
    settings = load_settings(config)
    store = ReportStore(settings.layout.reports)
    for n, (label, direction) in enumerate((("Pneumothorax", "model_positive"), ("Edema", "report_positive"))):
        report, _ = store.add(source="hl7", message_id=f"M{n}", study_instance_uid=f"1.2.{n}", accession_hash="h",
                              status="F", text="Secret-Report-Text", labels=label_report("No acute disease."))
        store.record(report.id, f"job{n}", f"1.2.{n}", [Discrepancy(label, direction, "high", 0.93, "silent")])
    ctx = Context(spool=Spool(spool), jobs=JobStore(spool / "jobs.sqlite"), audit=AuditLog(spool / "audit.jsonl"))
    client = TestClient(console_app(settings, ctx=ctx, echo=lambda d: (False, "test")))
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    client.post("/login", data={"user": "viewer", "password": PASSWORDS["viewer"], "csrf": token, "next": "/"})
    return client


def test_the_list_shows_each_discrepancy_newest_first_without_the_report_text(tmp_path):
    client = _client(tmp_path)
    r = client.get("/api/discrepancies")
    assert r.status_code == 200
    body = r.json()
    assert [d["label"] for d in body["discrepancies"]] == ["Edema", "Pneumothorax"]
    assert body["counts"] == {"reports": 2, "waiting": 0, "comparisons": 2, "discrepancies": 2}
    assert [d["label"] for d in client.get("/api/discrepancies?label=Edema").json()["discrepancies"]] == ["Edema"]
    assert client.get("/api/discrepancies?label=Coffee").status_code == 422
    page = client.get("/second-reads")
    assert page.status_code == 200
    rows = re.findall(r'<tr data-discrepancy="\d+">(.*?)</tr>', page.text, re.S)
    assert len(rows) == 2 and "Pneumothorax" in rows[1] and "called by the model, not in the report" in rows[1]
    assert 'href="/jobs/job0"' in rows[1]
    assert "Secret-Report-Text" not in page.text + r.text


def test_the_list_needs_a_login(tmp_path):
    client = TestClient(_client(tmp_path).app)
    assert client.get("/api/discrepancies").status_code == 401
    assert client.get("/second-reads", follow_redirects=False).status_code == 303
