"""DICOM TLS (PS3.15 BCP 195 profile): DCMTK storescu +tls against the listener, and the sender
against DCMTK storescp +tls. A test CA, server, client and rogue certificates are made with the
openssl command line for each test session."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.audit import AuditLog
from dicom_node.jobstore import JobState, JobStore
from dicom_node.listener import start_listener
from dicom_node.sender import DeliveryFailed, Destination, send
from dicom_node.spool import Spool
from dicom_node.tls import client_context, server_context
from tests.conftest import free_port, require_peer
from worker.node import Node
from worker.settings import Settings

pytestmark = pytest.mark.integration
STORESCU, STORESCP = "/usr/bin/storescu", "/usr/bin/storescp"
SCU = "MODALITY1"


def _openssl(*args: str, cwd: Path) -> None:
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)}: {r.stderr}")


def _issue(folder: Path, name: str, ca: str, cn: str, server: bool) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=folder)
    ext = folder / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   + ("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" if server
                      else "extendedKeyUsage=clientAuth\n"))
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name, cwd=folder)


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca, server (localhost/127.0.0.1), client; rogue-ca and a client it signed."""
    require_peer("openssl")
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _issue(d, "server", "ca", "localhost", server=True)
    _issue(d, "client", "ca", "MODALITY1", server=False)
    _ca(d, "rogue-ca")
    _issue(d, "rogue", "rogue-ca", "MODALITY1", server=False)
    return d


def _image(path: Path) -> Path:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "TLS^TINA", "PID-TLS-1"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = np.arange(64 * 64, dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def tls_node(tmp_path, pki):
    servers = []

    def start(require_client_cert: bool):
        port = free_port()
        spool = Spool(tmp_path / f"spool{port}")
        jobs, audit = JobStore(spool.root / "jobs.sqlite"), AuditLog(spool.root / "audit.jsonl")
        ctx = server_context(pki / "server.crt", pki / "server.key", pki / "ca.crt", require_client_cert)
        cfg = Node(Settings()).listener_config(host="127.0.0.1", port=port, tls=ctx, network_timeout=10)
        servers.append(start_listener(cfg, spool, jobs, audit, lambda job_id: None))
        return port, jobs, audit

    yield start
    for s in servers:
        s.shutdown()


def _storescu(port: int, f: Path, *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run([STORESCU, "-v", "-aet", SCU, "-aec", "MEDSAM2CXR", *tls, "127.0.0.1", str(port), str(f)],
                          capture_output=True, text=True, errors="replace", timeout=30)


def _stored(jobs: JobStore) -> int:
    return len(jobs.by_state(JobState.QUEUED))


def test_storescu_tls_with_and_without_client_certificate(tls_node, pki, tmp_path):
    port, jobs, audit = tls_node(require_client_cert=False)
    f = _image(tmp_path / "a.dcm")
    with_cert = _storescu(port, f, "+tls", str(pki / "client.key"), str(pki / "client.crt"), "+cf", str(pki / "ca.crt"))
    assert with_cert.returncode == 0, with_cert.stdout + with_cert.stderr
    anonymous = _storescu(port, _image(tmp_path / "b.dcm"), "+tla", "+cf", str(pki / "ca.crt"))
    assert anonymous.returncode == 0, anonymous.stdout + anonymous.stderr
    assert _stored(jobs) == 2
    # A client certificate from another CA is checked and refused even when certificates are optional.
    rogue = _storescu(port, _image(tmp_path / "c.dcm"), "+tls", str(pki / "rogue.key"), str(pki / "rogue.crt"),
                      "+cf", str(pki / "ca.crt"))
    assert rogue.returncode != 0 and _stored(jobs) == 2
    # Plain DICOM to the TLS port: refused; the node keeps serving TLS.
    plain = _storescu(port, _image(tmp_path / "d.dcm"))
    assert plain.returncode != 0
    again = _storescu(port, _image(tmp_path / "e.dcm"), "+tls", str(pki / "client.key"), str(pki / "client.crt"),
                      "+cf", str(pki / "ca.crt"))
    assert again.returncode == 0 and _stored(jobs) == 3
    refused = [a for a in audit.read() if a["event"] == "refused"]
    assert len(refused) == 2 and all(a["reason"].startswith("TLS handshake failed") for a in refused)
    print("[tls] storescu +tls (BCP 195 non-downgrading, client cert optional): client cert ok, anonymous ok, "
          f"rogue CA refused, plain DICOM refused: {[a['reason'] for a in refused]}")


def test_storescu_tls_client_certificate_required(tls_node, pki, tmp_path):
    port, jobs, audit = tls_node(require_client_cert=True)
    ok = _storescu(port, _image(tmp_path / "a.dcm"), "+tls", str(pki / "client.key"), str(pki / "client.crt"),
                   "+cf", str(pki / "ca.crt"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    anonymous = _storescu(port, _image(tmp_path / "b.dcm"), "+tla", "+cf", str(pki / "ca.crt"))
    assert anonymous.returncode != 0
    assert _stored(jobs) == 1
    [refused] = [a for a in audit.read() if a["event"] == "refused"]
    assert refused["reason"].startswith("TLS handshake failed") and refused["dicom_event"] == "Security Alert"
    print(f"[tls] client certificate required: with cert ok, anonymous refused ({refused['reason']})")


def test_tls_below_1_2_refused(tls_node, pki):
    port, _, audit = tls_node(require_client_cert=False)
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, OSError)):
            with old.wrap_socket(raw, server_hostname="localhost") as s:
                s.recv(1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not [a for a in audit.read() if a["event"] == "refused"]:
        time.sleep(0.1)
    [refused] = [a for a in audit.read() if a["event"] == "refused"]
    assert refused["reason"].startswith("TLS handshake failed")
    # And a TLS 1.2+ client negotiates at least 1.2.
    good = client_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            good.wrap_socket(raw, server_hostname="localhost") as s:
        version = s.version()
    assert version in ("TLSv1.2", "TLSv1.3")
    print(f"[tls] TLS 1.1 client refused ({refused['reason']}); a modern client got {version}")


@pytest.fixture
def storescp_tls(tmp_path, pki):
    procs = []

    def start(*options: str) -> tuple[int, Path]:
        port, out = free_port(), tmp_path / f"pacs{len(procs)}"
        out.mkdir()
        proc = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(out), "+tls", str(pki / "server.key"),
                                 str(pki / "server.crt"), "+cf", str(pki / "ca.crt"), *options, str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return port, out
            time.sleep(0.05)
        raise TimeoutError("storescp +tls did not start")

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def test_sender_to_storescp_tls(storescp_tls, pki, tmp_path):
    port, out = storescp_tls()  # DCMTK default: BCP 195 non-downgrading, client certificate required
    f = _image(tmp_path / "r.dcm")
    ctx = client_context(pki / "ca.crt", pki / "client.crt", pki / "client.key")
    send([f], Destination("PACS", "127.0.0.1", port, tls=ctx), timeout=10)
    assert len(list(out.iterdir())) == 1
    # The PACS is not who it says it is (its certificate does not chain to our CA): nothing is sent.
    wrong = client_context(pki / "rogue-ca.crt", pki / "client.crt", pki / "client.key")
    with pytest.raises(DeliveryFailed, match="association"):
        send([_image(tmp_path / "s.dcm")], Destination("PACS", "127.0.0.1", port, tls=wrong), timeout=10)
    # No client certificate while the PACS requires one: refused.
    anon = client_context(pki / "ca.crt")
    with pytest.raises(DeliveryFailed, match="association"):
        send([_image(tmp_path / "t.dcm")], Destination("PACS", "127.0.0.1", port, tls=anon), timeout=10)
    assert len(list(out.iterdir())) == 1
    print("[tls] sender -> storescp +tls: delivered with client cert; wrong CA and no client cert refused")


def test_server_context_needs_ca_for_required_client_cert(pki):
    with pytest.raises(ValueError, match="require_client_cert needs tls.ca"):
        server_context(pki / "server.crt", pki / "server.key", None, True)
    with pytest.raises(FileNotFoundError, match="missing.crt"):
        server_context(pki / "missing.crt", pki / "server.key")
    ctx = server_context(pki / "server.crt", pki / "server.key")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert json.dumps(sorted(c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"))
    assert all("GCM" in c["name"] or "CHACHA20" in c["name"] for c in ctx.get_ciphers())
