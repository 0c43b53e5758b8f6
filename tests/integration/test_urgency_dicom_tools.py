"""Urgent studies as DICOM's own tools and a real SCP see them: the KOS passes dciodvfy, and an
urgent delivery's C-STORE-RQ carries Priority HIGH."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pydicom
from pynetdicom import AE, evt

from dicom_node.encoders.ko import encode_ko
from dicom_node.sender import Destination, Priority, send
from dicom_node.uids import ResultUIDs, results_key
from models.prediction import NOT_VALIDATED
from models.urgency import assess
from tests.conftest import free_port, require_peer
from tests.unit.test_urgency import MODEL, NOW, _prediction, phantom  # noqa: F401  (phantom: a fixture)


def test_the_kos_of_an_urgent_study_passes_dciodvfy(phantom: Path, tmp_path: Path) -> None:  # noqa: F811
    source = pydicom.dcmread(phantom)
    uids = ResultUIDs.for_source(source.StudyInstanceUID, source.SOPInstanceUID, results_key(MODEL))
    ko = encode_ko(source, assess(_prediction({"Pneumothorax": (0.95, NOT_VALIDATED)})), MODEL, uids, NOW)
    ko.save_as(tmp_path / "ko.dcm", enforce_file_format=True)
    out = subprocess.run([require_peer("dciodvfy"), str(tmp_path / "ko.dcm")], capture_output=True, text=True,
                         check=False, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_the_scp_receives_priority_high(phantom: Path, tmp_path: Path) -> None:  # noqa: F811
    """C-STORE-RQ Priority (0000,0700) as a real SCP reads it: HIGH (1) for an urgent delivery."""
    seen: list[int] = []

    def on_store(event) -> int:
        seen.append(int(event.request.Priority))
        return 0x0000

    scp = AE(ae_title="PACS")
    ds = pydicom.dcmread(phantom)
    scp.add_supported_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID), "1.2.840.10008.1.2.1"])
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        dest = Destination("PACS", "127.0.0.1", port)
        send([phantom], dataclasses.replace(dest, priority=Priority.HIGH), timeout=10)
        send([phantom], dest, timeout=10)
    finally:
        server.shutdown()
    assert seen == [Priority.HIGH, Priority.MEDIUM] == [1, 0]
