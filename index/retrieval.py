"""Similar prior cases: candidates by box center (FAISS), reranked by box overlap.

An index folder holds `cases.sqlite` (the store) and `centers.faiss` (the vector index). It was
built with one model bundle, whose latent space its boxes live in; a query from another bundle's
space would return nonsense ranked with confidence, so it is refused with an IndexMismatch.

Rerank scores (index/boxes.py, Gumbel-soft volumes with temperature beta):
- "overlap": Vol(q ∧ c) / sqrt(Vol(q) Vol(c)), symmetric; the default.
- "conditional": P(query | case) = Vol(q ∧ c) / Vol(c), the share of the case's box the query covers.
Similarity shown to a reader is the per-axis geometric mean exp(score / d), in (0, 1].
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from index import boxes
from index.store import Case, CaseStore
from index.vectors import VectorConfig, VectorIndex
from index.wording import ENGLISH

log = structlog.get_logger()

STORE_FILE = "cases.sqlite"
VECTORS_FILE = "centers.faiss"
MODES = ("box", "center")
SCORES = ("overlap", "conditional")
NO_INDEX = ENGLISH.no_index  # the English line; a draft takes its own wording's


class IndexMismatch(ValueError):
    """The index was built with another model bundle than the one asking."""


@dataclass(frozen=True)
class Similar:
    """One retrieved case and why: its rank, similarity in (0, 1] and center distance."""

    case: Case
    similarity: float
    distance: float
    rank: int


class CaseIndex:
    """Store + vector index in one folder; appends keep both in step."""

    def __init__(self, root: Path, store: CaseStore, vectors: VectorIndex, config: VectorConfig) -> None:
        self.root, self.store, self.vectors, self.config = Path(root), store, vectors, config
        self._lock = threading.Lock()

    @property
    def digest(self) -> str:
        return self.store.digest

    @property
    def dim(self) -> int:
        return self.store.dim

    def __len__(self) -> int:
        return self.vectors.ntotal

    @classmethod
    def create(cls, root: Path, digest: str, dim: int, config: VectorConfig = VectorConfig()) -> CaseIndex:
        root = Path(root)
        store = CaseStore.create(root / STORE_FILE, digest, dim)
        vectors = VectorIndex.build(np.zeros((0, dim), np.float32), config, kind="flat")
        vectors.save(root / VECTORS_FILE)
        return cls(root, store, vectors, config)

    @classmethod
    def open(cls, root: Path, config: VectorConfig = VectorConfig()) -> CaseIndex:
        """Open a folder; a vector file out of step with the store is rebuilt from the store."""
        root = Path(root)
        store = CaseStore.open(root / STORE_FILE)
        path = root / VECTORS_FILE
        vectors = VectorIndex.load(path, config) if path.exists() else None
        n = len(store)
        stale = (vectors is None or vectors.ntotal != n or vectors.dim != store.dim
                 or (config.kind != "auto" and vectors.kind != config.kind))
        if stale:
            log.warning("index.rebuild_vectors", folder=str(root), cases=n)
            vectors = VectorIndex.build(store.centers, config)
            vectors.save(path)
        assert vectors is not None  # not stale: loaded
        return cls(root, store, vectors, config)

    def check(self, digest: str) -> None:
        """Raises IndexMismatch unless the asking model's bundle digest is the index's."""
        if digest != self.digest:
            raise IndexMismatch(
                f"{self.root}: this index was built with model bundle {self.digest[:12]}, the query comes from "
                f"bundle {digest[:12]}; their boxes live in different latent spaces. Rebuild the index with "
                f"`medsam2-cxr index build --bundle <the bundle in use>`")

    def add(self, cases: list[Case]) -> int:
        """Append to store and vectors; switch to the approximate index when the size passes the threshold."""
        with self._lock:
            new = self.store.add(cases)
            if not new:
                return 0
            n = len(self.store)
            if self.config.resolve(n) != self.vectors.kind and self.vectors.kind in ("flat", "hnsw"):
                self.vectors = VectorIndex.build(self.store.centers, self.config)
            elif self.vectors.kind == "ivf":  # IVF lists were trained on the old data: re-cluster
                self.vectors = VectorIndex.build(self.store.centers, self.config, kind="ivf")
            else:
                self.vectors.add(self.store.centers[new])
            self.vectors.save(self.root / VECTORS_FILE)
            return len(new)

    def default_beta(self) -> float:
        """Gumbel temperature: half the median radius, so one radius of gap costs about 2 per axis."""
        r = self.store.radii
        return float(max(np.median(r), 1e-4) * 0.5) if len(r) else 0.05


class Retriever:
    """k similar cases for a query box: by center only, or center candidates reranked by overlap."""

    def __init__(self, index: CaseIndex, mode: str = "box", score: str = "overlap", candidates: int = 64,
                 beta: float | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"retrieval mode {mode!r}: choose one of {MODES}")
        if score not in SCORES:
            raise ValueError(f"rerank score {score!r}: choose one of {SCORES}")
        self.index, self.mode, self.score, self.candidates = index, mode, score, candidates
        self.beta = beta if beta is not None else index.default_beta()

    def search(self, center: np.ndarray, radius: np.ndarray, digest: str, k: int = 5) -> list[Similar]:
        """The k most similar cases, most similar first.

        Raises
        ------
        IndexMismatch
            The query's bundle is not the index's.
        """
        self.index.check(digest)
        c = np.asarray(center, np.float32).reshape(-1)
        r = np.asarray(radius, np.float32).reshape(-1)
        n_cand = k if self.mode == "center" else max(k, self.candidates)
        dist2, pos = self.index.vectors.search(c[None], n_cand)
        dist2, pos = dist2[0], pos[0]
        keep = pos >= 0
        dist2, pos = dist2[keep], pos[keep]
        if not len(pos):
            return []
        d = self.index.dim
        if self.mode == "center":
            order = np.arange(len(pos))[:k]
            # shown similarity for center mode: the overlap score too, so both modes read alike
            scores = self._scores(c, r, pos)
        else:
            scores = self._scores(c, r, pos)
            order = np.lexsort((dist2, -scores))[:k]  # best overlap first, nearer center breaks ties
        cases = self.index.store.get(pos[order])
        return [Similar(case=case, similarity=float(np.clip(boxes.per_axis(scores[i], d), 0.0, 1.0)),
                        distance=float(np.sqrt(max(dist2[i], 0.0))), rank=j + 1)
                for j, (i, case) in enumerate(zip(order, cases))]

    def _scores(self, c: np.ndarray, r: np.ndarray, pos: np.ndarray) -> np.ndarray:
        cc, rr = self.index.store.centers[pos], self.index.store.radii[pos]
        if self.score == "overlap":
            return boxes.log_overlap(c[None], r[None], cc, rr, self.beta)
        return boxes.log_conditional(c[None], r[None], cc, rr, self.beta)
