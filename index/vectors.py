"""FAISS index over box centers: exact below a size, HNSW (or IVF) above, recall measurable.

Exact search (IndexFlatL2) costs O(n d) per query: about 0.2 ms at 10k and 3 ms at 100k cases
of d = 128 on one core (measured by `medsam2-cxr index evaluate`), small beside the rest of a
job, and it finds every candidate the box rerank should see; HNSW at 100k phantom-like cases
recalled only 0.87 of the 64 exact candidates at efSearch 128. So exact search is kept up to
EXACT_BELOW cases (about 128 MB of centers), and `auto` builds HNSW from there on: its query
time grows with log n and it needs no training, so cases can be appended one site at a time.
IVF is kept for comparison (it needs a training pass and re-clustering as the index grows).

Vector ids are positions 0..n-1 in the case store, in insertion order: FAISS numbers added
vectors the same way, so no id map is needed, and a file that disagrees with the store's count
is rebuilt from the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

EXACT_BELOW = 250_000  # cases; see `medsam2-cxr index evaluate` for the latency and recall that chose it
_PARALLEL_FROM = 16  # queries per call from which FAISS's OpenMP threads pay off
KINDS = ("auto", "flat", "hnsw", "ivf")


@dataclass(frozen=True)
class VectorConfig:
    kind: str = "auto"  # auto: flat below exact_below, hnsw at or above
    exact_below: int = EXACT_BELOW
    hnsw_m: int = 32  # links per node: recall vs memory
    ef_construction: int = 100
    ef_search: int = 256  # candidates explored per query: recall vs time
    ivf_nprobe: int = 16

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"vector index kind {self.kind!r}: choose one of {KINDS}")

    def resolve(self, n: int) -> str:
        if self.kind != "auto":
            return self.kind
        return "flat" if n < self.exact_below else "hnsw"


class VectorIndex:
    """A thin wrapper that knows which FAISS structure it holds and how to search it."""

    def __init__(self, index: faiss.Index, kind: str, config: VectorConfig) -> None:
        self.index, self.kind, self.config = index, kind, config

    @classmethod
    def build(cls, x: np.ndarray, config: VectorConfig = VectorConfig(), kind: str | None = None) -> VectorIndex:
        """An index over x (n, d); kind overrides the config's choice (for measuring recall)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, d = x.shape
        kind = kind or config.resolve(n)
        index: Any  # the FAISS class depends on kind
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, config.hnsw_m)
            index.hnsw.efConstruction = config.ef_construction
            index.hnsw.efSearch = config.ef_search
        elif kind == "ivf":
            if n < 64:
                raise ValueError(f"IVF needs at least 64 vectors to train, got {n}; use flat")
            nlist = int(max(8, min(4 * np.sqrt(n), n // 39)))  # FAISS wants >= 39 points per list
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            index.train(x)
            index.nprobe = min(config.ivf_nprobe, nlist)
        else:
            raise ValueError(f"vector index kind {kind!r}: choose one of {KINDS[1:]}")
        if n:
            index.add(x)
        return cls(index, kind, config)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def add(self, x: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(x, dtype=np.float32))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances, positions), each (q, k'), k' = min(k, ntotal); nearest first."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query of dimension {q.shape[1]}, the index holds {self.dim}")
        k = min(int(k), self.ntotal)
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if len(q) >= _PARALLEL_FROM:
            return self.index.search(q, k)
        # One query: OpenMP threads cost more than they save (24 ms instead of 0.2 ms measured at
        # 10k cases on 2 busy cores). The setting is shared with torch's OpenMP, so it is restored.
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return self.index.search(q, k)
        finally:
            faiss.omp_set_num_threads(before)

    def save(self, path: Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        faiss.write_index(self.index, str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, config: VectorConfig = VectorConfig()) -> VectorIndex:
        index = faiss.read_index(str(path))
        if isinstance(index, faiss.IndexHNSWFlat):
            index.hnsw.efSearch = config.ef_search
            kind = "hnsw"
        elif isinstance(index, faiss.IndexIVFFlat):
            index.nprobe = min(config.ivf_nprobe, index.nlist)
            kind = "ivf"
        elif isinstance(index, faiss.IndexFlatL2):
            kind = "flat"
        else:
            raise ValueError(f"{path}: unexpected FAISS index type {type(index).__name__}")
        return cls(index, kind, config)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k (the usual ANN recall@k)."""
    k = exact.shape[1]
    hits = [len(set(a[a >= 0].tolist()) & set(e.tolist())) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k)
