"""The node on several hosts (tests/hosts.py namespaces): the services each on a host of their own,
a listener host, GPU-worker hosts and a sender host, nothing in common but the network.

- ``db``: PostgreSQL ([store] url), a server of the test's own (initdb as the postgres user).
- ``s3``: SeaweedFS's S3 gateway ([objects] url and endpoint).
- ``broker``: redis-server ([broker] url).
- ``pacs``: Orthanc, the destination; its Lua filter logs every C-STORE it receives.
- ``listen``: `medsam2-cxr listen` (with the reconciler) and `worker --queues io`; the only host
  given the model bundle: it publishes it to the object store, the GPU hosts fetch it from there.
- ``gpu1``, ``gpu2``: `worker --queues gpu`, each with a private scratch folder.
- ``sender``: DCMTK storescu, the modality.
The test process joins the switch as the administrator's workstation (.1) and reads the job table,
the audit copy and Orthanc over the network. Every host's spool is its own folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.uids import ResultUIDs
from tests.conftest import require_peer, wait_for
from tests.faults.harness import MODALITY, NODE_AET, RECEIVED_LUA, STORESCU, Sent, Source, _toml, parse_storescu
from tests.hosts import Host, Network

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_PORT, S3_PORT, REDIS_PORT, DICOM_PORT, PACS_DICOM, PACS_HTTP = 5432, 8333, 6379, 11112, 4242, 8042
S3_KEYS = {"AWS_ACCESS_KEY_ID": "medsam2-hosts", "AWS_SECRET_ACCESS_KEY": "medsam2-hosts-secret",
           "AWS_REGION": "us-east-1"}
BUCKET = "medsam2"
IN_FLIGHT = ("queued", "inferring", "inferred", "sending")


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def connects(host: str, port: int, timeout: float = 1.0) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


@dataclass
class Hosts:
    """The hosts, the services on them and the node's roles; ``figures`` the accounting."""

    folder: Path
    bundle: Path
    net: Network = field(init=False)
    hosts: dict[str, Host] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for peer in ("Orthanc", "redis-server", STORESCU, str(PG_BIN / "postgres")):
            require_peer(peer)
        self.weed = require_peer(str(Path(sys.executable).parent / "weed") if (Path(sys.executable).parent / "weed").exists()
                                 else "weed")
        self.net = Network(self.folder / "hosts")
        self.net.attach_controller()
        for name in ("db", "s3", "broker", "pacs", "listen", "listen2", "gpu1", "gpu2", "sender"):
            self.hosts[name] = self.net.host(name)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # -- services ------------------------------------------------------------------------------
    @property
    def pg_admin(self) -> str:
        return f"postgresql://postgres@{self['db'].ip}:{PG_PORT}/postgres"

    @property
    def store_url(self) -> str:
        return f"postgresql://postgres@{self['db'].ip}:{PG_PORT}/medsam2"

    def start_services(self) -> None:
        # The data folder under /tmp: the postgres user cannot enter pytest's tmp_path.
        self.pg_data = Path(tempfile.mkdtemp(prefix="medsam2-hosts-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.pg_data, "postgres")
        subprocess.run(_as_postgres([str(PG_BIN / "initdb"), "-A", "trust", "-U", "postgres", "-D",
                                     str(self.pg_data / "data")]), check=True, capture_output=True, timeout=120)
        with (self.pg_data / "data" / "pg_hba.conf").open("a") as hba:  # the hosts' network, as a site's LAN
            hba.write(f"host all all {self.net.subnet}.0/24 trust\n")
        self.start_postgres()
        import psycopg

        with psycopg.connect(self.pg_admin, autocommit=True) as c:
            c.execute("CREATE DATABASE medsam2")
        self.start_s3()
        self.start_redis()
        pacs = self["pacs"]
        (pacs.folder / "received.lua").write_text(RECEIVED_LUA)
        cfg = {"Name": "PACS", "DicomAet": "PACS", "DicomPort": PACS_DICOM, "HttpPort": PACS_HTTP,
               "StorageDirectory": str(pacs.folder / "db"), "IndexDirectory": str(pacs.folder / "db"),
               "RemoteAccessAllowed": True, "AuthenticationEnabled": False, "Plugins": [],
               "LuaScripts": [str(pacs.folder / "received.lua")], "DicomCheckCalledAet": False,
               "DicomAlwaysAllowStore": True, "StableAge": 3600}
        (pacs.folder / "orthanc.json").write_text(json.dumps(cfg))
        pacs.popen("orthanc", [require_peer("Orthanc"), str(pacs.folder / "orthanc.json")])
        wait_for(lambda: connects(pacs.ip, PACS_DICOM) and self._pacs("/system") is not None, 60, "Orthanc")

    def start_postgres(self) -> None:
        data = self.pg_data / "data"
        self["db"].popen("postgres", _as_postgres([str(PG_BIN / "postgres"), "-D", str(data), "-p", str(PG_PORT),
                                                   "-c", f"listen_addresses={self['db'].ip}",
                                                   "-c", f"unix_socket_directories={data}"]))
        wait_for(lambda: connects(self["db"].ip, PG_PORT), 60, "PostgreSQL on the db host")

    def stop_postgres(self) -> None:
        self["db"].stop("postgres", sig=signal.SIGINT)  # a fast shutdown: clients are disconnected

    def start_s3(self) -> None:
        s3 = self["s3"]
        ip = s3.ip
        s3.popen("weed", [self.weed, "server", "-s3", f"-dir={s3.folder / 'data'}", f"-ip={ip}", f"-ip.bind={ip}",
                          f"-s3.port={S3_PORT}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                          "-master.volumeSizeLimitMB=64", "-volume.max=8"], env=S3_KEYS, cwd=s3.folder)
        (s3.folder / "data").mkdir(exist_ok=True)
        client = self.s3_client()

        def ready() -> bool:
            from botocore.exceptions import BotoCoreError, ClientError

            try:
                if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key="ready/probe", Body=b"ok")
                client.delete_object(Bucket=BUCKET, Key="ready/probe")
                try:
                    client.get_object(Bucket=BUCKET, Key="ready/missing")
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") != "NoSuchKey":
                        raise
                return True
            except (BotoCoreError, ClientError):
                return False

        wait_for(ready, 120, "SeaweedFS's S3 gateway on the s3 host", step=1)

    def stop_s3(self) -> None:
        self["s3"].stop("weed", timeout=10)

    def s3_client(self):
        import boto3

        return boto3.client("s3", endpoint_url=f"http://{self['s3'].ip}:{S3_PORT}", region_name="us-east-1",
                            aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])

    def start_redis(self) -> None:
        b = self["broker"]
        b.popen("redis", [require_peer("redis-server"), "--port", str(REDIS_PORT), "--bind", b.ip, "--save", "",
                          "--appendonly", "no", "--protected-mode", "no", "--dir", str(b.folder)])
        wait_for(lambda: connects(b.ip, REDIS_PORT), 30, "redis on the broker host")

    def stop_redis(self) -> None:
        self["broker"].stop("redis")

    # -- the node's roles ----------------------------------------------------------------------
    def config(self, host: Host, **extra: dict) -> Path:
        sections: dict[str, dict] = {
            "node": {"host": host.ip, "port": DICOM_PORT, "min_free_mb": 1, "max_associations": 32,
                     "lookup_secret": "hosts-test-lookup-secret"},
            "destination": {"ae_title": "PACS", "host": self["pacs"].ip, "port": PACS_DICOM},
            "broker": {"url": f"redis://{self['broker'].ip}:{REDIS_PORT}/0"},
            "store": {"url": self.store_url},
            "objects": {"url": f"s3://{BUCKET}/node", "endpoint": f"http://{self['s3'].ip}:{S3_PORT}"},
            "paths": {"spool": str(host.folder / "spool")},
            "model": {"device": "cpu"},
            "sender": {"attempts": 14, "backoff_s": 1.0, "max_backoff_s": 8.0, "timeout_s": 10.0},
            "worker": {"lease_s": 8.0, "stale_after_s": 20.0, "reconcile_every_s": 2.0},
        }
        for section, values in extra.items():
            sections.setdefault(section, {}).update(values)
        path = host.folder / "node.toml"
        path.write_text(_toml(sections))
        return path

    def _node(self, host: Host, label: str, *args: str, cpu: int | None = None, **extra: dict) -> None:
        """A node command on the host; ``cpu``: pinned to that core (taskset), as a host of its own would be."""
        env = {**S3_KEYS, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        repo = Path(__file__).resolve().parents[2]
        pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
        host.popen(label, [*pin, sys.executable, "-m", "worker.cli", *args, "--config",
                           str(self.config(host, **extra))], env=env, cwd=repo)

    def start_listener(self, name: str = "listen", io: bool = True) -> None:
        """`listen` (with its reconciler) on the host, and an io worker beside it (``io``)."""
        host = self[name]
        self._node(host, "listen", "listen", model={"bundle": str(self.bundle)})
        wait_for(lambda: "medsam2-cxr listening" in host.log("listen") and connects(host.ip, DICOM_PORT), 120,
                 lambda: f"the listener on {name} (log: {host.log('listen')[-2000:]})")
        if io:
            self.start_io(name)

    def start_io(self, name: str = "listen") -> None:
        self._node(self[name], "io", "worker", "--queues", "io", model={"bundle": str(self.bundle)})

    def add_listener(self, name: str) -> None:
        """A second listener host for the same node (PACS failover), its own scratch, no io worker."""
        if "listen" not in self[name].procs:
            self.start_listener(name, io=False)

    def start_gpu(self, name: str, cpu: int | None = None) -> None:
        self._node(self[name], "gpu", "worker", "--queues", "gpu", cpu=cpu)

    # -- the modality --------------------------------------------------------------------------
    def send(self, files: list[Path], to: str = "listen", timeout: float = 600) -> Sent:
        r = self["sender"].run([STORESCU, "-v", "--no-halt", "-aet", MODALITY, "-aec", NODE_AET, self[to].ip,
                                str(DICOM_PORT), *map(str, files)], timeout=timeout, check=False)
        return parse_storescu(r.stdout + r.stderr, r.returncode)

    def send_until_stored(self, files: list[Path], deadline_s: float = 300) -> list[Sent]:
        """What a PACS does: send, and send again what was refused, until every file was taken."""
        left, rounds = list(files), []
        end = time.monotonic() + deadline_s
        while left and time.monotonic() < end:
            sent = self.send(left)
            rounds.append(sent)
            left = [f for f in left if f not in set(sent.ok)]
            if left:
                time.sleep(2)
        assert not left, f"{len(left)} instances still refused after {deadline_s:.0f} s: {rounds[-1]}"
        return rounds

    # -- state, read over the network ---------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        import psycopg

        try:
            with psycopg.connect(self.store_url, connect_timeout=3) as c:
                return dict(c.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())
        except psycopg.Error:
            return {}

    def wait_settled(self, expected_done: int, timeout: float) -> None:
        def settled() -> bool:
            c = self.counts()
            return bool(c) and sum(c.get(s, 0) for s in IN_FLIGHT) == 0 and c.get("done", 0) >= expected_done

        wait_for(settled, timeout, lambda: f"{expected_done} jobs done and none in flight (now {self.counts()})", step=2)

    def _pacs(self, path: str):
        try:
            with urllib.request.urlopen(f"http://{self['pacs'].ip}:{PACS_HTTP}{path}", timeout=10) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def audit(self, event: str) -> list[dict]:
        """The shared copy of every host's audit trail ([store] url), of one event."""
        import psycopg

        with psycopg.connect(self.store_url) as c:
            rows = c.execute("SELECT record FROM audit WHERE event=%s", [event]).fetchall()
        return [json.loads(r[0]) for r in rows]

    def inferred_on(self, name: str) -> list[float]:
        """When the host's GPU worker inferred each job (wall clock), from its own audit file."""
        f = self[name].folder / "spool" / "audit.jsonl"
        if not f.exists():
            return []
        records = (json.loads(line) for line in f.read_text().splitlines() if line.strip())
        return [r["time"] for r in records if r["event"] == "inferred"]

    def account(self, sources: list[Source], digest: str) -> dict[str, int]:
        """sent/delivered/lost/duplicates as tests/faults/harness.Node.account counts them, read from
        Orthanc and the shared audit copy."""
        stored = set(self._pacs("/instances") or [])
        uids_of = {}
        for i in stored:
            tags = self._pacs(f"/instances/{i}/simplified-tags") or {}
            uids_of[tags.get("SOPInstanceUID", i)] = i
        stored_uids = set(uids_of)
        known: set[str] = set()
        delivered = 0
        for src in sources:
            uids = ResultUIDs.for_source(src.study_instance_uid, src.sop_instance_uid, digest)
            every = (uids.sr_instance, uids.sc_instance, uids.pr_instance)
            known.update((*every, uids.text_instance, uids.ko_instance))
            if stored_uids.issuperset(every):
                delivered += 1
        ours = {s.sop_instance_uid for s in sources}
        sent = Counter(a["sop_instance_uid"] for a in self.audit("sent") if a.get("sop_instance_uid") in ours)
        duplicates = sum(n - 1 for n in sent.values() if n > 1)
        return {"sent": len(sources), "delivered": delivered, "lost": len(sources) - delivered,
                "duplicates": duplicates}

    def receptions(self) -> Counter:
        text = self["pacs"].log("orthanc")
        return Counter(re.findall(r"RECEIVED (\S+)", text))

    def close(self) -> None:
        self.net.close()
        if getattr(self, "pg_data", None):
            shutil.rmtree(self.pg_data, ignore_errors=True)
