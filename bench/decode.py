"""bench decode: which pydicom decoder plugin reads compressed radiographs fastest, and correctly.

Radiographs often arrive as JPEG 2000 or JPEG lossless. pydicom tries its plugins in a fixed
order (gdcm before pylibjpeg when both are installed); this measures each available plugin on
the same files in the same run, interleaved, by wall and by CPU time (the choice uses CPU time),
and checks every result against the uncompressed pixels:
pydicom-data's RG1 (a real 1955 x 1841 CR, J2K reversible, with its uncompressed twin) and a
CXR-sized phantom encoded here as JPEG 2000 lossless (openjpeg via pydicom) and JPEG lossless
SV1 (DCMTK dcmcjpeg). Per case it also times the GPU worker's own decode step one at a time, in
threads and in its decode processes: the decoders hold the GIL, so only processes scale.
"""

from __future__ import annotations

import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import JPEG2000Lossless

DCMCJPEG = "/usr/bin/dcmcjpeg"


def make_files(work: Path, rows: int, cols: int) -> list[tuple[str, Path, np.ndarray]]:
    """(name, compressed file, reference pixels) for each test case that can be made here."""
    from pydicom.data import get_testdata_file

    from bench.images import write_cxr_images

    cases = []
    rg1 = get_testdata_file("RG1_J2KR.dcm")
    ref = get_testdata_file("RG1_UNCR.dcm")
    if rg1 and ref:
        cases.append(("RG1 CR, JPEG 2000 lossless (pydicom-data)", Path(rg1), pydicom.dcmread(ref).pixel_array))
    src = write_cxr_images(work, 1, rows, cols)[0]
    ds = pydicom.dcmread(src)
    pixels = ds.pixel_array
    j2k = work / "cxr-j2k.dcm"
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(j2k, enforce_file_format=True)
    cases.append((f"CXR {rows} x {cols} phantom, JPEG 2000 lossless", j2k, pixels))
    if Path(DCMCJPEG).exists():
        jpl = work / "cxr-jpegls1.dcm"
        subprocess.run([DCMCJPEG, "+e1", str(src), str(jpl)], check=True, capture_output=True)
        cases.append((f"CXR {rows} x {cols} phantom, JPEG lossless SV1", jpl, pixels))
    return cases


def _decode(path: Path, plugin: str) -> np.ndarray:
    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin=plugin)
    return ds.pixel_array


def worker_decode(path: Path, workers: int, size: int = 512) -> dict:
    """What the GPU worker does per image (worker.decoding.model_input: decode with the default
    plugin order, window, resize), in images/s: one at a time, in `workers` threads, and in
    `workers` of the worker's decode processes (started and warmed before the clock)."""
    from worker import decoding

    n = 4 * workers
    jobs = [str(path)] * n
    out: dict[str, float] = {"workers": workers}
    t0 = time.perf_counter()
    for j in jobs[:workers]:
        decoding.model_input(j, size)
    out["one_thread_images_per_s"] = round(workers / (time.perf_counter() - t0), 2)
    with ThreadPoolExecutor(workers) as pool:
        t0 = time.perf_counter()
        list(pool.map(decoding.model_input, jobs, [size] * n))
        out["threads_images_per_s"] = round(n / (time.perf_counter() - t0), 2)
    with decoding.start(workers) as procs:
        list(procs.map(decoding.model_input, jobs[:workers], [size] * workers))  # start-up and imports
        t0 = time.perf_counter()
        list(procs.map(decoding.model_input, jobs, [size] * n))
        out["processes_images_per_s"] = round(n / (time.perf_counter() - t0), 2)
    return out


def run(rows: int = 2500, cols: int = 2048, repeats: int = 5, threads: int = 2, work: Path | None = None) -> dict:
    """The decoder benchmark; returns its JSON-able result with the fastest correct plugin per syntax."""
    tmp = tempfile.TemporaryDirectory(prefix="bench-decode-") if work is None else None
    root = Path(tmp.name) if tmp is not None else Path(work or ".")
    try:
        out: dict = {"benchmark": "decode", "repeats": repeats, "cases": [], "fastest": {}}
        for name, path, ref in make_files(root, rows, cols):
            tsuid = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
            plugins = get_decoder(tsuid).available_plugins
            case: dict[str, Any] = {"case": name, "transfer_syntax": str(tsuid), "mb": round(path.stat().st_size / 2**20, 2),
                    "plugins": {}}
            for _ in range(repeats):  # interleaved, so drift falls on every plugin alike
                for plugin in plugins:
                    entry = case["plugins"].setdefault(plugin, {"seconds": [], "cpu_seconds": [], "correct": None})
                    t0, c0 = time.perf_counter(), time.process_time()
                    try:
                        arr = _decode(path, plugin)
                    except Exception as exc:  # noqa: BLE001  a third-party plugin that cannot do this syntax or bit depth: recorded, whatever it raises
                        entry["error"] = f"{type(exc).__name__}: {exc}"[:200]
                        continue
                    entry["seconds"].append(time.perf_counter() - t0)
                    entry["cpu_seconds"].append(time.process_time() - c0)
                    if entry["correct"] is None:
                        entry["correct"] = bool(arr.shape == ref.shape and np.array_equal(arr, ref))
            for plugin, entry in case["plugins"].items():
                secs, cpu = entry.pop("seconds"), entry.pop("cpu_seconds")
                if secs:
                    entry["ms"] = round(1000 * statistics.median(secs), 1)
                    entry["cpu_ms"] = round(1000 * statistics.median(cpu), 1)
                if secs and threads > 0:
                    # Do decodes in threads overlap? (does the plugin release the GIL)
                    with ThreadPoolExecutor(threads) as pool:
                        t0 = time.perf_counter()
                        list(pool.map(lambda _, path=path, plugin=plugin: _decode(path, plugin), range(2 * threads)))
                        entry["threaded_speedup"] = round(2 * threads * entry["ms"] / 1000 / (time.perf_counter() - t0), 2)
            if threads > 0:
                case["worker_decode"] = worker_decode(path, threads)
            # CPU time decides: decoding is single-threaded, and CPU time is what other processes on a
            # shared machine disturb least.
            good = {p: e["cpu_ms"] for p, e in case["plugins"].items() if e.get("correct") and "cpu_ms" in e}
            case["fastest_correct"] = min(good, key=good.__getitem__) if good else None
            out["cases"].append(case)
            if case["fastest_correct"]:
                out["fastest"].setdefault(str(tsuid), []).append(case["fastest_correct"])
        return out
    finally:
        if tmp:
            tmp.cleanup()
