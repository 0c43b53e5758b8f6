"""dicom_node.config: importing the node changes no process-wide switch; configure() sets them all."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = r"""
import json, logging, sys
from pynetdicom import _config
from pydicom.pixels.decoders import JPEG2000Decoder

def state():
    return {"pynetdicom": {k: getattr(_config, k) for k in ("LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS",
                                                           "STORE_RECV_CHUNKED_DATASET", "STORE_SEND_CHUNKED_DATASET")},
            "pydicom_log": [logging.getLogger("pydicom").propagate, len(logging.getLogger("pydicom").handlers)],
            "jpeg2000": list(JPEG2000Decoder._available)}  # in the order pydicom tries them

before = state()
import dicom_node.config, dicom_node.listener, dicom_node.sender, dicom_node.inspect, dicom_node.filters
import dicom_node.encoders.sr, dicom_node.encoders.sc, dicom_node.encoders.text, models.preprocess, worker.pipeline
imported = state()
from dicom_node.config import NotConfigured, configure, require_configured
try:
    require_configured()
    refused = None
except NotConfigured as exc:
    refused = str(exc)
configure()
configured = state()
configure()
require_configured()
print(json.dumps({"before": before, "imported": imported, "refused": refused, "configured": configured,
                  "again": state()}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_node_changes_no_switch(probe: dict) -> None:
    assert probe["imported"] == probe["before"]


def test_the_listener_refuses_to_start_unconfigured_and_names_the_switch(probe: dict) -> None:
    assert "STORE_RECV_CHUNKED_DATASET" in probe["refused"] and "configure()" in probe["refused"]


def test_configure_sets_every_switch_once(probe: dict) -> None:
    got = probe["configured"]
    assert got["pynetdicom"] == {"LOG_REQUEST_IDENTIFIERS": False, "LOG_RESPONSE_IDENTIFIERS": False,
                                 "STORE_RECV_CHUNKED_DATASET": True, "STORE_SEND_CHUNKED_DATASET": True}
    assert got["pydicom_log"] == [False, probe["before"]["pydicom_log"][1] + 1]
    if {"gdcm", "pylibjpeg"} <= set(got["jpeg2000"]):
        assert got["jpeg2000"].index("pylibjpeg") < got["jpeg2000"].index("gdcm")
    assert probe["again"] == got  # idempotent
