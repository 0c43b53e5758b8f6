"""`medsam2-cxr up` with [store] url on a PostgreSQL server of the test's own that is stopped and
started again while the node runs: instances sent meanwhile are refused Out of Resources (storescu
fails, the sender keeps them), the node recovers by itself when the server is back, and every
instance sent with success ends at the PACS, once."""

from __future__ import annotations

import subprocess
import sys
import time

import pydicom
import pytest

from dicom_node.jobstore import JobState
from dicom_node.stores import open_jobs
from tests.conftest import free_port, pg_database, stop_up, storescp
from tests.conftest import wait_for as _wait

pytestmark = pytest.mark.integration


def _storescu(port: int, path) -> subprocess.CompletedProcess:
    return subprocess.run(["/usr/bin/storescu", "-v", "-aec", "MEDSAM2CXR", "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, timeout=60)


def _results(folder) -> set[str]:
    """The source SOP Instance UIDs the PACS has a Comprehensive 3D SR for."""
    out = set()
    for f in folder.iterdir():
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, EOFError):
            continue  # storescp is still writing it (seen on a busy machine): the next poll reads it
        if ds.SOPClassUID.name == "Comprehensive 3D SR Storage":
            out.add(ds.SOPInstanceUID)
    return out


def test_up_rides_out_a_postgresql_restart(tmp_path, tiny_bundle, phantom_dir, pg_server):
    with pg_database(pg_server.admin) as url:
        node_port, pacs_port = free_port(), free_port()
        received = tmp_path / "pacs"
        received.mkdir()
        pacs = storescp(received, pacs_port)
        spool = tmp_path / "var"
        config = tmp_path / "node.toml"
        config.write_text(f'[node]\nport = {node_port}\nmin_free_mb = 16\nlookup_secret = "site-key"\n[destination]\nport = {pacs_port}\n'
                          f'[paths]\nspool = "{spool}"\n[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n'
                          f'[store]\nurl = "{url}"\ntimeout_s = 2\n')
        log = tmp_path / "up.log"
        up = subprocess.Popen([sys.executable, "-m", "worker.cli", "up", "--config", str(config)],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path)
        first, second = sorted((phantom_dir / "images").glob("*.dcm"))[:2]
        try:
            _wait(lambda: "listening" in log.read_text(), 60, "the node to listen")
            assert _storescu(node_port, first).returncode == 0
            _wait(lambda: len(_results(received)) == 1, 120, "the first study's results at the PACS")

            pg_server.stop()
            refused = _storescu(node_port, second)
            said = refused.stdout + refused.stderr
            assert "Out of Resources" in said or "OutOfResources" in said, said[-3000:]
            assert up.poll() is None  # the node runs on
            time.sleep(3)  # the reconciler and workers meet the outage too
            pg_server.start()

            def sent_again() -> bool:  # the modality's retry
                r = _storescu(node_port, second)
                return r.returncode == 0 and "Success" in r.stdout + r.stderr
            _wait(sent_again, 60, "the node to take the instance once the server is back")
            _wait(lambda: len(_results(received)) == 2, 180, lambda: "both studies' results at the PACS; log:\n"
                  + log.read_text()[-3000:])
            assert up.poll() is None
        finally:
            stop_up(up, 30)
            pacs.terminate()
            pacs.wait(timeout=10)
        jobs = open_jobs(url, spool / "jobs.sqlite")
        assert jobs.counts() == {"done": 2}, jobs.counts()
        assert {j.sop_instance_uid for j in jobs.by_state(JobState.DONE)} == {
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in (first, second)}
        assert not (spool / "jobs.sqlite").exists()
        ids = {j.id for s in JobState for j in jobs.by_state(s)}
        assert {p.stem for p in (spool / "incoming").glob("*.dcm")} <= ids  # no file without its job row
