"""Encoder features in batches, cached on disk: what bundle training and the case index fit boxes on.

Lives beside the predictor, not in model_training/: the case index (index/build.py, which the node runs
at first start for its default index) computes its boxes through it, and it runs the predictor's
own encoder forward (models.encoder.forward), so a bundle, an index and a live query see the same
features for the same image.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import encoder as enc
from models.boxhead import pool_features
from models.predictor import to_input


class FeatureExtractor:
    """Encoder forward in batches with an on-disk cache per (encoder digest, input size, image digest).

    The forward is models.encoder.forward, the predictor's own, at models.encoder.resolve_precision
    (precision "auto": bf16 on CUDA, float32 on the CPU, as the predictor runs). Features are
    stored as float16 and always read back through float16, so a cache hit and a miss give the
    same numbers; the precision is part of the cache key.
    """

    def __init__(self, encoder: torch.nn.Module, image_size: int, encoder_digest: str, cache_dir: Path | None,
                 batch_size: int = 8, device: str | None = None, precision: str = "auto",
                 on_progress: Callable[[str, int, int], None] | None = None) -> None:
        self.size, self.batch = image_size, batch_size
        self.on_progress = on_progress  # (desc, done, total) after each image, for a progress file
        self.device = torch.device(device or "cpu")
        self.encoder = enc.place(encoder, self.device)
        self.precision = enc.resolve_precision(precision, self.device)
        self.cache = Path(cache_dir) / f"{encoder_digest[:16]}-{image_size}px-{self.precision}" if cache_dir else None
        if self.cache:
            self.cache.mkdir(parents=True, exist_ok=True)
        self.encoded = 0  # images that went through the encoder (cache misses), for timing reports

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled float32 features of a preprocessed batch (models.predictor.to_input), before storage."""
        return pool_features(enc.forward(self.encoder, x, self.device, self.precision))

    def _forward(self, x: torch.Tensor) -> np.ndarray:
        return self.pooled(x).cpu().numpy().astype(np.float16)

    def __call__(self, items: Iterable[tuple[str, Callable[[], np.ndarray]]], total: int, desc: str) -> np.ndarray:
        """items: (image digest, loader) pairs; loaders run only on a cache miss."""
        out: list[np.ndarray | None] = []
        pending: list[tuple[int, str, np.ndarray]] = []

        def flush() -> None:
            f = self._forward(to_input([img for _, _, img in pending], self.size))
            for (i, key, _), row in zip(pending, f):
                out[i] = row
                if self.cache:
                    # A temporary file of its own: two processes filling one cache (a build beside an
                    # evaluation) otherwise rename each other's file away and one fails.
                    with tempfile.NamedTemporaryFile(dir=self.cache, prefix=f"{key}.", suffix=".tmp", delete=False) as fh:
                        np.save(fh, row)
                    Path(fh.name).replace(self.cache / f"{key}.npy")
            self.encoded += len(pending)
            pending.clear()

        for i, (key, load) in enumerate(tqdm(items, total=total, desc=desc, unit="img", mininterval=2.0)):
            hit = self.cache / f"{key}.npy" if self.cache else None
            if hit is not None and hit.exists():
                out.append(np.load(hit).astype(np.float16))
                continue
            out.append(None)
            pending.append((i, key, load()))
            if len(pending) == self.batch:
                flush()
            if self.on_progress is not None:
                self.on_progress(desc, i + 1 - len(pending), total)
        if pending:
            flush()
        if self.on_progress is not None:
            self.on_progress(desc, len(out), total)
        if not out:
            return np.zeros((0, 0), np.float32)
        return np.stack(out).astype(np.float32)  # type: ignore[arg-type]
