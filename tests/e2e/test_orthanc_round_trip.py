"""End to end with real parts: Orthanc as the PACS (Lua autoroute on stable study), DCMTK
storescu as the modality, the node's listener and two Celery workers as separate processes on
the Redis broker, with a similar cases index configured. The SR, the SC and the Basic Text SR with
the draft report must come back into the same study and pass dciodvfy."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
import redis
from pydicom.data import get_testdata_file

from tests.conftest import free_port, require_peer
from tests.conftest import wait_for as _wait

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
REDIS_DB = 7


def _need(*tools: str) -> None:
    for t in tools:
        require_peer(t)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture
def orthanc(tmp_path):
    _need("Orthanc")
    dicom_port, http_port, node_port = free_port(), free_port(), free_port()
    lua = (REPO / "deploy" / "orthanc" / "autoroute.lua").read_text()
    (tmp_path / "autoroute.lua").write_text(lua)
    cfg = {
        "Name": "PACS", "DicomAet": "PACS", "DicomPort": dicom_port, "HttpPort": http_port,
        "StorageDirectory": str(tmp_path / "orthanc-db"), "IndexDirectory": str(tmp_path / "orthanc-db"),
        "StableAge": 2, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
        "DicomModalities": {"medsam2": ["MEDSAM2CXR", "127.0.0.1", node_port]},
        "LuaScripts": [str(tmp_path / "autoroute.lua")], "DicomCheckCalledAet": False,
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(cfg))
    log = (tmp_path / "orthanc.log").open("w")
    proc = subprocess.Popen(["Orthanc", str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{http_port}"
    try:
        _wait(lambda: _try(lambda: _get(base + "/system")), 30, "Orthanc to start")
        yield {"dicom_port": dicom_port, "base": base, "node_port": node_port}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _try(fn):
    """fn() or None while Orthanc starts: refused or reset connections (OSError), a cut-off answer
    (http.client.HTTPException), a half-written body (ValueError)."""
    try:
        return fn()
    except (OSError, http.client.HTTPException, ValueError):
        return None


def test_storescu_to_orthanc_to_node_and_back(orthanc, tiny_bundle, phantom_dir, tmp_path):
    _need("/usr/bin/storescu", "dciodvfy")
    r = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    try:
        r.ping()
    except redis.ConnectionError:
        pytest.fail("Redis is not running on 127.0.0.1:6379: run `make peers`")
    r.flushdb()
    from index.build import build_index, manifest_items
    from models.bundle import load_bundle

    build_index(tmp_path / "index", load_bundle(tiny_bundle), manifest_items(phantom_dir), progress=False)
    spool = tmp_path / "spool"
    config = tmp_path / "node.toml"
    config.write_text(
        f'[node]\nport = {orthanc["node_port"]}\nmin_free_mb = 16\n'
        f'[destination]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {orthanc["dicom_port"]}\n'
        f'[broker]\nurl = "redis://127.0.0.1:6379/{REDIS_DB}"\n[paths]\nspool = "{spool}"\n'
        f'[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n'
        f'[sender]\nattempts = 3\nbackoff_s = 1.0\n[worker]\nreconcile_every_s = 2\nstale_after_s = 20\n'
        f'[index]\npath = "{tmp_path / "index"}"\n'
    )
    exe = [sys.executable, "-m", "worker.cli"]
    logs = {name: (tmp_path / f"{name}.log") for name in ("listen", "gpu", "io")}
    procs = [
        subprocess.Popen(exe + ["listen", "--config", str(config)], stdout=logs["listen"].open("w"), stderr=subprocess.STDOUT, cwd=REPO),
        subprocess.Popen(exe + ["worker", "--queues", "gpu", "--config", str(config)], stdout=logs["gpu"].open("w"), stderr=subprocess.STDOUT, cwd=REPO),
        subprocess.Popen(exe + ["worker", "--queues", "io", "--config", str(config)], stdout=logs["io"].open("w"), stderr=subprocess.STDOUT, cwd=REPO),
    ]
    try:
        _wait(lambda: "listening" in logs["listen"].read_text(), 60, "the node to listen")
        phantoms = sorted((phantom_dir / "images").glob("*.dcm"))
        sources = [phantoms[0], Path(get_testdata_file("RG1_J2KR.dcm")), _japanese(phantoms[1], tmp_path / "jp.dcm")]
        t0 = time.time()
        for src in sources:  # one association per file: each its own study
            out = subprocess.run(["/usr/bin/storescu", "-xv", "-aec", "PACS", "127.0.0.1", str(orthanc["dicom_port"]), str(src)],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr

        def results():
            found = {}
            for src in sources:
                ds = pydicom.dcmread(src, stop_before_pixels=True)
                hits = _get(orthanc["base"] + "/instances?expand")
                mine = [i for i in hits if i["MainDicomTags"].get("SOPInstanceUID") != ds.SOPInstanceUID
                        and _study_uid(orthanc["base"], i) == ds.StudyInstanceUID]
                if len(mine) < 4:  # SR, SC, text SR, GSPS (and a KOS when urgent)
                    return None
                found[src.name] = mine
            return found

        found = _wait(results, 240, "the SR, SC, text SR and GSPS in Orthanc", step=2)
        elapsed = time.time() - t0
        time.sleep(2)  # a KOS is the last object of its association
        found = results()
        per_source: dict[str, int] = {}
        print(f"storescu -> SR+SC+text SR in Orthanc for {len(sources)} studies: {elapsed:.1f} s")
        for src in sources:
            source = pydicom.dcmread(src, stop_before_pixels=True)
            kinds = []
            for inst in found[src.name]:
                data = urllib.request.urlopen(f"{orthanc['base']}/instances/{inst['ID']}/file", timeout=10).read()
                path = tmp_path / f"{inst['ID']}.dcm"
                path.write_bytes(data)
                ds = pydicom.dcmread(path)
                assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
                assert str(ds.PatientName) == str(source.PatientName)  # every component group, decoded alike
                assert ds.get("InstitutionName") == source.get("InstitutionName")
                assert ds.SeriesInstanceUID != source.SeriesInstanceUID
                kinds.append(ds.SOPClassUID.name)
                v = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
                errors = [line for line in (v.stdout + v.stderr).splitlines() if line.startswith("Error")]
                assert not errors, f"dciodvfy on the {ds.Modality} for {src.name}: {errors}"
            per_source[src.name] = len(kinds)
            assert sorted(k for k in kinds if k != "Key Object Selection Document Storage") == [
                "Basic Text SR Storage", "Comprehensive 3D SR Storage", "Grayscale Softcopy Presentation State Storage",
                "Secondary Capture Image Storage"], kinds  # and a KOS when the study is urgent (models.urgency)
        # Exactly one of each per source, even though Orthanc routes the study again once
        # the results arrive (the node sees its own results and the resent source, and skips both).
        time.sleep(6)
        for src in sources:
            assert len(results()[src.name]) == per_source[src.name]
        # No patient identifier in any log line or audit record of the run.
        names = set()
        for src in sources:
            ds = pydicom.dcmread(src, stop_before_pixels=True)
            names |= {str(ds.PatientName), ds.PatientID, str(ds.PatientName).replace("^", " "), ds.get("PatientBirthDate", "")}
            names |= {part for group in str(ds.PatientName).split("=")[1:] for part in [group, *group.split("^")]}
        names.discard("")
        text = "".join(p.read_text() for p in logs.values()) + (spool / "audit.jsonl").read_text()
        text += text.encode().decode("unicode_escape", errors="ignore")  # JSON may escape kanji as \uXXXX
        leaked = [n for n in names if n in text]
        assert not leaked, f"patient identifiers in logs: {leaked}"
        audit = [json.loads(line) for line in (spool / "audit.jsonl").read_text().splitlines()]
        assert sum(a["event"] == "sent" for a in audit) == len(sources)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        r.flushdb()


def _japanese(phantom: Path, out: Path) -> Path:
    """A phantom as a Japanese hospital sends it: \\ISO 2022 IR 87, three name groups, an ACR-NEMA
    date, in a study of its own."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(phantom)
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Hakata^Hanako=博多^花子=はかた^はなこ"
    ds.InstitutionName = "博多中央病院"
    ds.PatientBirthDate = "1961.04.01"
    ds.PatientID = "JP-0001"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


_STUDY_CACHE: dict[str, str] = {}


def _study_uid(base: str, inst: dict) -> str:
    series = inst["ParentSeries"]
    if series not in _STUDY_CACHE:
        s = _get(f"{base}/series/{series}")
        _STUDY_CACHE[series] = _get(f"{base}/studies/{s['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"]
    return _STUDY_CACHE[series]
