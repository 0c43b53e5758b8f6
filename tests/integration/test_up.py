"""`medsam2-cxr up` on the embedded single-host defaults: no broker server (Celery's filesystem
transport in the spool), workers as child processes, results to a DCMTK storescp. A similar cases
index in <spool>/index is picked up without configuration, so the draft report comes as a third
object (Basic Text SR)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from tests.conftest import free_port, stop_up, storescp
from tests.conftest import wait_for as _wait

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_up_serverless_round_trip(tmp_path, tiny_bundle, phantom_dir, store, request):
    """The same round trip with the job table in the spool's SQLite file (the default) and, with
    [store] url, in PostgreSQL (a database of this test's own)."""
    url = request.getfixturevalue("pg_url") if store == "postgresql" else ""
    node_port, pacs_port = free_port(), free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    pacs = storescp(received, pacs_port)
    spool = tmp_path / "var"
    from index.build import build_index, manifest_items
    from models.bundle import load_bundle

    build_index(spool / "index", load_bundle(tiny_bundle), manifest_items(phantom_dir), progress=False)
    config = tmp_path / "node.toml"
    secret = 'lookup_secret = "site-key"\n' if url else ""  # one key for every host of a shared store
    config.write_text(f'[node]\nport = {node_port}\nmin_free_mb = 16\n{secret}[destination]\nport = {pacs_port}\n'
                      f'[paths]\nspool = "{spool}"\n[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n'
                      f'[store]\nurl = "{url}"\n')
    log = tmp_path / "up.log"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    up = subprocess.Popen([sys.executable, "-m", "worker.cli", "up", "--config", str(config)],
                          stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=workdir)
    try:
        _wait(lambda: "listening" in log.read_text(), 60, "the node to listen")
        text = log.read_text()
        assert "AE title MEDSAM2CXR" in text and f"port {node_port}" in text and f"PACS@127.0.0.1:{pacs_port}" in text
        src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
        lateral = pydicom.dcmread(src)
        lateral.ViewPosition = "LL"
        lateral.SOPInstanceUID = lateral.SOPInstanceUID + ".1"
        lateral.save_as(tmp_path / "lateral.dcm")
        out = subprocess.run(["/usr/bin/storescu", "-aec", "MEDSAM2CXR", "127.0.0.1", str(node_port), str(src),
                              str(tmp_path / "lateral.dcm")], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        _wait(lambda: len(list(received.iterdir())) >= 4, 120, "the SR, SC, text SR and GSPS at the destination")
        time.sleep(2)
        files = sorted(received.iterdir())
        classes = sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID.name for f in files)
        kos = classes.count("Key Object Selection Document Storage")  # when the study is urgent (models.urgency)
        assert len(files) == 4 + kos and kos <= 1  # the lateral was stored and skipped, not processed
        assert [c for c in classes if c != "Key Object Selection Document Storage"] == [
            "Basic Text SR Storage", "Comprehensive 3D SR Storage", "Grayscale Softcopy Presentation State Storage",
            "Secondary Capture Image Storage"]
        status = subprocess.run([sys.executable, "-m", "worker.cli", "status", "--config", str(config)],
                                capture_output=True, text=True, cwd=REPO)
        status = json.loads(status.stdout.strip().splitlines()[-1])
        assert (status["counts"], status["failures"]) == ({"done": 1, "skipped": 1}, [])
        assert status["model"] == {"state": "ready", "bundle": str(tiny_bundle)}
        assert status["destinations"] == [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port,
                                           "reachable": True}]
    finally:
        stop_up(up, 15)
        pacs.terminate()
        pacs.wait(timeout=10)
    assert list(workdir.iterdir()) == []  # everything the node writes lives in the spool
    events = [json.loads(line)["event"] for line in (spool / "audit.jsonl").read_text().splitlines()]
    assert events[0] == "application_start" and events[-1] == "application_stop"
    assert {"received", "skipped", "inferred", "sent"} <= set(events)
    assert (spool / "jobs.sqlite").exists() == (store == "sqlite")  # with [store] url, no job table in the spool
    if url:
        from dicom_node.audit_copy import AuditCopy
        from dicom_node.stores import open_jobs

        jobs = open_jobs(url, spool / "jobs.sqlite")
        assert jobs.counts() == {"done": 1, "skipped": 1}
        assert [r["event"] for r in AuditCopy(jobs.db).read(limit=10_000)] == events  # the copy has every record
