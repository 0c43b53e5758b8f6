"""[node] processes = 2: `medsam2-cxr listen` runs two listener processes on one port
(SO_REUSEPORT), and both accept associations: the kernel spreads the connections across them.
Then `medsam2-cxr reconcile`, the reconciler as a role of its own, on the same spool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pynetdicom import AE

from dicom_node.jobstore import JobStore
from tests.conftest import free_port, require_peer, wait_for
from tests.integration.test_listener import make_image
from worker.settings import Settings

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
VERIFICATION = "1.2.840.10008.1.1"
ASSOCIATIONS = 16  # all on one process by chance: 2 * 2**-16


def _listener_pids(log: Path) -> list[int]:
    pids = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"listener started"' in line:
            pids.append(json.loads(line)["pid"])
    return pids


def _established_on(pid: int, port: int) -> int:
    """TCP connections in ESTABLISHED state on local ``port`` that process ``pid`` holds (/proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    n = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            local_port, state, inode = int(cols[1].rsplit(":", 1)[1], 16), cols[3], cols[9]
            n += local_port == port and state == "01" and inode in inodes
    return n


def test_two_listener_processes_share_one_port_and_both_accept(tmp_path):
    storescu = require_peer("storescu")
    port = free_port()
    spool = tmp_path / "spool"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nport = {port}\nprocesses = 2\nmin_free_mb = 1\nhost = "127.0.0.1"\n'
                      f'max_associations = 32\nmax_associations_per_address = 0\n'
                      f'[console]\nport = 0\n[paths]\nspool = "{spool}"\n')
    log = tmp_path / "listen.log"
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "listen", "--config", str(config)], cwd=REPO,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: len(_listener_pids(log)) == 2, 90, lambda: f"two listener processes (log: {log.read_text()[-2000:]})")
        pids = _listener_pids(log)
        assert pids[0] == proc.pid and pids[1] != proc.pid  # `listen` itself, and the one it started
        ae = AE(ae_title="MODALITY1")
        ae.add_requested_context(VERIFICATION)
        assocs = [ae.associate("127.0.0.1", port, ae_title="MEDSAM2CXR") for _ in range(ASSOCIATIONS)]
        try:
            assert all(a.is_established for a in assocs)
            assert all(a.send_c_echo().Status == 0 for a in assocs)
            held = {pid: _established_on(pid, port) for pid in pids}
            assert sum(held.values()) == ASSOCIATIONS and all(held.values()), held
        finally:
            for a in assocs:
                a.release()
        # Instances received by either process land in the one spool and job table.
        for i in range(6):
            image = make_image(tmp_path / f"img{i}.dcm")
            r = subprocess.run([storescu, "-aet", "MODALITY1", "-aec", "MEDSAM2CXR", "127.0.0.1", str(port), str(image)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        assert JobStore(spool / "jobs.sqlite").counts() == {"queued": 6}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0
    # The child listener went with `listen`: nothing listens on the port any more.
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
               for pid in pids)

    # The reconciler as a role of its own (`medsam2-cxr reconcile`, no listener): on start it
    # re-enqueues every QUEUED job of the job table (here into the spool's filesystem broker).
    queue = Settings.model_validate({"paths": {"spool": str(spool)}}).layout.broker_folder("queue")
    before = len(list(queue.iterdir()))
    assert before == 6  # one message per job, from the listeners
    rec = subprocess.Popen([sys.executable, "-m", "worker.cli", "reconcile", "--config", str(config)], cwd=REPO,
                           stdout=(tmp_path / "reconcile.log").open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: len(list(queue.iterdir())) >= before + 6, 60,
                 lambda: f"the reconciler to re-enqueue 6 jobs ({(tmp_path / 'reconcile.log').read_text()[-1500:]})")
    finally:
        rec.send_signal(signal.SIGTERM)
        rec.wait(timeout=30)
    assert rec.returncode == 0
