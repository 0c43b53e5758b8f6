"""The fault-injection rig: real processes the tests break on purpose.

A private redis-server (or a private vhost on the machine's RabbitMQ), Orthanc as the destination PACS (a Lua filter logs every C-STORE it
receives, so a second delivery of the same result is counted even though Orthanc keeps one
copy), the node's listener and Celery workers as `python -m worker.cli` processes, and DCMTK
storescu as the modality. :meth:`Rig.account` turns the job store, the audit trail and Orthanc
into the figure line ``sent=N delivered=N lost=0 duplicates=0``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from dicom_node.jobstore import JobState, JobStore
from dicom_node.uids import ResultUIDs
from tests.conftest import free_port, require_peer, wait_for  # noqa: F401  (re-exported to the fault tests)

REPO = Path(__file__).resolve().parents[2]
STORESCU = "/usr/bin/storescu"
MODALITY = "MODALITY1"
NODE_AET = "MEDSAM2CXR"
IN_FLIGHT = (JobState.QUEUED, JobState.INFERRING, JobState.INFERRED, JobState.SENDING)
RECEIVED_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  print('RECEIVED ' .. dicom.SOPInstanceUID)
  return true
end
"""


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Source:
    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    patient_name: str
    patient_id: str
    birth_date: str


def read_sources(folder: Path) -> list[Source]:
    out = []
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append(Source(f, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.PatientName),
                          str(ds.PatientID), str(ds.get("PatientBirthDate", ""))))
    return out


class Redis:
    """A private redis-server that keeps nothing on disk, like the machine's own."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.folder / "redis.log").open("a")
        self.proc = subprocess.Popen([require_peer("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no", "--dir", str(self.folder)],
                                     stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.port), 20, "redis-server to listen")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


class RabbitMQ:
    """A private vhost on the machine's RabbitMQ (127.0.0.1:5672, guest/guest); a restart is
    rabbitmqctl stop_app / start_app of that node: its quorum queues and persistent messages are on
    disk and come back. stop() deletes the vhost and leaves RabbitMQ running."""

    def __init__(self, folder: Path) -> None:
        self.vhost = f"medsam2-test-{os.getpid()}-{free_port()}"
        self.folder = folder
        self.ctl = require_peer("rabbitmqctl")
        self.created = False

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:5672/{self.vhost}"

    def _ctl(self, *args: str) -> str:
        r = subprocess.run([self.ctl, *args], capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}; "
                               f"is rabbitmq-server running on this host (service rabbitmq-server start)?")
        return r.stdout

    def start(self) -> None:
        if not self.created:
            self._ctl("add_vhost", self.vhost)
            self._ctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
            self.created = True
        else:
            self._ctl("start_app")
        self._ctl("await_startup")
        wait_for(lambda: port_open(5672), 60, "RabbitMQ to listen on 5672")

    def restart(self, down_s: float) -> None:
        """The broker node stopped (every connection dropped) for down_s seconds, then started."""
        self._ctl("stop_app")
        try:
            time.sleep(down_s)
        finally:
            self.start()

    def queue_types(self) -> dict[str, str]:
        out = self._ctl("list_queues", "-p", self.vhost, "--quiet", "--no-table-headers", "name", "type", "durable")
        return {parts[0]: f"{parts[1]} durable={parts[2]}" for parts in (line.split() for line in out.splitlines()) if len(parts) == 3}

    def stop(self) -> None:
        if self.created:
            self._ctl("start_app")  # whatever happened, RabbitMQ is left running
            self._ctl("delete_vhost", self.vhost)
            self.created = False


class Orthanc:
    """Orthanc as the PACS; restarting keeps its storage, like a PACS that was down."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.dicom_port = port or free_port()
        self.http_port = free_port()
        self.log = folder / "orthanc.log"
        (folder / "received.lua").write_text(RECEIVED_LUA)
        cfg = {"Name": "PACS", "DicomAet": "PACS", "DicomPort": self.dicom_port, "HttpPort": self.http_port,
               "StorageDirectory": str(folder / "orthanc-db"), "IndexDirectory": str(folder / "orthanc-db"),
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
               "LuaScripts": [str(folder / "received.lua")], "DicomCheckCalledAet": False,
               "DicomAlwaysAllowStore": True, "StableAge": 3600}
        (folder / "orthanc.json").write_text(json.dumps(cfg))
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        out = self.log.open("a")
        self.proc = subprocess.Popen([require_peer("Orthanc"), str(self.folder / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(self.dicom_port) and self._try("/system"), 60, "Orthanc to start")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
        wait_for(lambda: not port_open(self.dicom_port), 20, "Orthanc to stop")

    def _try(self, path: str):
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as r:
                return json.loads(r.read())
        except Exception:  # noqa: BLE001
            return None

    def instance_uids(self) -> list[str]:
        """The SOP Instance UID of every instance Orthanc stores."""
        with urllib.request.urlopen(self.base + "/instances?expand", timeout=60) as r:
            return [i["MainDicomTags"]["SOPInstanceUID"] for i in json.loads(r.read())]

    def receptions(self) -> Counter:
        """How many times each SOP Instance UID arrived by C-STORE (stored or not)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return Counter(re.findall(r"Lua says: RECEIVED (\S+)", text))


@dataclass
class Sent:
    """What storescu reported: the files the node answered Success for, and the status lines."""

    ok: list[Path]
    refused: dict[Path, str]
    returncode: int


def storescu(port: int, files: Iterable[Path], aet: str = MODALITY, extra: tuple[str, ...] = (),
             timeout: float = 300) -> Sent:
    """One association carrying ``files``. storescu stops at the first refused instance unless
    ``extra`` has ``--no-halt``; :class:`Sent` says which were acknowledged."""
    files = list(files)
    r = subprocess.run([require_peer(STORESCU), "-v", "-aet", aet, "-aec", NODE_AET, *extra, "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True, errors="replace", timeout=timeout)
    return parse_storescu(r.stdout + r.stderr, r.returncode)


def parse_storescu(text: str, returncode: int) -> Sent:
    ok, refused, current = [], {}, None
    for line in text.splitlines():
        m = re.search(r"Sending file: (.+)$", line)
        if m:
            current = Path(m.group(1).strip())
            continue
        m = re.search(r"Received Store Response \((.+)\)", line)
        if m and current is not None:
            if m.group(1).startswith("Success") or m.group(1).startswith("Warning"):
                ok.append(current)
            else:
                refused[current] = m.group(1)
            current = None
    return Sent(ok, refused, returncode)


@dataclass
class Node:
    """The node under test: config, spool, and its processes (listen, gpu workers, io)."""

    folder: Path
    bundle: Path
    orthanc: Orthanc
    broker: Redis | RabbitMQ
    overrides: dict = field(default_factory=dict)
    gpu_workers: int = 2
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.spool = self.overrides.pop("spool", self.folder / "spool")
        self.config = self.folder / "node.toml"
        sections = {
            "node": {"port": self.port, "min_free_mb": 1, "max_associations": 32},
            "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": self.orthanc.dicom_port},
            "broker": {"url": self.broker.url},
            "paths": {"spool": str(self.spool)},
            "model": {"bundle": str(self.bundle), "device": "cpu"},
            # Enough retries to ride out a 60 s PACS outage (1+2+4+8+8+... s of backoff).
            "sender": {"attempts": 14, "backoff_s": 1.0, "max_backoff_s": 8.0, "timeout_s": 10.0},
            # Quick recovery: a killed worker's job is taken again after 8 s; the broker's
            # forgotten messages are re-sent after 20 s.
            "worker": {"lease_s": 8.0, "stale_after_s": 20.0, "reconcile_every_s": 2.0},
        }
        for section, values in self.overrides.items():
            sections.setdefault(section, {}).update(values)
        self.config.write_text(_toml(sections))
        self.logs = self.folder / "logs"
        self.logs.mkdir(exist_ok=True)

    # -- processes -----------------------------------------------------------------------------
    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        out = (self.logs / f"{name.split('#')[0]}.log").open("a")
        proc = subprocess.Popen([sys.executable, "-m", "worker.cli", *args, "--config", str(self.config)],
                                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.procs[name] = proc
        return proc

    def start_listener(self) -> None:
        before = self._listen_count()
        self._spawn("listen", "listen")
        wait_for(lambda: self._listen_count() > before and port_open(self.port), 90, "the listener")

    def _listen_count(self) -> int:
        f = self.logs / "listen.log"
        return f.read_text(errors="replace").count("medsam2-cxr listening") if f.exists() else 0

    def start_gpu(self, i: int) -> None:
        self._spawn(f"gpu#{i}", "worker", "--queues", "gpu")

    def start_io(self) -> None:
        self._spawn("io", "worker", "--queues", "io")

    def start(self) -> None:
        self.start_listener()
        for i in range(self.gpu_workers):
            self.start_gpu(i)
        self.start_io()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            stop(proc)

    # -- state -------------------------------------------------------------------------------
    @property
    def jobs(self) -> JobStore:
        return JobStore(self.spool / "jobs.sqlite")

    def counts(self) -> dict[str, int]:
        return self.jobs.counts() if (self.spool / "jobs.sqlite").exists() else {}

    def in_flight(self) -> int:
        c = self.counts()
        return sum(c.get(str(s), 0) for s in IN_FLIGHT)

    def audit(self) -> list[dict]:
        f = self.spool / "audit.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []

    def wait_settled(self, expected_done: int, timeout: float) -> None:
        def settled() -> bool:
            c = self.counts()
            return self.in_flight() == 0 and c.get(str(JobState.DONE), 0) >= expected_done

        wait_for(settled, timeout, lambda: f"{expected_done} jobs done and none in flight (now {self.counts()})",
                 step=1)

    def no_partial_writes(self, timeout: float) -> None:
        """tmp/ empties: a write in progress renames its file away within moments, and the
        reconciler removes what a killed process left once it is ``stale_after_s`` old."""
        tmp = self.spool / "tmp"
        wait_for(lambda: not any(tmp.iterdir()), timeout,
                 lambda: f"partial writes to go from tmp/ (left: {sorted(p.name for p in tmp.iterdir())})")

    # -- the figures ---------------------------------------------------------------------------
    def account(self, sources: list[Source], digest: str) -> dict[str, int]:
        """sent/delivered/lost/duplicates over the frontal sources the modality sent.

        delivered: sources whose SR, SC and GSPS (UIDs derived as the node derives them: every
        result has these three; a text SR and a KOS come with an index and an urgent finding) are
        in Orthanc. duplicates: results delivered more than once ("sent" audit records of a source
        beyond the first) plus instances in Orthanc under any other UID (a second result under
        other UIDs). retransmitted: C-STOREs of a result the PACS received again, as Orthanc's own
        log counts them: after a C-STORE the PACS took but never answered (it died mid-operation)
        the node sends it again with the same UID and the PACS keeps one copy, so it is counted apart.
        """
        receptions = self.orthanc.receptions()
        stored = set(self.orthanc.instance_uids())
        known: set[str] = set()
        delivered = retransmitted = 0
        for src in sources:
            uids = ResultUIDs.for_source(src.study_instance_uid, src.sop_instance_uid, digest)
            every = (uids.sr_instance, uids.sc_instance, uids.pr_instance)
            results = (*every, uids.text_instance, uids.ko_instance)
            known.update(results)
            if stored.issuperset(every):
                delivered += 1
            retransmitted += sum(max(receptions[u] - 1, 0) for u in results)
        sent_per_source = Counter(a["sop_instance_uid"] for a in self.audit() if a["event"] == "sent")
        duplicates = sum(n - 1 for n in sent_per_source.values() if n > 1)
        duplicates += len(stored - known)
        return {"sent": len(sources), "delivered": delivered, "lost": len(sources) - delivered,
                "duplicates": duplicates, "retransmitted": retransmitted}

    def phi_leaks(self, sources: list[Source]) -> list[str]:
        """Patient names, IDs and birth dates found in any log line, audit or quarantine record."""
        needles = set()
        for s in sources:
            needles |= {s.patient_name, s.patient_name.replace("^", " "), s.patient_id, s.birth_date}
            if len(s.birth_date) == 8:
                needles.add(f"{s.birth_date[:4]}-{s.birth_date[4:6]}-{s.birth_date[6:]}")
        needles.discard("")
        texts = [f.read_text(errors="replace") for f in self.logs.glob("*.log")]
        texts += [f.read_text(errors="replace") for f in (self.spool / "quarantine").glob("*.json")]
        audit = self.spool / "audit.jsonl"
        if audit.exists():
            texts.append(audit.read_text())
        text = "\n".join(texts)
        # Whole tokens only: an 8-digit birth date also occurs inside long numeric UIDs.
        return sorted(n for n in needles if re.search(rf"(?<![0-9A-Za-z.]){re.escape(n)}(?![0-9A-Za-z])", text))


def figure_line(figures: dict[str, int]) -> str:
    return " ".join(f"{k}={figures[k]}" for k in ("sent", "delivered", "lost", "duplicates"))


def _toml(sections: dict) -> str:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    lines = []
    for section, values in sections.items():
        flat = {k: v for k, v in values.items() if not isinstance(v, dict)}
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in flat.items()]
        for k, sub in values.items():
            if isinstance(sub, dict):
                lines.append(f"[{section}.{k}]")
                lines += [f"{kk} = {value(vv)}" for kk, vv in sub.items()]
    return "\n".join(lines) + "\n"
