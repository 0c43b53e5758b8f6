"""`medsam2-cxr up` in shadow mode ([node] mode = "shadow") with a real storescp as the PACS and a
second one as the QA destination: the PACS receives nothing, the QA destination every DICOM
result, the spool keeps them all, the job is done with reason "shadow", and `status` says so."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.jobstore import JobStore
from tests.conftest import free_port, require_peer, stop_up, storescp
from tests.conftest import wait_for as _wait

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_shadow_mode_sends_nothing_to_the_pacs(tmp_path, tiny_bundle, phantom_dir):
    node_port, pacs_port, qa_port = free_port(), free_port(), free_port()
    pacs_in, qa_in = tmp_path / "pacs", tmp_path / "qa"
    pacs_in.mkdir()
    qa_in.mkdir()
    pacs = storescp(pacs_in, pacs_port)
    qa = subprocess.Popen([require_peer("storescp"), "-aet", "QAVIEW", "-od", str(qa_in), str(qa_port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spool = tmp_path / "var"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nport = {node_port}\nmin_free_mb = 16\nmode = "shadow"\n'
                      f'[node.qa_destination]\nae_title = "QAVIEW"\nport = {qa_port}\n'
                      f'[destination]\nport = {pacs_port}\n[paths]\nspool = "{spool}"\n'
                      f'[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n')
    log = tmp_path / "up.log"
    up = subprocess.Popen([sys.executable, "-m", "worker.cli", "up", "--config", str(config)],
                          stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
    try:
        _wait(lambda: "listening" in log.read_text(), 60, "the node to listen")
        src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
        out = subprocess.run([require_peer("storescu"), "-aec", "MEDSAM2CXR", "127.0.0.1", str(node_port), str(src)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        jobs = JobStore(spool / "jobs.sqlite")
        _wait(lambda: jobs.counts().get("done") == 1, 120, lambda: f"the job done in shadow mode: {jobs.counts()}")
        _wait(lambda: len(list(qa_in.iterdir())) >= 3, 30, "the SR, SC and GSPS at the QA destination")
        time.sleep(2)  # anything on its way to the PACS would have arrived by now
        assert list(pacs_in.iterdir()) == []
        (job,) = jobs.recent(tuple(jobs.counts()), 5)
        assert job.reason == "shadow: results to the QA destination QAVIEW"
        kept = sorted(p.name for p in (spool / "results" / job.id).glob("*.dcm"))
        qa_uids = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in qa_in.iterdir())
        spool_uids = sorted(str(pydicom.dcmread(spool / "results" / job.id / n, stop_before_pixels=True).SOPInstanceUID)
                            for n in kept)
        assert {"sr.dcm", "sc.dcm", "pr.dcm"} <= set(kept) and qa_uids == spool_uids
        status = subprocess.run([sys.executable, "-m", "worker.cli", "status", "--config", str(config)],
                                capture_output=True, text=True, cwd=REPO, timeout=60)
        status = json.loads(status.stdout.strip().splitlines()[-1])
        assert status["mode"]["mode"] == "shadow"
        assert status["mode"]["qa_destination"] == {"ae_title": "QAVIEW", "host": "127.0.0.1", "port": qa_port}
    finally:
        stop_up(up, 15)
        for p in (pacs, qa):
            p.terminate()
            p.wait(timeout=10)
    records = [json.loads(line) for line in (spool / "audit.jsonl").read_text().splitlines()]
    events = [r["event"] for r in records]
    assert "shadow" in events and "sent" not in events and "report_sent" not in events
    assert [r["qa_destination"] for r in records if r["event"] == "shadow"] == ["QAVIEW"]
