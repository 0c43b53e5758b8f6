"""The console router over a spool made by hand: logins, roles, CSRF, lockout, the keyed-hash
lookup, identifiers on demand, redaction, resend; every change audited with its user."""

from __future__ import annotations

import json
import re

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.lookup import keyed_hash, spool_secret
from dicom_node.spool import Spool
from tests.console_helpers import PASSWORDS, console_app, users_toml
from worker.pipeline import Context
from worker.settings import load_settings


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _source(path, accession: str, patient_id: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "Doe^Jane", patient_id, accession
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def node(tmp_path):
    spool = tmp_path / "var"
    config = tmp_path / "node.toml"
    config.write_text(f'[paths]\nspool = "{spool}"\n[broker]\nurl = "redis://:brokerpw@127.0.0.1:1/0"\n'
                      '[console]\nsession_secret = "s3cret-session"\nlockout_failures = 3\n'
                      'lockout_window_s = 60\nlockout_s = 120\n' + users_toml())
    settings = load_settings(config)
    ctx = Context(spool=Spool(spool), jobs=JobStore(spool / "jobs.sqlite"), audit=AuditLog(spool / "audit.jsonl"))
    key = spool_secret(settings.spool, "lookup", settings.node.lookup_secret)
    for job_id, state, acc in (("jobdone", JobState.DONE, "ACC-1"), ("jobdead", JobState.DEAD, "ACC-2")):
        path = ctx.spool.incoming_path(job_id)
        _source(path, acc, "PID-7")
        ds = pydicom.dcmread(path)
        ctx.jobs.add(job_id=job_id, sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
                     study_instance_uid=ds.StudyInstanceUID, calling_aet="SITE_A", path=ctx.spool.relative(path),
                     state=state, reason="destination down" if state == JobState.DEAD else None,
                     accession_hash=keyed_hash(key, acc), patient_hash=keyed_hash(key, "PID-7"))
    sr = ctx.spool.result_dir("jobdead") / "sr.dcm"
    sr.write_bytes(b"x")
    ctx.spool.dead_letter("jobdead", [sr], "association rejected by PACS@127.0.0.1:4242")
    clock = Clock()
    queued: list[tuple[str, str]] = []
    app = console_app(settings, ctx=ctx, echo=lambda d: (False, "not reachable (test)"), monotonic=clock,
                      enqueue=(lambda j: queued.append(("infer", j)), lambda j: queued.append(("send", j))))
    return {"app": app, "ctx": ctx, "settings": settings, "clock": clock, "queued": queued}


def _audit(node, event: str) -> list[dict]:
    return [r for r in node["ctx"].audit.read() if r["event"] == event]


def _login(client: TestClient, user: str, password: str | None = None, status: int = 303):
    page = client.get("/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/login", data={"user": user, "password": PASSWORDS.get(user, "x") if password is None else password,
                                    "csrf": token, "next": "/jobs"}, follow_redirects=False)
    assert r.status_code == status, r.text
    return r


def _csrf(client: TestClient) -> str:
    return client.get("/api/session").json()["csrf"]


def test_nothing_without_a_login(node):
    client = TestClient(node["app"])
    r = client.get("/jobs/jobdone", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/jobs/jobdone"
    assert client.get("/api/jobs").status_code == 401
    assert client.post("/api/jobs/jobdead/resend").status_code == 401
    assert client.post("/login", data={"user": "admin", "password": PASSWORDS["admin"]}).status_code == 403  # no form token


def test_session_cookie_flags_and_logout(node):
    client = TestClient(node["app"])
    r = _login(client, "viewer")
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    assert r.headers["location"] == "/jobs"
    assert _audit(node, "login")[-1]["user"] == "viewer"
    old = client.cookies.get("medsam2_session")
    client.post("/logout", data={"csrf": _csrf(client)})
    assert _audit(node, "logout")[-1]["user"] == "viewer"
    client.cookies.set("medsam2_session", old)
    assert client.get("/api/session").status_code == 401  # logged out: the old cookie is dead
    tls = TestClient(node["app"], base_url="https://testserver")
    assert "Secure" in _login(tls, "viewer").headers["set-cookie"]
    forged = old.rsplit(".", 1)[0].replace("dmlld2Vy", "YWRtaW4") + "." + old.rsplit(".", 1)[1]
    client.cookies.set("medsam2_session", forged)
    assert client.get("/api/session").status_code == 401


def test_csrf_token_on_every_post_and_roles(node):
    viewer, operator = TestClient(node["app"]), TestClient(node["app"])
    _login(viewer, "viewer")
    _login(operator, "operator")
    assert operator.post("/api/jobs/jobdead/resend").status_code == 403  # no token
    assert operator.post("/api/jobs/jobdead/resend", headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert operator.post("/jobs/jobdead/resend", data={"csrf": "forged"}).status_code == 403
    assert _audit(node, "access_denied")[-1]["reason"] == "missing or wrong CSRF token"
    assert node["ctx"].jobs.get("jobdead").state == JobState.DEAD
    r = viewer.post("/api/jobs/jobdead/resend", headers={"X-CSRF-Token": _csrf(viewer)})
    assert r.status_code == 403 and _audit(node, "access_denied")[-1]["user"] == "viewer"
    assert "Resend" not in viewer.get("/failures").text
    assert "Resend" in operator.get("/failures").text and "association rejected" in operator.get("/failures").text
    r = operator.post("/jobs/jobdead/resend", data={"csrf": _csrf(operator)}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/jobs/jobdead?resent=queued"
    assert node["queued"] == [("infer", "jobdead")]  # no prediction in the spool: inferred again
    assert _audit(node, "resent")[-1] | {"user": "operator", "job": "jobdead"} == _audit(node, "resent")[-1]
    r = operator.post("/api/jobs/jobdead/resend", headers={"X-CSRF-Token": _csrf(operator)})
    assert r.status_code == 409  # not dead any more


def test_lockout_per_user_and_per_address(node):
    client = TestClient(node["app"])
    for _ in range(3):
        _login(client, "operator", "Tr0ub4dor-guess", status=401)
    assert _audit(node, "login_locked")[0]["locked"] == "user"
    _login(client, "operator", status=429)  # the right password, locked out
    assert _audit(node, "login_failed")[-1]["reason"] == "locked out"
    assert all("Tr0ub4dor" not in json.dumps(r) for r in node["ctx"].audit.read())  # never a password
    node["clock"].t += 121
    _login(client, "operator")
    for name in ("nobody1", "nobody2", "nobody3"):  # different names, one address
        _login(client, name, "x", status=401)
    _login(client, "admin", status=429)
    assert {r["locked"] for r in _audit(node, "login_locked")} == {"user", "address"}


def test_lookup_by_keyed_hash_and_identifiers_on_demand(node):
    operator, admin = TestClient(node["app"]), TestClient(node["app"])
    _login(operator, "operator")
    _login(admin, "admin")
    r = operator.post("/api/jobs/lookup", json={"accession_number": "ACC-2"}, headers={"X-CSRF-Token": _csrf(operator)})
    assert [j["id"] for j in r.json()] == ["jobdead"]
    r = operator.post("/jobs/lookup", data={"csrf": _csrf(operator), "patient_id": "PID-7"})
    assert "jobdone" in r.text and "jobdead" in r.text and "PID-7" not in r.text
    q = _audit(node, "job_query")
    assert q[0]["user"] == "operator" and q[0]["by"] == ["accession_number"] and q[0]["matches"] == 1
    assert "ACC-2" not in json.dumps(q) and "PID-7" not in json.dumps(q)
    page = operator.get("/jobs/jobdone").text
    assert "PID-7" not in page and "Doe" not in page and "show-identifiers" not in page
    assert operator.post("/api/jobs/jobdone/identifiers", headers={"X-CSRF-Token": _csrf(operator)}).status_code == 403
    r = admin.post("/api/jobs/jobdone/identifiers", headers={"X-CSRF-Token": _csrf(admin)})
    assert r.status_code == 200 and r.json()["PatientID"] == "PID-7" and r.json()["AccessionNumber"] == "ACC-1"
    assert r.headers["cache-control"] == "no-store"
    seen = _audit(node, "identifiers_viewed")[-1]
    assert seen["user"] == "admin" and seen["job"] == "jobdone" and seen["dicom_event"] == "Patient Record"
    assert "PID-7" not in json.dumps(seen)
    assert "Doe^Jane" in admin.post("/jobs/jobdone/identifiers", data={"csrf": _csrf(admin)}).text


def test_pages_and_configuration_redacted(node):
    client = TestClient(node["app"])
    _login(client, "viewer")
    for path in ("/", "/jobs", "/jobs?state=dead&calling_aet=SITE_A&since=2000-01-01T00:00", "/jobs/jobdone",
                 "/failures", "/model", "/sites", "/config"):
        assert client.get(path).status_code == 200, path
    assert client.get("/jobs?since=yesterday").status_code == 422
    assert client.get("/jobs/..%2Fetc").status_code in (404, 422)
    today = client.get("/api/today").json()
    assert today["counts"] == {"done": 1, "dead": 1} and today["destinations"][0]["up"] is False
    assert [s["calling_aet"] for s in client.get("/api/sites").json()] == ["SITE_A"]
    config = client.get("/api/config").json()
    text = json.dumps(config) + client.get("/config").text
    assert "s3cret-session" not in text and "brokerpw" not in text and "$argon2" not in text
    assert config["console"]["session_secret"] == "[redacted]"
    assert config["console"]["users"][0]["password_hash"] == "[redacted]"
    assert config["broker"]["url"] == "redis://:[redacted]@127.0.0.1:1/0"
    assert client.get("/api/model-card").status_code == 404  # no bundle in this spool


def test_hash_password_helper(capsys, monkeypatch):
    import io

    from argon2 import PasswordHasher

    from console.auth import main

    monkeypatch.setattr("sys.stdin", io.StringIO("pw-from-stdin\n"))
    assert main(["hash-password"]) == 0
    assert PasswordHasher().verify(capsys.readouterr().out.strip(), "pw-from-stdin")


def test_a_damaged_result_file_does_not_take_the_page_down(node):
    folder = node["ctx"].spool.result_dir("jobdone")
    (folder / "prediction.json").write_text("{not json")
    (folder / "text.dcm").write_bytes(b"not dicom")
    (folder / "sc.dcm").write_bytes(b"not dicom")
    client = TestClient(node["app"])
    _login(client, "viewer")
    r = client.get("/jobs/jobdone")
    assert r.status_code == 200 and "No prediction yet" in r.text
    assert client.get("/jobs/jobdone/sc.png").status_code == 404


def test_pause_a_destination(node, tmp_path):
    """An operator pauses the default destination: the sender's caller refuses to send (a
    transient error: the job waits, still inferred) until it is resumed; both audited."""
    from dicom_node.pause import DestinationPaused
    from worker.runtime import Runtime

    viewer, operator = TestClient(node["app"]), TestClient(node["app"])
    _login(viewer, "viewer")
    _login(operator, "operator")
    assert viewer.post("/api/destinations/default/pause", headers={"X-CSRF-Token": _csrf(viewer)}).status_code == 403
    assert operator.post("/api/destinations/NOSUCH/pause", headers={"X-CSRF-Token": _csrf(operator)}).status_code == 404
    r = operator.post("/destinations/default/pause", data={"csrf": _csrf(operator)}, follow_redirects=False)
    assert r.status_code == 303
    assert "paused</b> by operator" in operator.get("/").text
    rt = Runtime.from_settings(node["settings"])
    dest = rt.destination_for("SITE_A")
    with pytest.raises(DestinationPaused):
        rt.send([], dest)
    from worker.failures import is_transient

    assert is_transient(DestinationPaused("x"))
    r = operator.post("/api/destinations/default/resume", headers={"X-CSRF-Token": _csrf(operator)})
    assert r.json() == {"target": "default", "destination": "PACS@127.0.0.1:4242", "paused": False}
    assert [a["user"] for a in _audit(node, "destination_paused") + _audit(node, "destination_resumed")] == \
        ["operator", "operator"]
