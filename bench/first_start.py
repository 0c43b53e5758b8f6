"""First start, later start and SIGTERM stop of `medsam2-cxr up`, as a new user meets them.

python -m bench.first_start --repo DIR --work DIR [--images N]

1. a fresh spool with no bundle: seconds from starting `up` to the first C-ECHO answered
   (DCMTK echoscu), then to the results of one chest radiograph (pydicom-data's RG1_UNCI.dcm,
   sent with storescu) at a DCMTK storescp destination;
2. SIGTERM while idle: seconds until every process of `up` (its session) is gone;
3. a later start: seconds to C-ECHO; eight more images; SIGTERM once the first of their results
   arrived (work under way): seconds until every process is gone;
4. a start again: every image's results at the destination, counted (storescp writes each
   received object to its own file, so a result sent twice is seen twice).
Prints one JSON object. `--repo` is the code to run (e.g. an export of main for "before").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import pydicom
from pydicom.data import get_testdata_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def echo(port: int) -> bool:
    r = subprocess.run(["/usr/bin/echoscu", "-to", "2", "-ta", "2", "-td", "2", "-aec", "MEDSAM2CXR",
                        "127.0.0.1", str(port)], capture_output=True)
    return r.returncode == 0


def wait(pred, timeout: float, step: float = 0.25) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--images", type=int, default=400, help="[model] default_images")
    ap.add_argument("--extra", default="", help="more TOML lines for [model]")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    node_port, pacs_port = free_port(), free_port()
    received = work / "pacs"
    received.mkdir(exist_ok=True)
    pacs = subprocess.Popen(["/usr/bin/storescp", "-aet", "PACS", "-uf", "-od", str(received), str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    spool = work / "var"
    config = work / "node.toml"
    config.write_text(f'[node]\nport = {node_port}\nmin_free_mb = 16\n[destination]\nport = {pacs_port}\n'
                      f'[paths]\nspool = "{spool}"\n[model]\ndevice = "cpu"\ndefault_images = {args.images}\n'
                      + args.extra.replace("\\n", "\n") + "\n")
    src = Path(cast(str, get_testdata_file("RG1_UNCI.dcm")))
    copies = []
    for i in range(8):
        ds = pydicom.dcmread(src)
        ds.SOPInstanceUID = f"{ds.SOPInstanceUID}.{i + 1}"
        copies.append(work / f"copy{i}.dcm")
        ds.save_as(copies[-1])
    env = {**os.environ, "PYTHONPATH": str(args.repo.resolve())}
    out: dict = {"repo": str(args.repo), "default_images": args.images}
    run = [0]

    def start() -> subprocess.Popen:
        run[0] += 1
        return subprocess.Popen([sys.executable, "-m", "worker.cli", "up", "--config", str(config)], env=env,
                                cwd=work, stdout=(work / f"up{run[0]}.log").open("w"), stderr=subprocess.STDOUT,
                                start_new_session=True)

    def stop(up: subprocess.Popen) -> float:
        t0 = time.monotonic()
        up.send_signal(signal.SIGTERM)
        gone = wait(lambda: up.poll() is not None and not session_pids(up.pid), 180, 0.1)
        for pid in session_pids(up.pid):
            os.kill(pid, signal.SIGKILL)
        up.wait()
        return round(gone if gone is not None else time.monotonic() - t0, 1)

    def files() -> int:
        return len(list(received.iterdir()))

    def storescu(*paths: Path) -> None:
        subprocess.run(["/usr/bin/storescu", "-aec", "MEDSAM2CXR", "127.0.0.1", str(node_port), *map(str, paths)],
                       check=True, capture_output=True, timeout=120)

    try:
        t0 = time.monotonic()
        up = start()
        wait(lambda: echo(node_port), 3600, 0.5)
        out["first_start_to_echo_s"] = round(time.monotonic() - t0, 1)
        storescu(src)
        wait(lambda: files() >= 2, 3600, 0.25)
        out["first_start_to_first_result_s"] = round(time.monotonic() - t0, 1)
        time.sleep(3)
        per_image = files()
        out["results_per_image"] = per_image
        out["stop_idle_s"] = stop(up)

        t0 = time.monotonic()
        up = start()
        wait(lambda: echo(node_port), 600, 0.25)
        out["later_start_to_echo_s"] = round(time.monotonic() - t0, 1)
        storescu(*copies)
        wait(lambda: files() > per_image, 900, 0.25)
        out["busy_when_stopped_results"] = files()
        out["stop_busy_s"] = stop(up)

        t0 = time.monotonic()
        up = start()
        done = wait(lambda: files() >= per_image * 9, 900, 0.5)
        time.sleep(3)
        out["after_restart_all_results_s"] = round(done, 1) if done is not None else None
        out["results_at_destination"] = files()
        out["expected_results"] = per_image * 9
        uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in received.iterdir()]
        out["duplicates_at_destination"] = len(uids) - len(set(uids))
        out["stop_idle_again_s"] = stop(up)
    finally:
        pacs.terminate()
        pacs.wait()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
