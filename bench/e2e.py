"""bench e2e: DCMTK storescu -> the node (listener, Redis, gpu and io workers) -> Orthanc as the PACS.

Two measures, as a reader and a checkup centre see the node:
- latency: from the start of storescu to the SR and SC being stored in Orthanc, one image at a
  time (p50, p95), split by the node's audit trail into receive, queue + decode + predict, and
  encode + send;
- throughput: a burst of images in one association, images per second until every result is in
  Orthanc, against the full model step's rate (``bench infer``) measured in the same run, on the
  same bundle and at the worker's batch size, right before and right after the burst.
The processes are the ones `medsam2-cxr up` runs, started apart as in the end-to-end test.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from bench import PeerMissing
from bench.ingest import STORESCU, _wait_port, free_port
from dicom_node.layout import SpoolLayout

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.10  # pipeline overhead at the burst under this fraction of the model's own rate


def _get(url: str) -> dict | list:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _wait(pred: Callable[[], object], timeout: float, what: str, step: float = 0.02) -> object:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = pred()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _cpu_seconds(root: int) -> float:
    """User + system CPU seconds of a process and all its descendants, from /proc (Linux)."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    tree, frontier = {root}, [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier and p not in tree]
        tree.update(kids)
        frontier = kids
    return sum(ticks.get(p, 0) for p in tree) / os.sysconf("SC_CLK_TCK")


def _percentile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Node:
    """Orthanc, the listener and both workers as separate processes; stop() ends them all."""

    def __init__(self, work: Path, bundle: Path, redis_url: str, device: str) -> None:
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.names: list[str] = []
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        dicom_port, http_port, self.port = free_port(), free_port(), free_port()
        cfg = {"Name": "PACS", "DicomAet": "PACS", "DicomPort": dicom_port, "HttpPort": http_port,
               "StorageDirectory": str(work / "orthanc-db"), "IndexDirectory": str(work / "orthanc-db"),
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [],
               "DicomCheckCalledAet": False}
        (work / "orthanc.json").write_text(json.dumps(cfg))
        self.base = f"http://127.0.0.1:{http_port}"
        self._start("orthanc", ["Orthanc", str(work / "orthanc.json")])
        _wait(lambda: _get(self.base + "/system"), 60, "Orthanc to start", step=0.2)
        self.spool = work / "spool"
        config = work / "node.toml"
        config.write_text(
            f'[node]\nhost = "127.0.0.1"\nport = {self.port}\nmin_free_mb = 16\n'
            f'[destination]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {dicom_port}\n'
            f'[broker]\nurl = "{redis_url}"\n[paths]\nspool = "{self.spool}"\n'
            f'[model]\nbundle = "{bundle}"\ndevice = "{device}"\n'
            f'[worker]\nreconcile_every_s = 5\nstale_after_s = 600\n')
        exe = [sys.executable, "-m", "worker.cli"]
        self._start("listen", exe + ["listen", "--config", str(config)])
        self._start("gpu", exe + ["worker", "--queues", "gpu", "--config", str(config)])
        self._start("io", exe + ["worker", "--queues", "io", "--config", str(config)])
        _wait_port(self.port, timeout=120)

    def _start(self, name: str, args: list[str]) -> None:
        out = (self.logs / f"{name}.log").open("w")
        self.procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO))
        self.names.append(name)

    def instances(self) -> int:
        return int(cast(dict, _get(self.base + "/statistics"))["CountInstances"])

    def audit(self) -> list[dict]:
        path = SpoolLayout(self.spool).audit
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def cpu_seconds(self) -> dict[str, float]:
        return {name: _cpu_seconds(p.pid) for name, p in zip(self.names, self.procs)}

    def check_alive(self) -> None:
        dead = [name for name, p in zip(self.names, self.procs) if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited early; see {', '.join(str(self.logs / f'{n}.log') for n in dead)}")

    def stop(self) -> None:
        for p in self.procs[::-1]:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def storescu(files: Sequence[Path], port: int) -> None:
    out = subprocess.run([STORESCU, "-R", "-aet", "MODALITY", "-aec", "MEDSAM2CXR", "127.0.0.1", str(port),
                          *map(str, files)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"storescu to the node failed: {out.stderr[-500:]}")


def send_and_wait(node: Node, files: Sequence[Path], results_per_image: int, timeout: float) -> tuple[float, float]:
    """(wall time t0, seconds) from the start of storescu until every result is in Orthanc."""
    want = node.instances() + results_per_image * len(files)
    wall, t0 = time.time(), time.perf_counter()
    storescu(files, node.port)

    def arrived() -> bool:
        node.check_alive()
        return node.instances() >= want

    _wait(arrived, timeout, f"{want} instances in Orthanc")
    return wall, time.perf_counter() - t0


def _phases(audit: list[dict], since: float) -> dict[str, float] | None:
    """Receive, infer and deliver times of the one job received after `since`, from the audit."""
    recv = [a for a in audit if a["event"] == "received" and a["time"] >= since - 0.01]
    if len(recv) != 1:
        return None
    job = recv[0]["job_id"]
    inferred = next((a for a in audit if a["event"] == "inferred" and a.get("job") == job), None)
    sent = next((a for a in audit if a["event"] == "sent" and a.get("job") == job), None)
    if not inferred or not sent:
        return None
    return {"receive_s": recv[0]["time"] - since, "queue_decode_predict_save_s": inferred["time"] - recv[0]["time"],
            "predict_s": float(inferred["seconds"]), "encode_send_s": sent["time"] - inferred["time"]}


def _worker_view(audit: list[dict], since: float, seconds: float) -> dict:
    """What the gpu worker did during the burst, from its audit records: batch sizes it formed
    and the share of the burst's wall time its forward passes took."""
    recs = [a for a in audit if a["event"] == "inferred" and since - 0.01 <= a["time"] <= since + seconds + 0.01]
    sizes: dict[str, int] = {}
    for a in recs:
        b = int(a.get("batch", 1))
        sizes[str(b)] = sizes.get(str(b), 0) + 1
    batches = {b: round(n / int(b)) for b, n in sorted(sizes.items(), key=lambda kv: int(kv[0]))}
    model_s = sum(float(a["seconds"]) for a in recs)  # per-image share of each batch's predict time
    return {"worker_batches": batches, "worker_model_s": round(model_s, 1),
            "worker_model_busy_fraction": round(model_s / seconds, 3) if seconds else None}


def infer_rate(bundle: Path, files: Sequence[Path], batch: int, device: str, repeats: int = 2) -> float:
    """Images/s of the full model step on decoded images, at the worker's batch size."""
    import pydicom

    from models.bundle import load_bundle
    from models.predictor import Predictor
    from models.preprocess import read_image

    predictor = Predictor(load_bundle(bundle), device=device or None)
    images = [read_image(pydicom.dcmread(f)) for f in files[:batch]]
    predictor.predict(images)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.predict(images)
        times.append(time.perf_counter() - t0)
    return len(images) / statistics.median(times)


def run(spec: str = "t512", bundle: Path | None = None, runs: int = 20, burst: int = 200, rows: int = 2500,
        cols: int = 2048, device: str = "", redis_url: str = "redis://127.0.0.1:6379/8", timeout_s: float = 1800,
        work: Path | None = None) -> dict:
    """The end-to-end benchmark; returns its JSON-able result."""
    import redis

    from bench.images import write_cxr_images
    from bench.infer import write_bench_bundle
    from worker.tasks import CPU_BATCH, GPU_BATCH

    for tool in (STORESCU, "Orthanc"):
        if shutil.which(tool) is None:
            raise PeerMissing(f"{tool} is missing: run `make peers` (Debian packages dcmtk, orthanc)")
    r = redis.Redis.from_url(redis_url)
    try:
        r.ping()
    except redis.ConnectionError as exc:
        raise PeerMissing(f"Redis at {redis_url} does not answer ({exc}): run `make peers`") from exc
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="bench-e2e-")) if work is None else Path(work)
    r.flushdb()
    node = None
    try:
        bundle = Path(bundle) if bundle else write_bench_bundle(work / "bundle", spec)
        files = write_cxr_images(work / "images", 1 + runs + burst, rows, cols, seed=1)
        warm, singles, burst_files = files[0], files[1:1 + runs], files[1 + runs:]
        import torch

        cuda = device.startswith("cuda") or (not device and torch.cuda.is_available())
        batch = GPU_BATCH if cuda else CPU_BATCH
        node = Node(work, bundle, redis_url, device)
        # Warm-up: the gpu worker loads the model on its first job; also learn how many results
        # one image yields (SR + SC, and a draft report when an index is configured).
        before = node.instances()
        storescu([warm], node.port)
        _wait(lambda: any(a["event"] == "sent" for a in node.audit()), timeout_s, "the warm-up image's results", 0.1)
        per_image = next(len(a["results"]) for a in node.audit() if a["event"] == "sent")
        _wait(lambda: node.instances() >= before + per_image, 30, "the warm-up results in Orthanc")

        latencies, phases = [], []
        for f in singles:
            wall, seconds = send_and_wait(node, [f], per_image, timeout_s)
            latencies.append(seconds)
            time.sleep(0.3)  # let the audit records of this image land before reading them
            p = _phases(node.audit(), wall)
            if p:
                phases.append(p)

        rate_before = infer_rate(bundle, burst_files, batch, device)
        cpu_before = node.cpu_seconds()
        burst_wall, burst_s = send_and_wait(node, burst_files, per_image, timeout_s)
        cpu_after = node.cpu_seconds()
        rate_after = infer_rate(bundle, burst_files, batch, device)
        cpu = {name: round((cpu_after[name] - cpu_before[name]) / burst, 3) for name in cpu_before}
        worker = _worker_view(node.audit(), burst_wall, burst_s)
        model_rate = (rate_before + rate_after) / 2
        throughput = burst / burst_s
        counts = json.loads(subprocess.run([sys.executable, "-m", "worker.cli", "status", "--config",
                                            str(work / "node.toml")], capture_output=True, text=True, cwd=REPO).stdout)["counts"]
        result = {
            "benchmark": "e2e",
            "encoder": spec, "device": "cuda" if cuda else "cpu", "rows": rows, "cols": cols,
            "worker_batch": batch, "results_per_image": per_image,
            "latency": {
                "runs": len(latencies),
                "p50_s": round(_percentile(latencies, 0.5), 3),
                "p95_s": round(_percentile(latencies, 0.95), 3),
                "median_phases_s": {k: round(statistics.median(p[k] for p in phases), 3) for k in phases[0]} if phases else {},
            },
            "burst": {
                "images": burst,
                "seconds": round(burst_s, 2),
                "images_per_s": round(throughput, 3),
                "infer_images_per_s": round(model_rate, 3),
                "infer_images_per_s_before_after": [round(rate_before, 3), round(rate_after, 3)],
                "overhead": round(1 - throughput / model_rate, 3),
                **worker,
                # Where the machine's cores went: CPU seconds per image of each process tree
                # (gpu: decode and the forward when it runs on the CPU; io: SR, SC and sending).
                "cpu_s_per_image": cpu,
                "cpu_cores": os.cpu_count(),
            },
            "jobs": counts,
        }
        if phases:
            result["latency"]["model_share_of_p50"] = round(
                statistics.median(p["predict_s"] for p in phases) / result["latency"]["p50_s"], 3)
        result["goal"] = {"overhead_below": GOAL, "met": bool(result["burst"]["overhead"] < GOAL)}
        return result
    finally:
        if node:
            node.stop()
        r.flushdb()
        if own:
            shutil.rmtree(work, ignore_errors=True)
