"""Shared fixtures: a tiny phantom-trained bundle, free ports, sample DICOM files, and the one
check for a peer program a test needs (``require_peer``)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

# Where each peer comes from, for the message that says how to get it (`make peers` installs them all).
PEER_PACKAGES = {
    "storescp": "dcmtk", "storescu": "dcmtk", "dcmp2pgm": "dcmtk", "dcmdump": "dcmtk", "dsrdump": "dcmtk",
    "dciodvfy": "dicom3tools", "Orthanc": "orthanc", "chromium": "chromium", "promtool": "prometheus",
    "prometheus": "prometheus", "openssl": "openssl", "redis-server": "redis-server",
    "libOrthancDicomWeb.so": "orthanc-dicomweb",
    "initdb": "postgresql-15", "pg_ctl": "postgresql-15",
}
# The PostgreSQL server tests make their databases on ([store] url tests); trust auth on 127.0.0.1.
PG_ADMIN = os.environ.get("MEDSAM2_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def require_peer(name: str) -> str:
    """The path of the peer program ``name`` (storescp, dciodvfy, Orthanc, promtool, ...).

    Without it the test is skipped on a developer's machine, but under ``CI=true`` (``.ci/run``)
    it fails: a CI run must not go green by skipping what it was meant to check. ``name`` may also
    be an absolute path (``/usr/bin/chromium``, or a plugin such as Orthanc's DICOMweb library)."""
    found = name if Path(name).is_absolute() and Path(name).exists() else shutil.which(name)
    if found is None:
        package = PEER_PACKAGES.get(Path(name).name, Path(name).name)
        message = f"{name} is not installed: `make peers` installs it (Debian package {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def issue_server_certificate(folder: Path, name: str) -> None:
    """A test CA (ca.crt, ca.key) and a server certificate for localhost/127.0.0.1 signed by it
    (<name>.crt, <name>.key) in ``folder``, made with the openssl command line."""
    openssl = require_peer("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key",
        "-out", "ca.crt", "-days", "2", "-subj", "/CN=ca", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
        "-out", f"{name}.csr", "-subj", "/CN=localhost")
    (folder / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                                        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")


def require_module(name: str):
    """Import the test-only module ``name`` (e.g. ``playwright.sync_api``); skip without it, fail under ``CI=true``."""
    if os.environ.get("CI") == "true":
        import importlib

        try:
            return importlib.import_module(name)
        except ImportError as e:
            pytest.fail(f"{name} is not importable ({e}): install the test extra (`pip install -e '.[test]'`)")
    return pytest.importorskip(name, reason=f"{name} is not installed: install the test extra")


def dciodvfy_errors(path: Path) -> list[str]:
    """The ``Error`` lines dciodvfy prints for the DICOM file ``path`` (empty: valid)."""
    run = subprocess.run([require_peer("dciodvfy"), str(path)], capture_output=True, timeout=60)
    text = (run.stdout + run.stderr).decode("latin-1")
    return [line for line in text.splitlines() if line.startswith("Error")]


def pytest_configure(config: pytest.Config) -> None:
    """The node's pynetdicom/pydicom switches and its JSON logs on stderr, set once as the
    `medsam2-cxr` command sets them (a test that reads the log lines sees what a collector sees,
    whichever test ran first)."""
    from dicom_node.config import configure
    from worker import logs

    configure()
    logs.configure()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def storescp(folder: Path, port: int, *flags: str) -> subprocess.Popen:
    """DCMTK's storescp as the PACS (AE title PACS), writing what it receives into ``folder``."""
    return subprocess.Popen([require_peer("storescp"), "-aet", "PACS", *flags, "-od", str(folder), str(port)],
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
    from model_training.default_bundle import build_default_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    build_default_bundle(out, n=60, seed=3, spec="tiny", render_size=256,
                         now=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    return out


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from phantoms import generate

    out = tmp_path_factory.mktemp("phantoms")
    generate(4, out, seed=11, size=512)
    return out


def require_postgres(admin: str = PG_ADMIN) -> str:
    """``admin`` when a PostgreSQL server answers there; else skipped, or failed under CI=true."""
    import psycopg

    try:
        psycopg.connect(admin, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        message = f"no PostgreSQL at {admin} ({exc}): `make peers` installs postgresql-15; or set MEDSAM2_TEST_PG"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return admin


@contextlib.contextmanager
def pg_database(admin: str) -> Iterator[str]:
    """A new database medsam2_test_<random> on the server of ``admin``, dropped afterwards; yields its URL."""
    import psycopg

    from dicom_node.postgres import close_pools

    name = f"medsam2_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(admin)._replace(path="/" + name))
    finally:
        close_pools()
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url() -> Iterator[str]:
    """The URL of a fresh database on the shared test server, dropped after the test."""
    with pg_database(require_postgres()) as url:
        yield url


class PgServer:
    """A PostgreSQL server of the test's own (Debian's initdb and pg_ctl, run as the postgres user
    when the tests run as root, on a free port) that the test may stop and start again. Its data
    lives in a folder of its own under /tmp (pytest's tmp_path is not readable by that user)."""

    def __init__(self) -> None:
        require_peer(str(PG_BIN / "initdb"))
        self.folder = Path(tempfile.mkdtemp(prefix="medsam2-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres")
        self.data, self.port = self.folder / "data", free_port()
        self._as_postgres(str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres", "-D", str(self.data))
        self.admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *args: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else list(args)
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.data}"
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-w", "-t", "60",
                          "-l", str(self.folder / "log"), "start")

    def stop(self) -> None:
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")


@pytest.fixture
def pg_server() -> Iterator[PgServer]:
    """A started test-owned PostgreSQL server, stopped and removed afterwards (see PgServer)."""
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        from dicom_node.postgres import close_pools

        close_pools()
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)
