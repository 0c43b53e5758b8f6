"""STOW-RS in against C-STORE in, the same images in the same run: ``python -m bench.stow --n 40``.

C-STORE: DCMTK storescu, one association, to the production listener in its own process
(bench.ingest.NodeReceiver). STOW-RS: httpx streaming the files from disk, once as one request of
n parts and once as n requests of one part on one keep-alive connection, to the node's STOW-RS
router (dicom_node.stow) served by uvicorn as the HTTP app serves it, in its own process. Each
pass gets a fresh spool; both receivers do the same durable work per instance (listener.
accept_instance: fsync'd spool file, job row with synchronous=FULL, audit line) and the
enqueuer is a list in both. Receivers alternate order between repeats; medians are reported.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from bench.ingest import NODE_AET, NodeReceiver, _wait_port, free_port, send

BOUNDARY = "bench-stow-boundary"
CHUNK = 1 << 20


def _stow_main(root: str, port: int, digest: str, log_path: str, conn) -> None:
    """Child process: the STOW-RS router in uvicorn on a fresh spool, until told to stop."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(fd, 2)
    from fastapi import FastAPI

    from console.app import ConsoleServer
    from dicom_node.stow import build_router
    from worker import logs
    from worker.node import Node
    from worker.settings import Settings

    logs.configure()
    from dicom_node.config import configure

    configure()  # a spawned process starts bare
    settings = Settings.model_validate({"paths": {"spool": root}, "console": {"host": "127.0.0.1", "port": port},
                                        "node": {"min_free_mb": 0},
                                        "dicomweb": {"clients": [{"name": "BENCHSCU", "token_sha256": digest}]}})
    enqueued: list[str] = []
    app = FastAPI()
    node = Node(settings)
    app.include_router(build_router(settings, *node.intake_parts(), enqueue=enqueued.append))
    server = ConsoleServer(app, settings).start()
    conn.send(os.getpid())
    conn.recv()
    server.stop()
    conn.send({"enqueued": len(enqueued), "jobs": node.jobs.counts()})


class StowReceiver:
    """The STOW-RS router in a spawned process, with a fresh spool."""

    def __init__(self, work: Path, digest: str) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.port, self.root = work, free_port(), work / "spool"
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_stow_main, args=(str(self.root), self.port, digest,
                                                         str(work / "stow.log"), child), daemon=True)
        self.proc.start()
        end = time.monotonic() + 60
        while not self._conn.poll(0.1):
            if not self.proc.is_alive() or time.monotonic() > end:
                self.proc.kill()
                raise RuntimeError(f"the STOW-RS app did not start; see {work / 'stow.log'}")
        self.pid = self._conn.recv()
        _wait_port(self.port)

    def stop(self) -> dict:
        self._conn.send("stop")
        info = self._conn.recv() if self._conn.poll(60) else {}
        self.proc.join(30)
        return info

    def received(self) -> int:
        return sum(1 for _ in (self.root / "incoming").glob("*.dcm"))


def _multipart(files: Sequence[Path]) -> Iterator[bytes]:
    """The multipart/related body, streamed from the files in CHUNK reads."""
    for f in files:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(f, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def stow(files: Sequence[Path], port: int, token: str, per_request: int) -> float:
    """POST the files, ``per_request`` parts per request, one connection; wall seconds."""
    headers = {"Authorization": f"Bearer {token}",
               "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'}
    url = f"http://127.0.0.1:{port}/dicomweb/studies"
    with httpx.Client(timeout=600) as client:
        t0 = time.perf_counter()
        for i in range(0, len(files), per_request):
            r = client.post(url, content=_multipart(files[i:i + per_request]), headers=headers)
            if r.status_code != 200:
                raise RuntimeError(f"STOW-RS answered {r.status_code}: {r.text[:300]}")
        return time.perf_counter() - t0


def _pass(kind: str, files: Sequence[Path], work: Path, token: str, digest: str) -> float:
    if work.exists():
        shutil.rmtree(work)
    rx = NodeReceiver(work) if kind == "c_store" else StowReceiver(work, digest)
    try:
        if kind == "c_store":
            seconds = send(files, rx.port, NODE_AET, senders=1)
        else:
            seconds = stow(files, rx.port, token, len(files) if kind == "stow_one_request" else 1)
        received = rx.received()
    finally:
        info = rx.stop()
    if received != len(files) or info.get("enqueued") != len(files):
        raise RuntimeError(f"{kind}: {received} stored, {info.get('enqueued')} enqueued of {len(files)}; see {work}")
    shutil.rmtree(work, ignore_errors=True)
    return seconds


def run(n: int = 40, rows: int = 2500, cols: int = 2048, repeats: int = 3, work: Path | None = None) -> dict:
    from bench.images import write_cxr_images
    from dicom_node.stow import new_token

    own = work is None
    work = Path(tempfile.mkdtemp(prefix="bench-stow-")) if work is None else Path(work)
    try:
        files = write_cxr_images(work / "images", n, rows, cols)
        token, digest = new_token()
        kinds = ["c_store", "stow_one_request", "stow_per_instance"]
        runs: dict[str, list[float]] = {k: [] for k in kinds}
        for r in range(repeats):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                runs[kind].append(round(_pass(kind, files, work / kind, token, digest), 3))
        mb = sum(f.stat().st_size for f in files) / 2**20
        med = {k: statistics.median(v) for k, v in runs.items()}
        return {"images": n, "matrix": f"{rows}x{cols}", "mb": round(mb, 1), "repeats": repeats,
                **{f"{k}_s": round(v, 3) for k, v in med.items()},
                **{f"{k}_mb_per_s": round(mb / v, 1) for k, v in med.items()},
                "ratio_stow_one_request_over_c_store": round(med["stow_one_request"] / med["c_store"], 3),
                "ratio_stow_per_instance_over_c_store": round(med["stow_per_instance"] / med["c_store"], 3),
                "cpu_cores": os.cpu_count(), "runs": runs}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--rows", type=int, default=2500)
    p.add_argument("--cols", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", type=Path, default=None)
    a = p.parse_args()
    print(json.dumps(run(a.n, a.rows, a.cols, a.repeats, a.work)))


if __name__ == "__main__":
    main()
