"""DICOMweb in and out with real parts: `medsam2-cxr up` (tiny bundle, the spool's filesystem
broker) takes a phantom radiograph by STOW-RS from dicomweb-client, and sends its results by
STOW-RS to Orthanc's DICOMweb plugin (Debian orthanc-dicomweb) as a destination of type
dicomweb. The results must land in the source's study in Orthanc (its REST API says so), once,
though the source was posted twice."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from dicomweb_client import DICOMwebClient

from dicom_node.stow import new_token
from tests.conftest import free_port, require_peer, stop_up, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
SR_3D, SC, GSPS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.11.1"


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _post(url: str, body: str):
    with urllib.request.urlopen(urllib.request.Request(url, data=body.encode(), method="POST"), timeout=5) as r:
        return json.loads(r.read())


def _try(fn):
    try:
        return fn()
    except OSError:  # urllib's URLError and connection errors
        return None


@pytest.fixture
def orthanc(tmp_path):
    require_peer("Orthanc")
    require_peer(str(PLUGIN))
    dicom_port, http_port = free_port(), free_port()
    cfg = {"Name": "PACS", "DicomAet": "PACS", "DicomPort": dicom_port, "HttpPort": http_port,
           "StorageDirectory": str(tmp_path / "orthanc-db"), "IndexDirectory": str(tmp_path / "orthanc-db"),
           "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [str(PLUGIN)],
           "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (tmp_path / "orthanc.json").write_text(json.dumps(cfg))
    log = (tmp_path / "orthanc.log").open("w")
    proc = subprocess.Popen([require_peer("Orthanc"), str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        wait_for(lambda: _try(lambda: _get(base + "/dicom-web/studies")) is not None, 30, "Orthanc's DICOMweb plugin")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _study_instances(base: str, study_uid: str) -> list[str]:
    hits = _post(base + "/tools/lookup", study_uid)
    ids = [h["ID"] for h in hits if h["Type"] == "Study"]
    return [i["ID"] for i in _get(f"{base}/studies/{ids[0]}/instances")] if ids else []


def test_stow_in_to_the_node_and_results_by_stow_to_orthanc(orthanc, tiny_bundle, phantom_dir, tmp_path):
    node_port, http_port = free_port(), free_port()
    token, digest = new_token()
    spool = tmp_path / "var"
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nport = {node_port}\nmin_free_mb = 16\n[console]\nport = {http_port}\n'
        f'[destination]\ntype = "dicomweb"\nae_title = "ORTHANC"\nurl = "{orthanc}/dicom-web"\n'
        f'[paths]\nspool = "{spool}"\n[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n'
        f'[sender]\nattempts = 3\nbackoff_s = 1.0\n[worker]\nreconcile_every_s = 2\n'
        f'[[dicomweb.clients]]\nname = "VNA"\ntoken_sha256 = "{digest}"\n')
    src = min((phantom_dir / "images").glob("*.dcm"))
    source = pydicom.dcmread(src)
    DICOMwebClient(orthanc + "/dicom-web").store_instances([source])  # the study is in the PACS already
    log = tmp_path / "up.log"
    up = subprocess.Popen([sys.executable, "-m", "worker.cli", "up", "--config", str(config)],
                          stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_for(lambda: "console.started" in log.read_text() and "listening" in log.read_text(), 60,
                 "the node to listen")
        node = DICOMwebClient(f"http://127.0.0.1:{http_port}/dicomweb", headers={"Authorization": f"Bearer {token}"})
        t0 = time.monotonic()
        answer = node.store_instances([source], study_instance_uid=str(source.StudyInstanceUID))
        stow_s = time.monotonic() - t0
        assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [str(source.SOPInstanceUID)]
        node.store_instances([source])  # a second post of the same image: stored and skipped
        wait_for(lambda: len(_study_instances(orthanc, str(source.StudyInstanceUID))) >= 4, 180,
                 lambda: f"the SR, SC and GSPS in Orthanc's study; node log tail: {log.read_text()[-1500:]}")
        time.sleep(3)  # nothing more may come
        instances = _study_instances(orthanc, str(source.StudyInstanceUID))
        tags = [_get(f"{orthanc}/instances/{i}/simplified-tags") for i in instances]
        classes = sorted(t["SOPClassUID"] for t in tags)
        assert classes == sorted([str(source.SOPClassUID), SR_3D, SC, GSPS]), classes
        assert {t["StudyInstanceUID"] for t in tags} == {str(source.StudyInstanceUID)}
        status = subprocess.run([sys.executable, "-m", "worker.cli", "status", "--config", str(config)],
                                capture_output=True, text=True, cwd=REPO, check=False)
        status = json.loads(status.stdout.strip().splitlines()[-1])
        assert status["counts"] == {"done": 1, "skipped": 1}
        assert status["destinations"] == [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": int(orthanc.rsplit(":", 1)[1]),
                                           "reachable": True}]
        print(f"STOW-RS of one {source.Rows}x{source.Columns} image to the node: {stow_s:.2f} s")
    finally:
        stop_up(up, 15)
    events = [json.loads(line) for line in (spool / "audit.jsonl").read_text().splitlines()]
    [sent] = [e for e in events if e["event"] == "sent"]
    assert sent["destination"] == "ORTHANC"
