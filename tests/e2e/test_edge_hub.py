"""An island site served by a hub, with real parts: Orthanc as the island PACS (Lua autoroute on
stable study) routes to an edge node ([node] role = "edge", no model), which de-identifies each
image and forwards it over DICOM TLS to a hub node (`up` with the tiny bundle and a similar-cases
index); the hub's results come back over DICOM TLS, are re-identified at the edge and stored into
the island PACS, in the source's patient and study.

Checked: one SR, one SC, one text SR and one GSPS per source in Orthanc, dciodvfy-clean, with the
source's name (ISO 2022 IR 87), ID, birth date, accession and Study UID, referencing the source's
SOP Instance UID and carrying none of the pseudonyms the hub saw; no identifier of any source in
any file of the hub's spool, its log or its audit trail; and the hub stopped for
MEDSAM2_EDGE_LINK_DOWN_S seconds (default 60, as issue 12 asks) loses nothing.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.charset import convert_encodings, encode_string
from pydicom.uid import generate_uid

from tests.conftest import dciodvfy_errors, free_port, issue_server_certificate, require_peer
from tests.conftest import wait_for as _wait

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
LINK_DOWN_S = float(os.environ.get("MEDSAM2_EDGE_LINK_DOWN_S", "60"))
JIS = ["", "ISO 2022 IR 87"]
PATIENTS = [  # name (alphabetic=ideographic=phonetic), ID, birth date, accession
    ("Yamada^Taro=山田^太郎=やまだ^たろう", "JP-1001", "19500102", "ACC26-000101"),
    ("Hakata^Hanako=博多^花子=はかた^はなこ", "JP-1002", "19610401", "ACC26-000102"),
    ("Suzuki^Ichiro=鈴木^一郎=すずき^いちろう", "JP-1003", "19731224", "ACC26-000103"),
]
RESULT_KINDS = ["Basic Text SR Storage", "Comprehensive 3D SR Storage",
                "Grayscale Softcopy Presentation State Storage", "Secondary Capture Image Storage"]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _try(fn):
    try:
        return fn()
    except (OSError, http.client.HTTPException, ValueError):
        return None


def _japanese(phantom: Path, out: Path, patient: tuple[str, str, str, str]) -> Path:
    """A phantom as a Japanese hospital sends it: \\ISO 2022 IR 87, three name groups, a study of its own."""
    ds = pydicom.dcmread(phantom)
    ds.SpecificCharacterSet = JIS
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = patient
    ds.InstitutionName = "博多中央病院"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def _needles(sources: list[Path]) -> dict[str, bytes]:
    """Every identifier of the sources as the bytes a file could hold it in: ISO 2022 IR 87 as in
    the source, UTF-8, and JSON's \\uXXXX escapes; IDs, birth dates, accessions and UIDs as ASCII."""
    out: dict[str, bytes] = {}
    for src in sources:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        name = str(ds.PatientName)
        texts = {name, name.replace("^", " "), str(ds.InstitutionName)}
        for group in name.split("="):
            texts |= {group, *(c for c in group.split("^") if len(c) >= 2)}
        for t in texts:
            out[f"{t!r} (UTF-8)"] = t.encode()
            out[f"{t!r} (JSON)"] = json.dumps(t).strip('"').encode()
            if not t.isascii():
                out[f"{t!r} (ISO 2022 IR 87)"] = encode_string(t, convert_encodings(JIS))
        for kw in ("PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                   "SOPInstanceUID"):
            out[f"{kw} {ds.get(kw)}"] = str(ds.get(kw)).encode()
    return out


def _grep(root_files: list[Path], needles: dict[str, bytes]) -> list[str]:
    hits = []
    for f in root_files:
        data = f.read_bytes()
        hits += [f"{what} in {f}" for what, b in needles.items() if b in data]
    return hits


def _client_certificate(folder: Path, name: str) -> None:
    """<name>.crt/.key for TLS client authentication, signed by the test CA in ``folder``
    (issue_server_certificate made it): each side of the link proves who it is."""
    openssl = require_peer("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", f"/CN={name}")
    (folder / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                        "extendedKeyUsage=clientAuth\n")
    run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")


def _config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_island_edge_forwards_to_hub_and_stores_reidentified_results(tiny_bundle, phantom_dir, tmp_path):
    for tool in ("Orthanc", "/usr/bin/storescu", "dciodvfy", "openssl"):
        require_peer(tool)
    from index.build import build_index, manifest_items
    from models.bundle import load_bundle

    build_index(tmp_path / "index", load_bundle(tiny_bundle), manifest_items(phantom_dir), progress=False)
    pacs_dicom, pacs_http, edge_port, edge_return, hub_port = (free_port() for _ in range(5))
    certs = {name: tmp_path / name for name in ("hub_tls", "edge_tls")}
    for name, folder in certs.items():
        folder.mkdir()
        issue_server_certificate(folder, name.split("_")[0])
    _client_certificate(certs["hub_tls"], "edge-client")  # the hub trusts its own CA's clients only
    _client_certificate(certs["edge_tls"], "hub-client")  # and the edge its own
    hub_spool, edge_spool = tmp_path / "hub-spool", tmp_path / "edge-spool"
    hub_cfg = _config(tmp_path / "hub.toml", (
        f'[node]\nae_title = "HUB"\nport = {hub_port}\nmin_free_mb = 16\nallowed_calling_aets = ["EDGE"]\n'
        f'[node.tls]\ncert = "{certs["hub_tls"] / "hub.crt"}"\nkey = "{certs["hub_tls"] / "hub.key"}"\n'
        f'ca = "{certs["hub_tls"] / "ca.crt"}"\nrequire_client_cert = true\n'
        f'[destination]\nae_title = "NOWHERE"\nport = {free_port()}\n'
        f'[destination.routes.EDGE]\nae_title = "EDGE"\nhost = "127.0.0.1"\nport = {edge_return}\n'
        f'tls.ca = "{certs["edge_tls"] / "ca.crt"}"\ntls.cert = "{certs["edge_tls"] / "hub-client.crt"}"\n'
        f'tls.key = "{certs["edge_tls"] / "hub-client.key"}"\n'
        f'[paths]\nspool = "{hub_spool}"\n[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n'
        f'[index]\npath = "{tmp_path / "index"}"\n[console]\nport = 0\n'
        f'[sender]\nattempts = 3\nbackoff_s = 1.0\n[worker]\nreconcile_every_s = 2\nstale_after_s = 20\n'))
    edge_cfg = _config(tmp_path / "edge.toml", (
        f'[node]\nrole = "edge"\nae_title = "EDGE"\nport = {edge_port}\nmin_free_mb = 16\n'
        f'[destination]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {pacs_dicom}\n'
        f'[edge]\nport = {edge_return}\nretry_every_s = 2\n'
        '# the phantoms burn in a laterality marker and a device label, no identifier\n'
        'allow_burned_in_annotation = true\n'
        f'tls.cert = "{certs["edge_tls"] / "edge.crt"}"\ntls.key = "{certs["edge_tls"] / "edge.key"}"\n'
        f'tls.ca = "{certs["edge_tls"] / "ca.crt"}"\ntls.require_client_cert = true\n'
        f'[edge.hub]\nae_title = "HUB"\nhost = "127.0.0.1"\nport = {hub_port}\n'
        f'tls.ca = "{certs["hub_tls"] / "ca.crt"}"\ntls.cert = "{certs["hub_tls"] / "edge-client.crt"}"\n'
        f'tls.key = "{certs["hub_tls"] / "edge-client.key"}"\n'
        f'[paths]\nspool = "{edge_spool}"\n[console]\nport = 0\n'))
    (tmp_path / "autoroute.lua").write_text((REPO / "deploy" / "orthanc" / "autoroute.lua").read_text())
    (tmp_path / "orthanc.json").write_text(json.dumps({
        "Name": "ISLAND", "DicomAet": "PACS", "DicomPort": pacs_dicom, "HttpPort": pacs_http,
        "StorageDirectory": str(tmp_path / "orthanc-db"), "IndexDirectory": str(tmp_path / "orthanc-db"),
        "StableAge": 2, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
        "DicomModalities": {"medsam2": ["EDGE", "127.0.0.1", edge_port]},
        "LuaScripts": [str(tmp_path / "autoroute.lua")], "DicomCheckCalledAet": False}))
    base = f"http://127.0.0.1:{pacs_http}"
    exe = [sys.executable, "-m", "worker.cli", "up", "--config"]
    hub_log, edge_log = tmp_path / "hub.log", tmp_path / "edge.log"
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, cfg: Path, log: Path) -> None:
        procs[name] = subprocess.Popen(exe + [str(cfg)], stdout=log.open("a"), stderr=subprocess.STDOUT, cwd=REPO)

    def stop(name: str) -> None:
        p = procs.pop(name)
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    orthanc_log = (tmp_path / "orthanc.log").open("w")
    procs["orthanc"] = subprocess.Popen(["Orthanc", str(tmp_path / "orthanc.json")], stdout=orthanc_log,
                                        stderr=subprocess.STDOUT)
    start("hub", hub_cfg, hub_log)
    start("edge", edge_cfg, edge_log)
    phantoms = sorted((phantom_dir / "images").glob("*.dcm"))
    sources = [_japanese(phantoms[i], tmp_path / f"source{i}.dcm", p) for i, p in enumerate(PATIENTS)]

    def send(src: Path) -> None:
        out = subprocess.run(["/usr/bin/storescu", "-aec", "PACS", "127.0.0.1", str(pacs_dicom), str(src)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr

    def results(src: Path) -> list[dict] | None:
        ds = pydicom.dcmread(src, stop_before_pixels=True)
        found = _try(lambda: json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{base}/tools/find", data=json.dumps({"Level": "Instance", "Expand": True, "Query": {
                "StudyInstanceUID": ds.StudyInstanceUID}}).encode(), method="POST"), timeout=10).read()))
        if found is None:
            return None
        mine = [i for i in found if i["MainDicomTags"].get("SOPInstanceUID") != ds.SOPInstanceUID]
        return mine if len(mine) >= len(RESULT_KINDS) else None

    try:
        _wait(lambda: _try(lambda: _get(base + "/system")), 30, "Orthanc to start")
        _wait(lambda: "listening" in hub_log.read_text() and "edge listening" in edge_log.read_text(), 90,
              lambda: f"the hub and the edge to listen:\n{hub_log.read_text()[-2000:]}\n{edge_log.read_text()[-2000:]}")
        for port, aets in ((hub_port, ["-aet", "EDGE", "-aec", "HUB"]), (edge_return, ["-aet", "HUB", "-aec", "EDGE"])):
            plain = subprocess.run([require_peer("echoscu"), *aets, "127.0.0.1", str(port)], capture_output=True,
                                   timeout=60)
            assert plain.returncode != 0, f"port {port} answered plain DICOM: the link must be TLS"
        t0 = time.time()
        for src in sources[:2]:
            send(src)
        for src in sources[:2]:
            _wait(lambda src=src: results(src), 300, lambda: f"results in the island PACS; edge log:\n"
                  f"{edge_log.read_text()[-3000:]}", step=2)
        print(f"island PACS -> edge -> hub -> edge -> island PACS for 2 studies: {time.time() - t0:.1f} s")

        # The link down: the hub stopped while the island sends; nothing is lost when it is back.
        stop("hub")
        t_down = time.time()
        send(sources[2])
        time.sleep(LINK_DOWN_S)
        assert results(sources[2]) is None
        edge_jobs = subprocess.run([sys.executable, "-m", "worker.cli", "status", "--config", str(edge_cfg),
                                    "--echo-timeout", "0.5"], capture_output=True, text=True, cwd=REPO, timeout=60)
        counts = json.loads(edge_jobs.stdout)["counts"]
        # waiting (queued, or claimed by the pass trying the hub now), not failed, not dropped
        assert counts.get("failed", 0) == 0 and counts.get("queued", 0) + counts.get("inferring", 0) == 1, counts
        start("hub", hub_cfg, hub_log)
        _wait(lambda: results(sources[2]), 300, "the results of the study sent while the hub was down", step=2)
        print(f"link down {LINK_DOWN_S:.0f} s (hub stopped): results arrived {time.time() - t_down - LINK_DOWN_S:.1f} s "
              "after it came back; failed jobs at the edge: 0")

        time.sleep(6)  # Orthanc routes each study again once its results arrive: nothing more may come
        key = (edge_spool / "secrets" / "deid.key").read_text().strip()
        from dicom_node.deid import deidentify

        hub_jobs = (hub_spool / "jobs.sqlite").read_bytes()
        for src in sources:
            source = pydicom.dcmread(src)
            pseudo = deidentify(source, key, allow_burned_in_annotation=True)  # what the hub saw
            assert pseudo.SOPInstanceUID.encode() in hub_jobs
            found = results(src)
            assert found is not None
            kinds = []
            for inst in found:
                path = tmp_path / f"{inst['ID']}.dcm"
                path.write_bytes(urllib.request.urlopen(f"{base}/instances/{inst['ID']}/file", timeout=10).read())
                ds = pydicom.dcmread(path)
                kinds.append(ds.SOPClassUID.name)
                assert str(ds.PatientName) == str(source.PatientName)
                assert (ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber, ds.StudyInstanceUID) == (
                    source.PatientID, source.PatientBirthDate, source.AccessionNumber, source.StudyInstanceUID)
                assert "PatientIdentityRemoved" not in ds
                uids = {str(e.value) for e in ds.iterall() if e.VR == "UI" and e.VM == 1}
                if ds.SOPClassUID.name != "Basic Text SR Storage":
                    assert source.SOPInstanceUID in uids, f"{ds.SOPClassUID.name} does not reference the source image"
                raw = path.read_bytes() + str(ds).encode()
                for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                           "StudyDate", "AcquisitionDate", "StationName", "StudyInstanceUID", "SeriesInstanceUID",
                           "SOPInstanceUID"):
                    value = str(pseudo.get(kw) or "")
                    if value and value != str(source.get(kw) or ""):
                        assert value.encode() not in raw, f"the hub's pseudonymous {kw} in the {ds.SOPClassUID.name}"
                assert not dciodvfy_errors(path), f"dciodvfy on the {ds.SOPClassUID.name}"
            assert sorted(k for k in kinds if k != "Key Object Selection Document Storage") == RESULT_KINDS, kinds
    finally:
        for name in list(procs):
            stop(name)

    files = [f for f in hub_spool.rglob("*") if f.is_file()] + [hub_log]
    hits = _grep(files, _needles(sources))
    print(f"hub identifier grep: {len(hits)} hits in {len(files)} files (hub spool incl. jobs.sqlite, audit, "
          f"received instances and results; hub stdout/stderr)")
    assert not hits, hits[:20]
    edge_files = [f for f in edge_spool.rglob("*") if f.is_file() and f.suffix == ".dcm"]
    assert len(_grep(edge_files, _needles(sources))) > len(sources) * 5, "the grep finds the identifiers where they are"
    events = [json.loads(line)["event"] for line in (edge_spool / "audit.jsonl").read_text().splitlines()]
    assert events.count("exported") == len(sources) and events.count("sent") >= len(sources) * len(RESULT_KINDS)
