"""bench infer: the full model step against the encoder forward alone, same inputs, same batches.

The full step is what a GPU worker runs per batch, ``Predictor.predict``: resize from the
detector's matrix to the encoder's input, encoder, box head, BL-TTA (N = 8), calibration, OOD
score and Grad-CAM saliency for up to three shown findings per image. The encoder side gets the
same images already resized (``to_input`` outside the clock), so the ratio full / encoder says
what everything around the encoder costs. The worker's own step is timed too: its decode
processes resize while the previous forward runs, so its step starts from resized inputs. All
sides are timed back to back, alternating, in the same process. The bundle is written from a freshly initialised encoder and head with every
threshold at 0, so every image shows three findings: saliency at its most expensive.
"""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from models.labels import LABELS

GOAL = 0.8  # full step at least this fraction of the encoder-only rate


def write_bench_bundle(out: Path, spec: str, seed: int = 0, tta_n: int = 8) -> Path:
    """A loadable bundle for timing: fresh encoder, untrained head, thresholds 0 (all shown)."""
    from models import encoder as enc
    from models.boxhead import BoxHead, pool_features
    from models.bundle import write_bundle
    from models.predictor import to_input

    encoder = enc.build_encoder(spec, seed=seed)
    size = enc.SPECS[spec].image_size
    with torch.no_grad():
        feats = pool_features(encoder(to_input([np.zeros((size, size), np.float32)], size))["vision_features"])
    torch.manual_seed(seed)
    head = BoxHead(feats.shape[1]).eval().requires_grad_(False)
    card = {
        "name": f"bench bundle ({spec}, untrained head)",
        "version": "0.0.0",
        "manufacturer": "medsam2-cxr",
        "created": dt.datetime(2026, 1, 1, tzinfo=dt.UTC).isoformat(timespec="seconds"),
        "synthetic_training": True,
        "training_data": "none: a benchmark bundle with an untrained head, for timing only",
        "intended_use": "Benchmarks only; its outputs mean nothing.",
        "encoder": {"spec": spec, "image_size": size, "weights": f"seeded random initialisation (seed {seed})"},
        "temperatures": {k: 1.0 for k in LABELS},
        "thresholds": {k: 0.0 for k in LABELS},
        "tta": {"n": tta_n, "seed": 0},
        "ood": {"threshold": 1e9},
    }
    write_bundle(out, card, encoder, head)
    return out


def cxr_arrays(n: int, rows: int, cols: int, work: Path) -> list[np.ndarray]:
    """n decoded radiographs (float [0, 1]) at the detector's matrix, as read_image gives them."""
    import pydicom

    from bench.images import write_cxr_images
    from models.preprocess import read_image

    distinct = [read_image(pydicom.dcmread(p)) for p in write_cxr_images(work, min(n, 4), rows, cols)]
    return [distinct[i % len(distinct)] for i in range(n)]


def _timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def compare(predictor, images: Sequence[np.ndarray], batches: Sequence[int], repeats: int) -> list[dict]:
    """Per batch size: encoder-only and full-step images/s, and where the full step's time goes."""
    from models.predictor import to_input
    from models.preprocess import resize_for_model

    cuda = predictor.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    size = predictor.bundle.image_size
    rows = []
    for b in batches:
        batch = [images[i % len(images)] for i in range(b)]
        x = to_input(batch, size)
        predictor.encode(x)  # warm-up: allocator, kernels, autotuning
        predictor.predict(batch)
        sync()
        prepared = [resize_for_model(im, size) for im in batch]
        times: dict[str, list[float]] = {"enc": [], "full": [], "worker": [], "pre": []}
        for r in range(repeats):
            # The lambdas run within this iteration (B023 does not apply).
            steps: list[tuple[str, Callable[[], object]]] = [
                ("enc", lambda: predictor.encode(x)),  # noqa: B023
                ("full", lambda: predictor.predict(batch)),  # noqa: B023
                ("worker", lambda: predictor.predict(prepared))]  # noqa: B023
            for name, fn in (steps if r % 2 == 0 else steps[::-1]):
                times[name].append(_timed(fn, sync))
            times["pre"].append(_timed(lambda: to_input(batch, size), sync))  # noqa: B023  called at once
        enc, full, worker, pre = (statistics.median(times[k]) for k in ("enc", "full", "worker", "pre"))
        row = {
            "batch": b,
            "encoder_images_per_s": round(b / enc, 2),
            "full_images_per_s": round(b / full, 2),
            "ratio_full_over_encoder": round(enc / full, 3),
            # The worker's decode processes resize while the previous batch runs: its step starts
            # from resized inputs.
            "worker_step_images_per_s": round(b / worker, 2),
            "ratio_worker_step_over_encoder": round(enc / worker, 3),
            "ms_per_image": {"preprocess": round(1000 * pre / b, 2), "encoder": round(1000 * enc / b, 2),
                             "head_tta_calibration_saliency": round(1000 * max(worker - enc, 0.0) / b, 2)},
        }
        if cuda:
            row["gpu_peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()
        rows.append(row)
    return rows


def run(specs: Sequence[str] = ("t512", "tiny"), batches: Sequence[int] = (1, 8, 32), repeats: int = 3,
        device: str | None = None, rows: int = 2500, cols: int = 2048, work: Path | None = None) -> dict:
    """The infer benchmark; returns its JSON-able result."""
    from models.bundle import load_bundle
    from models.predictor import Predictor

    tmp = tempfile.TemporaryDirectory(prefix="bench-infer-") if work is None else None
    root = Path(tmp.name) if tmp is not None else Path(work or ".")
    try:
        images = cxr_arrays(max(batches), rows, cols, root / "images")
        result: dict = {"benchmark": "infer", "device": device or ("cuda" if torch.cuda.is_available() else "cpu"),
                        "torch_threads": torch.get_num_threads(), "input": f"{rows} x {cols} decoded radiographs",
                        "saliency_maps_per_image": 3, "tta_n": 8, "repeats": repeats, "specs": {}}
        for spec in specs:
            predictor = Predictor(load_bundle(write_bench_bundle(root / f"bundle-{spec}", spec)), device=device)
            result["specs"][spec] = {"image_size": predictor.bundle.image_size,
                                     "batches": compare(predictor, images, batches, repeats)}
            del predictor
        all_rows = [row for s in result["specs"].values() for row in s["batches"]]
        full = min(row["ratio_full_over_encoder"] for row in all_rows)
        worker = min(row["ratio_worker_step_over_encoder"] for row in all_rows)
        result["goal"] = {"ratio_at_least": GOAL, "min_ratio": full, "met": bool(full >= GOAL),
                          "min_ratio_worker_step": worker, "met_worker_step": bool(worker >= GOAL)}
        return result
    finally:
        if tmp:
            tmp.cleanup()
