"""`medsam2-cxr up` as a new user meets it: the first start on a fresh spool answers C-ECHO while
the default bundle and index are built in the background, images received meanwhile wait (not
counted as attempts) and are inferred once the model is ready; a failed build is visible at once
and the node keeps spooling; SIGTERM stops every process within 15 s, mid-work, and after a
restart every image is delivered exactly once. The default bundle is built on the tiny encoder
([model] default_encoder = "tiny") to keep the test short; the 512 graph goes the same way."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.jobstore import JobState, JobStore
from tests.conftest import free_port, storescp, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
STOP_WITHIN_S = 15.0


def _session(sid: int) -> list[int]:
    """Live processes of the session `up` leads (its workers, their pools, the builder)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _echo(port: int) -> bool:
    return subprocess.run(["/usr/bin/echoscu", "-to", "2", "-ta", "2", "-td", "2", "-aec", "MEDSAM2CXR",
                           "127.0.0.1", str(port)], capture_output=True).returncode == 0


def _storescu(port: int, *files: Path) -> None:
    out = subprocess.run(["/usr/bin/storescu", "-aec", "MEDSAM2CXR", "127.0.0.1", str(port), *map(str, files)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _status(config: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "worker.cli", "status", "--config", str(config)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _start(config: Path, log: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "worker.cli", "up", "--config", str(config)],
                            stdout=log.open("a"), stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)


def _stop(up: subprocess.Popen) -> float:
    """SIGTERM; seconds until `up` and every process of its session are gone."""
    t0 = time.monotonic()
    up.send_signal(signal.SIGTERM)
    try:
        wait_for(lambda: up.poll() is not None and not _session(up.pid), STOP_WITHIN_S, "every process to stop",
                 step=0.1)
    finally:
        for pid in _session(up.pid):
            os.kill(pid, signal.SIGKILL)
        if up.poll() is None:
            up.kill()
        up.wait()
    return time.monotonic() - t0


def _jobs(store: JobStore) -> list:
    return [j for s in JobState for j in store.by_state(s)]


def test_first_start_listens_at_once_and_builds_the_model_meanwhile(tmp_path, phantom_dir):
    node_port, pacs_port = free_port(), free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    pacs = storescp(received, pacs_port)
    spool = tmp_path / "var"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nport = {node_port}\nmin_free_mb = 16\n[destination]\nport = {pacs_port}\n'
                      f'[paths]\nspool = "{spool}"\n[model]\ndevice = "cpu"\ndefault_encoder = "tiny"\n'
                      f'default_images = 40\ndefault_index_cases = 16\n'
                      f'[worker]\nstale_after_s = 2.0\nreconcile_every_s = 1.0\n')
    log = tmp_path / "up.log"
    t0 = time.monotonic()
    up = _start(config, log, tmp_path)
    try:
        wait_for(lambda: _echo(node_port), 60, "the first C-ECHO answered")
        echo_s = time.monotonic() - t0
        src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
        _storescu(node_port, src)
        store = JobStore(spool / "jobs.sqlite")
        status = _status(config)
        print(f"[first start] C-ECHO after {echo_s:.1f} s; model {status['model']}")
        assert status["destinations"] == [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port,
                                           "reachable": True}]
        if status["model"]["state"] == "building":  # what waits for the model is not an attempt
            assert status["model"]["stage"] and status["model"]["started"] and status["model"]["error"] is None
            time.sleep(4)  # past stale_after_s, four reconciler rounds
            job = _jobs(store)[0]
            if _status(config)["model"]["state"] == "building":
                assert (job.state, job.attempts) == (JobState.QUEUED, 0)
        wait_for(lambda: len(list(received.iterdir())) >= 4, 600, "the SR, SC, text SR and GSPS at the destination")
        print(f"[first start] first result after {time.monotonic() - t0:.1f} s")
        status = _status(config)
        assert status["counts"] == {"done": 1}
        assert status["model"]["state"] == "ready" and status["model"]["error"] is None
        assert (spool / "models" / "default" / "model_card.json").exists() and (spool / "index").is_dir()
        assert not (spool / "models" / "default.partial").exists() and not (spool / "index.partial").exists()
        assert echo_s < 60
    finally:
        stop_s = _stop(up)
        pacs.terminate()
        pacs.wait(timeout=10)
    assert stop_s < STOP_WITHIN_S
    text = log.read_text()
    assert "listening" in text and "model ready" in text


def test_a_failed_build_is_said_at_once_and_the_node_keeps_spooling(tmp_path, phantom_dir):
    node_port, pacs_port = free_port(), free_port()  # nothing listens on the destination port
    spool = tmp_path / "var"
    config = tmp_path / "node.toml"
    missing = tmp_path / "MedSAM2_latest.pt"
    config.write_text(f'[node]\nport = {node_port}\nmin_free_mb = 16\n[destination]\nport = {pacs_port}\n'
                      f'[paths]\nspool = "{spool}"\n[model]\ndevice = "cpu"\ndefault_encoder = "tiny"\n'
                      f'encoder_checkpoint = "{missing}"\n[worker]\nstale_after_s = 2.0\nreconcile_every_s = 1.0\n')
    log = tmp_path / "up.log"
    up = _start(config, log, tmp_path)
    try:
        wait_for(lambda: '"up.model_build_failed"' in log.read_text(), 90, "the build failure in the log")
        line = json.loads(next(x for x in log.read_text().splitlines() if '"up.model_build_failed"' in x))
        assert "FileNotFoundError" in line["reason"] and str(missing) in line["reason"]
        assert "model build FAILED" in log.read_text()
        status = _status(config)
        assert status["model"]["state"] == "failed" and status["model"]["error"] == line["reason"]
        [dest] = status["destinations"]
        assert dest["reachable"] is False and dest["port"] == pacs_port and dest["error"]
        src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
        assert _echo(node_port)
        _storescu(node_port, src)  # still received, spooled and queued
        time.sleep(4)  # reconciler rounds past stale_after_s: waiting is not an attempt
        [job] = _jobs(JobStore(spool / "jobs.sqlite"))
        assert (job.state, job.attempts) == (JobState.QUEUED, 0)
        assert (spool / job.path).exists()
    finally:
        stop_s = _stop(up)
    assert stop_s < STOP_WITHIN_S


def test_sigterm_mid_work_stops_everything_and_loses_nothing(tmp_path, tiny_bundle, phantom_dir):
    node_port, pacs_port = free_port(), free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    # -uf: every object received goes to a file of its own, so one sent twice is counted twice
    pacs = storescp(received, pacs_port, "-uf")
    spool = tmp_path / "var"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nport = {node_port}\nmin_free_mb = 16\n[destination]\nport = {pacs_port}\n'
                      f'[paths]\nspool = "{spool}"\n[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n')
    n = 16
    images = []
    for i, src in enumerate(sorted((phantom_dir / "images").glob("*.dcm")) * (n // 4)):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{i + 1}"
        images.append(tmp_path / f"img{i:02d}.dcm")
        ds.save_as(images[-1])
    log = tmp_path / "up.log"
    up = _start(config, log, tmp_path)
    stopped_s = None
    try:
        wait_for(lambda: _echo(node_port), 60, "the node to listen")
        _storescu(node_port, *images)
        wait_for(lambda: list(received.iterdir()), 180, "the first result")
        stopped_s = _stop(up)
        store = JobStore(spool / "jobs.sqlite")
        jobs = _jobs(store)
        counts = {s.value: sum(j.state == s for j in jobs) for s in JobState if any(j.state == s for j in jobs)}
        print(f"[sigterm] stopped in {stopped_s:.1f} s with {counts}, {len(list(received.iterdir()))} results out")
        assert len(jobs) == n
        assert not [j for j in jobs if j.state in (JobState.INFERRING, JobState.SENDING)]  # no claim waits for a lease
        assert stopped_s < STOP_WITHIN_S

        up = _start(config, log, tmp_path)
        wait_for(lambda: all(j.state == JobState.DONE for j in _jobs(store)), 300,
                 lambda: f"every image done ({[j.state.value for j in _jobs(store)]})")
        time.sleep(2)
    finally:
        if up.poll() is None:
            _stop(up)
        pacs.terminate()
        pacs.wait(timeout=10)
    files = sorted(received.iterdir())
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    assert len(uids) == len(set(uids)), "a result was delivered twice"
    kos = sum(pydicom.dcmread(f, stop_before_pixels=True).Modality == "KO" for f in files)  # urgent studies
    assert len(files) == 3 * n + kos and kos <= n  # SR, SC and GSPS of every image (and a KOS if urgent), once
    sent = [json.loads(line)["job"] for line in (spool / "audit.jsonl").read_text().splitlines()
            if "\"event\": \"sent\"" in line]
    assert sorted(sent) == sorted(set(sent)) and len(sent) == n
