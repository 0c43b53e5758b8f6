"""Shared fixtures: a tiny phantom-trained bundle, free ports, sample DICOM files."""

from __future__ import annotations

import socket
import datetime as dt
from pathlib import Path

import pytest

pytest.importorskip("torch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
