"""The GPU benchmark (run by bench/gpu.sh): the 512 encoder and the full model step in bf16.

For batch sizes 1, 8, 32 and 128 it reports, in one JSON object:
- encoder-only images/s with the input already on the GPU (the encoder's own limit), its
  TFLOP/s at 62.5 GFLOP per image and the fraction of the card's dense bf16 matrix rate;
- encoder-only and full-step (``Predictor.predict``) images/s from host images, from 512 px
  images (the worker resizes in its decode threads) and from detector-sized 2500 x 2048 images
  (resize in the step), with the time per image of the CPU resize;
- peak GPU memory per batch size.
It imports only what the GPU machine's image has plus the wheels gpu.sh carries (sam2, hydra),
so it makes its inputs without pydicom: smooth random images in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GFLOP_PER_IMAGE = 62.5  # the 512 encoder (../shared/docs/medsam2.md)
H200_BF16_TFLOPS = 790.0  # dense bf16 matrix rate measured on this kind of machine


def smooth_images(n: int, rows: int, cols: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random images in [0, 1]: upsampled noise, so the resize sees real structure."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        low = torch.as_tensor(rng.random((1, 1, max(2, rows // 64), max(2, cols // 64)), dtype=np.float32))
        out.append(torch.nn.functional.interpolate(low, size=(rows, cols), mode="bilinear")[0, 0].numpy())
    return out


def encoder_on_device(predictor, batch: int, repeats: int) -> dict:
    """The encoder's own rate: input already on the device, channels-last, bf16 autocast."""
    size = predictor.bundle.image_size
    x = torch.rand(batch, 3, size, size, device=predictor.device).contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        predictor.encode(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        predictor.encode(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    rate = batch / statistics.median(times)
    tflops = rate * GFLOP_PER_IMAGE / 1000
    return {"images_per_s": round(rate, 1), "tflops": round(tflops, 1),
            "fraction_of_bf16_peak": round(tflops / H200_BF16_TFLOPS, 3)}


def run(spec: str = "t512", batches: tuple[int, ...] = (1, 8, 32, 128), repeats: int = 5,
        device: str = "cuda") -> dict:
    from bench.infer import compare, write_bench_bundle
    from models.bundle import load_bundle
    from models.predictor import Predictor

    t_start = time.perf_counter()
    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        predictor = Predictor(load_bundle(write_bench_bundle(Path(tmp) / "bundle", spec)), device=device)
    size = predictor.bundle.image_size
    result: dict = {"benchmark": "gpu", "encoder": spec, "image_size": size, "torch": torch.__version__,
                    "device": torch.cuda.get_device_name() if cuda else "cpu", "precision": "bf16 autocast" if cuda else "fp32",
                    "torch_threads": torch.get_num_threads(), "gflop_per_image": GFLOP_PER_IMAGE,
                    "peak_tflops_assumed": H200_BF16_TFLOPS, "batches": {}}
    n = max(batches)
    model_size = smooth_images(n, size, size)
    detector = smooth_images(min(n, 8), 2500, 2048, seed=1)  # cycled: resize cost is per image, not per content
    for b in batches:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row: dict = {}
        if cuda:
            row["encoder_on_device"] = encoder_on_device(predictor, b, repeats)
        row["from_model_size"] = compare(predictor, model_size, [b], repeats)[0]
        row["from_2500x2048"] = compare(predictor, detector, [b], max(1, repeats // 2))[0]
        if cuda:
            row["gpu_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row["gpu_reserved_gb"] = round(torch.cuda.memory_reserved() / 2**30, 2)
        result["batches"][str(b)] = row
        print(json.dumps({"batch": b, **row}), flush=True)  # progress, in case the run is cut short
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="t512")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON object here")
    a = p.parse_args()
    result = run(a.spec, tuple(int(x) for x in a.batches.split(",")), a.repeats, a.device)
    text = json.dumps(result)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
