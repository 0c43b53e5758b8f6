"""The audit trail: PS3.15 A.5 fields, append-only JSON lines, and the reader command."""

from __future__ import annotations

import json
import threading

import pytest
from typer.testing import CliRunner

from dicom_node.audit import A5, AuditLog


def test_records_carry_the_a5_event_code_action_and_outcome(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", clock=lambda: 12.0)
    log.record("refused", peer="10.0.0.9:1234", reason="address not allowed")
    log.record("sent", job="j1", sop_instance_uid="1.2.3")
    refused, sent = log.read()
    assert refused["dicom_event"] == "Security Alert" and refused["event_id"] == "110113"
    assert refused["event_outcome"] == 4 and refused["event_action"] == "E"
    assert sent["dicom_event"] == "DICOM Instances Transferred" and sent["event_id"] == "110104"
    assert sent["event_outcome"] == 0 and sent["time"] == 12.0
    # DCM codes of PS3.16 CID 400: Application Activity, Instances Accessed, Instances Transferred,
    # Export, Import, Patient Record, Query, Security Alert, User Authentication
    known = {"110100": "Application Activity", "110103": "DICOM Instances Accessed",
             "110104": "DICOM Instances Transferred", "110106": "Export", "110107": "Import", "110110": "Patient Record",
             "110112": "Query", "110113": "Security Alert", "110114": "User Authentication"}
    assert all(known.get(code) == name for name, code, _, _ in A5.values())
    with pytest.raises(ValueError, match="unknown audit event"):
        log.record("coffee_break")


def test_append_only_across_writers_and_threads(tmp_path):
    path = tmp_path / "audit.jsonl"
    AuditLog(path).record("application_start", pid=1)
    logs = [AuditLog(path) for _ in range(4)]
    threads = [threading.Thread(target=lambda log=log, i=i: [log.record("received", job=f"{i}-{n}") for n in range(25)])
               for i, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 101 and json.loads(lines[0])["event"] == "application_start"
    assert all(json.loads(line) for line in lines)  # whole lines only


def test_reader_command_filters_by_event(tmp_path):
    from dicom_node.jobstore import JobStore
    from worker.cli import app

    spool = tmp_path / "spool"
    JobStore(spool / "jobs.sqlite")  # what makes a folder a spool (the commands never create one)
    log = AuditLog(spool / "audit.jsonl")
    log.record("received", job="a")
    log.record("refused", calling_aet="INTRUDER", reason="calling AE title not allowed")
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[paths]\nspool = "{spool}"\n')
    out = CliRunner().invoke(app, ["audit", "--config", str(cfg), "--event", "refused"])
    assert out.exit_code == 0, out.output
    [line] = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    assert line["calling_aet"] == "INTRUDER" and line["event_id"] == "110113"


def test_a_copy_gets_each_record_and_a_failing_copy_loses_nothing(tmp_path):
    copies: list[dict] = []
    log = AuditLog(tmp_path / "audit.jsonl", clock=lambda: 5.0, copy=copies.append)
    log.record("received", job_id="a")
    assert copies == list(log.read()) and copies[0]["job_id"] == "a"

    def down(record: dict) -> None:
        raise ConnectionError("store away")

    broken = AuditLog(tmp_path / "audit.jsonl", copy=down)
    broken.record("sent", job_id="a")  # no exception: the file has it
    assert [r["event"] for r in log.read()] == ["received", "sent"]
