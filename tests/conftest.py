"""Shared fixtures: a tiny phantom-trained bundle, free ports, sample DICOM files."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("torch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storescp(folder: Path, port: int, *flags: str) -> subprocess.Popen:
    """DCMTK's storescp as the PACS (AE title PACS), writing what it receives into ``folder``."""
    return subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", *flags, "-od", str(folder), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_up(up: subprocess.Popen, within_s: float) -> None:
    """SIGTERM to `medsam2-cxr up`; it must be gone within ``within_s`` (else killed, and the test fails)."""
    up.send_signal(signal.SIGTERM)
    try:
        up.wait(timeout=within_s)
    except subprocess.TimeoutExpired:
        up.kill()
        raise AssertionError(f"up did not stop within {within_s:g} s of SIGTERM") from None


def wait_for(pred: Callable[[], object], timeout: float, what: str | Callable[[], str], step: float = 0.5):
    """Poll ``pred`` until it is true; ``what`` (or what it returns, at the timeout) says for what."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what() if callable(what) else what}")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A real bundle: phantoms -> tiny Hiera encoder -> B5 head, trained in seconds."""
    from models.default_bundle import build_default_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    build_default_bundle(out, n=60, seed=3, spec="tiny", render_size=256,
                         now=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    return out


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from models.phantoms import generate

    out = tmp_path_factory.mktemp("phantoms")
    generate(4, out, seed=11, size=512)
    return out
