"""The sender against DCMTK's storescp and small pynetdicom SCPs over real sockets."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

from dicom_node.sender import DeliveryFailed, Destination, send, send_with_retry
from tests.conftest import free_port

pytestmark = pytest.mark.integration

STORESCP = "/usr/bin/storescp"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def wait_listening(port: int, proc: subprocess.Popen | None = None, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"storescp exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def make_result(path: Path, sop_class: str = SECONDARY_CAPTURE) -> Path:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Manufacturer = "medsam2-cxr"
    ds.SeriesDescription = "AI saliency"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(64 * 64, dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def storescp(tmp_path):
    """DCMTK storescp writing into a folder; yields (Destination, folder)."""
    procs = []

    def start(*options: str, port: int | None = None) -> tuple[Destination, Path]:
        out = tmp_path / f"pacs{len(procs)}"
        out.mkdir()
        port = port or free_port()
        proc = subprocess.Popen([STORESCP, "-aet", "PACS", "-od", str(out), *options, str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(proc)
        wait_listening(port, proc)
        return Destination("PACS", "127.0.0.1", port), out

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def pynetdicom_scp():
    """A pynetdicom Storage SCP answering a chosen status; yields a starter."""
    servers = []

    def start(status: int, require_calling_aet: list[str] | None = None
              ) -> tuple[Destination, list[str]]:
        received: list[str] = []

        def handle(event):
            received.append(event.request.AffectedSOPInstanceUID)
            return status

        ae = AE(ae_title="PACS")
        ae.add_supported_context(SECONDARY_CAPTURE, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        if require_calling_aet:
            ae.require_calling_aet = require_calling_aet
        port = free_port()
        servers.append(ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, handle)]))
        return Destination("PACS", "127.0.0.1", port), received

    yield start
    for server in servers:
        server.shutdown()


def _arrived(folder: Path) -> dict[str, Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in map(pydicom.dcmread, folder.iterdir())}


def test_send_to_storescp(storescp, tmp_path):
    dest, folder = storescp()
    files = [make_result(tmp_path / "sc1.dcm"), make_result(tmp_path / "sc2.dcm")]
    send(files, dest, calling_ae="MEDSAM2CXR", timeout=10)
    arrived = _arrived(folder)
    for f in files:
        sent = pydicom.dcmread(f)
        assert arrived[sent.SOPInstanceUID].PixelData == sent.PixelData


def test_streamed_as_stored_or_converted_for_a_peer_that_needs_it(storescp, tmp_path):
    """A peer that accepts the file's own syntax gets it streamed as stored; one that accepts
    only implicit VR gets it converted, same pixels either way."""
    src = make_result(tmp_path / "sc.dcm")
    sent = pydicom.dcmread(src)
    for option, syntax in (("+xe", ExplicitVRLittleEndian), ("+xi", "1.2.840.10008.1.2")):
        dest, folder = storescp(option)
        send([src], dest, timeout=10)
        [arrived] = _arrived(folder).values()
        assert arrived.file_meta.TransferSyntaxUID == syntax
        assert arrived.PixelData == sent.PixelData and arrived.SOPInstanceUID == sent.SOPInstanceUID


def test_send_compressed_keeps_its_transfer_syntax(storescp):
    dest, folder = storescp("+xa")  # accept JPEG 2000 as well
    src = Path(get_testdata_file("RG1_J2KR.dcm"))
    send([src], dest, timeout=10)
    [arrived] = _arrived(folder).values()
    assert arrived.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert arrived.PixelData == pydicom.dcmread(src).PixelData


def test_compressed_is_decompressed_for_an_uncompressed_only_peer(storescp):
    dest, folder = storescp()  # uncompressed only
    src = Path(get_testdata_file("RG1_J2KR.dcm"))  # JPEG 2000 lossless
    send([src], dest, timeout=10)
    [arrived] = _arrived(folder).values()
    assert not arrived.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(arrived.pixel_array, pydicom.dcmread(src).pixel_array)


def test_failure_status_raises(pynetdicom_scp, tmp_path):
    dest, _ = pynetdicom_scp(0xA700)
    f = make_result(tmp_path / "sc.dcm")
    with pytest.raises(DeliveryFailed, match=r"sc\.dcm: status 0xA700") as err:
        send([f], dest, timeout=10)
    assert str(dest) in str(err.value)


@pytest.mark.parametrize("warning", [0xB000, 0xB006, 0xB007])
def test_warning_status_counts_as_stored(pynetdicom_scp, tmp_path, warning):
    dest, received = pynetdicom_scp(warning)
    files = [make_result(tmp_path / "a.dcm"), make_result(tmp_path / "b.dcm")]
    send(files, dest, timeout=10)
    assert len(received) == 2


def test_association_rejected(pynetdicom_scp, tmp_path):
    dest, received = pynetdicom_scp(0x0000, require_calling_aet=["SOMEONE"])
    with pytest.raises(DeliveryFailed, match="association rejected"):
        send([make_result(tmp_path / "sc.dcm")], dest, timeout=10)
    assert received == []


def test_closed_port_retries_with_backoff(tmp_path):
    dest = Destination("PACS", "127.0.0.1", free_port())  # nothing listens there
    sleeps: list[float] = []
    f = make_result(tmp_path / "sc.dcm")
    with pytest.raises(DeliveryFailed, match=r"PACS@127\.0\.0\.1"):
        send_with_retry([f], dest, attempts=5, backoff_s=1.0, max_backoff_s=5.0,
                        sleep=sleeps.append, timeout=5)
    assert sleeps == [1.0, 2.0, 4.0, 5.0]


def test_retry_succeeds_once_destination_is_back(storescp, tmp_path):
    port = free_port()
    sleeps: list[float] = []
    started: list[Path] = []
    f = make_result(tmp_path / "sc.dcm")

    def sleep_then_start_pacs(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:  # the PACS comes back during the second wait
            started.append(storescp(port=port)[1])

    send_with_retry([f], Destination("PACS", "127.0.0.1", port), attempts=5, backoff_s=0.5,
                    sleep=sleep_then_start_pacs, timeout=5)
    assert sleeps == [0.5, 1.0]
    assert len(list(started[0].iterdir())) == 1
