"""bench ingest: DCMTK storescu -> the node's listener, against storescu -> DCMTK storescp.

The same files go to both receivers in the same run, one sender and then several at once, with
the order of the two receivers alternating between repeats so drift on a shared machine falls on
both. The listener runs as the node runs it (a real spool with fsync'd writes, a SQLite job
table with synchronous=FULL, the audit trail), in its own process so that its resident memory
can be sampled; storescp writes without fsync, so a ratio at or under 1 means durability costs
nothing the modality can notice.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import PeerMissing
from dicom_node.layout import SpoolLayout

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
NODE_AET = "MEDSAM2CXR"
STORESCP_AET = "STORESCP"
# storescp at its best: the largest PDU DCMTK accepts, files written exactly as received, one
# process per association (so concurrent senders are served concurrently, as the node does).
STORESCP_FLAGS = ("--fork", "-pdu", "131072", "+B")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, its threads and its children it has reaped
    (utime, stime, cutime, cstime of /proc/<pid>/stat; Linux)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()  # after "pid (comm)": the comm may hold spaces
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The live children of a process (storescp --fork: one per association)."""
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return [int(c) for c in fh.read().split()]


def proc_status_kb(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process in kB, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/{pid}/status has no {key}")


@dataclass
class RssSampler:
    """Samples a process's resident set every `every_s` seconds in a thread."""

    pid: int
    every_s: float = 0.02
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.samples.append((time.perf_counter(), proc_status_kb(self.pid, "VmRSS")))
                except (OSError, KeyError):
                    return
                self._stop.wait(self.every_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def peak_between(self, t0: float, t1: float) -> int:
        inside = [kb for t, kb in self.samples if t0 <= t <= t1]
        return max(inside) if inside else 0


# ---------------------------------------------------------------- the node's listener, in a child

def _listener_main(root: str, port: int, log_path: str, conn, processes: int = 1, first: bool = True) -> None:
    """Child process: the production listener on a fresh spool, until told to stop; one of
    ``processes`` on the port (SO_REUSEPORT) as [node] processes runs them, the first sweeping."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(fd, 2)  # the node logs JSON lines to stderr, as in production; keep them out of ours
    from dicom_node.config import configure
    from dicom_node.listener import start_listener
    from worker import logs
    from worker.node import Node
    from worker.settings import Settings

    logs.configure()
    # no free-space watermark: the benchmark measures receiving, not refusing
    node = Node(Settings.model_validate({"paths": {"spool": root}, "node": {"min_free_mb": 0, "processes": processes}}))
    configure()  # a spawned process starts bare: chunked receive, quiet pynetdicom
    enqueued: list[str] = []
    server = start_listener(node.listener_config(ae_title=NODE_AET, host="127.0.0.1", port=port), node.spool,
                            node.jobs, node.audit, enqueued.append, recover=first)
    conn.send(os.getpid())
    conn.recv()
    server.shutdown()
    conn.send({"enqueued": len(enqueued), "jobs": node.jobs.counts()})


class NodeReceiver:
    """The listener in spawned processes (no fork of this one's state), with a fresh spool:
    ``processes`` of them on one port, as [node] processes runs them. Memory is the first one's."""

    name = "node"

    def __init__(self, work: Path, processes: int = 1) -> None:
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.root = work / "spool"
        ctx = mp.get_context("spawn")
        self._conns, self.procs, self.pids = [], [], []
        for i in range(processes):  # one after the other: the first sweeps the spool before the rest start
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_listener_main, args=(str(self.root), self.port, str(work / f"listener{i}.log"),
                                                            child, processes, i == 0), daemon=True)
            proc.start()
            end = time.monotonic() + 60
            while not conn.poll(0.1):
                if not proc.is_alive() or time.monotonic() > end:
                    proc.kill()
                    raise RuntimeError(f"the node's listener did not start; see {work / f'listener{i}.log'}")
            self._conns.append(conn)
            self.procs.append(proc)
            self.pids.append(conn.recv())
        self.pid = self.pids[0]
        _wait_port(self.port)
        time.sleep(0.2)  # let start-up allocations settle before the baseline is read
        self.baseline_kb = proc_status_kb(self.pid, "VmRSS")
        self.cpu0 = self.cpu_seconds()
        self.aet = NODE_AET

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def stop(self) -> dict:
        peak = proc_status_kb(self.pid, "VmHWM")
        cpu = self.cpu_seconds() - self.cpu0
        infos = []
        for conn in self._conns:
            conn.send("stop")
        for conn, proc in zip(self._conns, self.procs):
            infos.append(conn.recv() if conn.poll(60) else {})
            proc.join(30)
        jobs: dict[str, int] = {}
        for info in infos[:1]:  # one spool, one job table: every process sees all of it
            jobs = info.get("jobs", {})
        return {"enqueued": sum(i.get("enqueued", 0) for i in infos), "jobs": jobs, "peak_kb": peak, "cpu_s": cpu}

    def received(self) -> int:
        return sum(1 for _ in SpoolLayout(self.root).incoming.glob("*.dcm"))


class StorescpReceiver:
    name = "storescp"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.out = work / "storescp"
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([STORESCP, *STORESCP_FLAGS, "-aet", STORESCP_AET, "-od", str(self.out), str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=(work / "storescp.log").open("w"))
        _wait_port(self.port)
        self.aet = STORESCP_AET
        self.pid = self.proc.pid
        self.baseline_kb = proc_status_kb(self.pid, "VmRSS")
        self.cpu0 = cpu_seconds(self.pid)

    def stop(self) -> dict:
        peak = proc_status_kb(self.pid, "VmHWM")
        # Its per-association children count once storescp has reaped them (cutime, cstime).
        end = time.monotonic() + 20
        while _children(self.pid) and time.monotonic() < end:
            time.sleep(0.05)
        cpu = cpu_seconds(self.pid) - self.cpu0
        self.proc.terminate()
        self.proc.wait(20)
        return {"peak_kb": peak, "cpu_s": cpu}

    def received(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file())


def send(files: Sequence[Path], port: int, aet: str, senders: int) -> float:
    """storescu in `senders` processes, files split evenly; wall seconds until the last exits."""
    groups = [list(files[i::senders]) for i in range(senders)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-R", "-aet", "BENCHSCU", "-aec", aet, "127.0.0.1", str(port), *map(str, g)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for g in groups if g]
    errors = [p.communicate()[1].decode(errors="replace") for p in procs]
    elapsed = time.perf_counter() - t0
    bad = [e for p, e in zip(procs, errors) if p.returncode != 0]
    if bad:
        raise RuntimeError(f"storescu to {aet} on port {port} failed: {bad[0][-500:]}")
    return elapsed


def one_pass(make: Callable[[Path], NodeReceiver | StorescpReceiver], files: Sequence[Path], senders: int,
             work: Path) -> dict:
    """Start a receiver, send every file, check all arrived, report time and memory."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rx = make(work)
    try:
        with RssSampler(rx.pid) as rss:
            t0 = time.perf_counter()
            seconds = send(files, rx.port, rx.aet, senders)
            t1 = t0 + seconds
        received = rx.received()
    finally:
        info = rx.stop()
    if received != len(files):
        raise RuntimeError(f"{rx.name} stored {received} of {len(files)} files; see the logs in {work}")
    mid = t0 + seconds / 2
    gb = sum(p.stat().st_size for p in files) / 2**30
    out = {"seconds": round(seconds, 3), "cpu_s": round(info["cpu_s"], 3),
           "cpu_s_per_gb": round(info["cpu_s"] / gb, 1), "peak_rss_mb": round(info["peak_kb"] / 1024, 1),
           "rss_growth_mb": round((info["peak_kb"] - rx.baseline_kb) / 1024, 1),
           "rss_growth_first_half_mb": round((rss.peak_between(t0, mid) - rx.baseline_kb) / 1024, 1),
           "rss_growth_second_half_mb": round((rss.peak_between(mid, t1) - rx.baseline_kb) / 1024, 1)}
    if "jobs" in info:
        out["jobs"] = info["jobs"]
    shutil.rmtree(work, ignore_errors=True)
    return out


def _compare(files: Sequence[Path], senders: int, repeats: int, work: Path) -> dict:
    runs: dict[str, list[dict]] = {"node": [], "storescp": []}
    for r in range(repeats):
        order: list[tuple[str, Callable[[Path], NodeReceiver | StorescpReceiver]]] = [
            ("node", NodeReceiver), ("storescp", StorescpReceiver)]
        for name, make in (order if r % 2 == 0 else order[::-1]):
            runs[name].append(one_pass(make, files, senders, work / name))
    node_s = statistics.median(x["seconds"] for x in runs["node"])
    scp_s = statistics.median(x["seconds"] for x in runs["storescp"])
    mb = sum(p.stat().st_size for p in files) / 2**20
    return {
        "senders": senders,
        "node_s": round(node_s, 3),
        "storescp_s": round(scp_s, 3),
        "ratio_node_over_storescp": round(node_s / scp_s, 3),
        "node_mb_per_s": round(mb / node_s, 1),
        "storescp_mb_per_s": round(mb / scp_s, 1),
        # user + sys CPU seconds per GB received: what receiving costs, whatever the core count
        "node_cpu_s_per_gb": statistics.median(x["cpu_s_per_gb"] for x in runs["node"]),
        "storescp_cpu_s_per_gb": statistics.median(x["cpu_s_per_gb"] for x in runs["storescp"]),
        "node_peak_rss_mb": max(x["peak_rss_mb"] for x in runs["node"]),
        "node_rss_growth_mb": max(x["rss_growth_mb"] for x in runs["node"]),
        "node_rss_growth_first_half_mb": max(x["rss_growth_first_half_mb"] for x in runs["node"]),
        "node_rss_growth_second_half_mb": max(x["rss_growth_second_half_mb"] for x in runs["node"]),
        "storescp_peak_rss_mb": max(x["peak_rss_mb"] for x in runs["storescp"]),
        "node_jobs": runs["node"][-1].get("jobs", {}),
        "runs": runs,
    }


def _processes(files: Sequence[Path], senders: int, repeats: int, work: Path, counts: Sequence[int] = (1, 2)) -> dict:
    """The node alone with 1 and 2 listener processes on one port ([node] processes), the
    order alternating between repeats: wall time and CPU per GB of each."""
    runs: dict[int, list[dict]] = {n: [] for n in counts}
    for r in range(repeats):
        for n in (counts if r % 2 == 0 else counts[::-1]):
            runs[n].append(one_pass(functools.partial(NodeReceiver, processes=n), files, senders, work / f"p{n}"))
    return {"senders": senders,
            **{f"node_s_{n}_processes": statistics.median(x["seconds"] for x in runs[n]) for n in counts},
            **{f"node_cpu_s_per_gb_{n}_processes": statistics.median(x["cpu_s_per_gb"] for x in runs[n]) for n in counts},
            "cores": os.cpu_count(), "runs": {str(n): v for n, v in runs.items()}}


def run(n: int = 40, rows: int = 2500, cols: int = 2048, senders: int = 8, repeats: int = 2,
        probe_scale: float = 0.5, work: Path | None = None) -> dict:
    """The ingest benchmark; returns its JSON-able result.

    ``probe_scale``: a second, node-only pass with images scaled by this factor per side, to show
    whether the listener's memory grows with image size (0 skips it).
    """
    from bench.images import write_cxr_images

    for tool in (STORESCU, STORESCP):
        if not Path(tool).exists():
            raise PeerMissing(f"{tool} is missing: install DCMTK (`make peers`, Debian package dcmtk)")
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-")) if work is None else Path(work)
    try:
        files = write_cxr_images(work / "images", n, rows, cols)
        result: dict = {
            "benchmark": "ingest",
            "images": n,
            "rows": rows,
            "cols": cols,
            "image_mb": round(files[0].stat().st_size / 2**20, 2),
            "repeats": repeats,
            "node": "dicom_node.listener.start_listener: received straight to a file, linked into the spool, fsync per file and directory, SQLite synchronous=FULL, audit fsync",
            "storescp": " ".join([STORESCP, *STORESCP_FLAGS]) + " (no fsync)",
            "sequential": _compare(files, 1, repeats, work / "rx"),
        }
        if senders > 1:
            result["concurrent"] = _compare(files, senders, repeats, work / "rx")
            result["processes"] = _processes(files, senders, repeats, work / "rx")
        if probe_scale:
            small = write_cxr_images(work / "small", n, max(16, int(rows * probe_scale)), max(16, int(cols * probe_scale)))
            probe = one_pass(NodeReceiver, small, 1, work / "rx" / "probe")
            result["memory_vs_size"] = {
                "small_rows": int(rows * probe_scale), "small_cols": int(cols * probe_scale),
                "small_image_mb": round(small[0].stat().st_size / 2**20, 2),
                "node_rss_growth_small_mb": probe["rss_growth_mb"],
                "node_rss_growth_full_mb": result["sequential"]["node_rss_growth_mb"],
            }
        seq = result["sequential"]["ratio_node_over_storescp"]
        conc = result.get("concurrent", {}).get("ratio_node_over_storescp", seq)
        result["goal"] = {"ratio_at_most": 1.0, "met": bool(seq <= 1.0 and conc <= 1.0)}
        return result
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)
