"""Source selection (the paper's function A): which training source covers a target site best.

Each candidate source (a dataset, an institution, a device) and the target site are sets of
boxes from the same model bundle. A source covers a target box t as much as the best of its boxes
s does: the share of t inside s, Vol(t ∧ s) / Vol(t) = P(s | t) in the notation of
../shared/docs/method.md, with Gumbel-soft volumes (hard 128-d intersections are almost always
empty). Taking the best single box is a lower bound on the coverage by the union of the source's
boxes, whose volume has no closed form. Scores are per-axis geometric means, exp(log P / d),
averaged over the target's boxes. Only the k nearest source centers of each target box are
scored (FAISS), which is where the best box lies unless radii differ wildly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from index import boxes
from index.vectors import VectorConfig, VectorIndex


@dataclass(frozen=True)
class SourceScore:
    name: str
    coverage: float  # mean over target boxes of the best per-axis covered share, in (0, 1]
    n_boxes: int  # boxes in the source


@dataclass(frozen=True)
class BoxSet:
    centers: np.ndarray  # (n, d)
    radii: np.ndarray  # (n, d)

    def __post_init__(self) -> None:
        if self.centers.shape != self.radii.shape or self.centers.ndim != 2:
            raise ValueError(f"box set: centers {self.centers.shape} and radii {self.radii.shape} must both be (n, d)")


def default_beta(*sets: BoxSet) -> float:
    """Half the median radius over all boxes, as index.retrieval does."""
    r = np.concatenate([s.radii.reshape(-1) for s in sets])
    return float(max(np.median(r), 1e-4) * 0.5)


SCORES = ("coverage", "overlap")


def coverage(target: BoxSet, source: BoxSet, beta: float, k: int = 32, score: str = "coverage") -> np.ndarray:
    """Per target box: max over the k nearest source boxes of exp(log P(s | t) / d).

    score "overlap" uses Vol(t ∧ s) / sqrt(Vol(t) Vol(s)) instead, which does not reward a source
    for large (uncertain) boxes that contain everything.
    """
    if score not in SCORES:
        raise ValueError(f"source score {score!r}: choose one of {SCORES}")
    d = target.centers.shape[1]
    vectors = VectorIndex.build(source.centers, VectorConfig())
    _, pos = vectors.search(target.centers, k)
    out = np.empty(len(target.centers))
    for i, row in enumerate(pos):
        row = row[row >= 0]
        fn = boxes.log_conditional if score == "coverage" else boxes.log_overlap
        logp = fn(source.centers[row], source.radii[row], target.centers[i][None], target.radii[i][None], beta)
        out[i] = min(1.0, float(boxes.per_axis(np.max(logp), d)))  # soft volumes can overshoot 1 a little
    return out


def rank_sources(target: BoxSet, sources: Mapping[str, BoxSet], beta: float | None = None,
                 k: int = 32, score: str = "coverage") -> list[SourceScore]:
    """Candidate sources, best coverage of the target first.

    Raises
    ------
    ValueError
        No sources, an empty box set, or box sets of different dimensions.
    """
    if not sources:
        raise ValueError("source ranking needs at least one candidate source")
    dims = {target.centers.shape[1], *(s.centers.shape[1] for s in sources.values())}
    if len(dims) != 1:
        raise ValueError(f"box sets of different dimensions {sorted(dims)}: were they made with different bundles?")
    empty = [n for n, s in sources.items() if not len(s.centers)] + (["target"] if not len(target.centers) else [])
    if empty:
        raise ValueError(f"empty box sets: {empty}")
    beta = beta if beta is not None else default_beta(target, *sources.values())
    scores = [SourceScore(name, float(np.mean(coverage(target, s, beta, k, score))), len(s.centers))
              for name, s in sources.items()]
    return sorted(scores, key=lambda s: -s.coverage)


def boxes_of(folder: Path, bundle, cache_dir: Path | None = None) -> BoxSet:
    """The boxes of a source or target: an index folder (stored boxes, bundle checked) or images.

    Raises
    ------
    index.retrieval.IndexMismatch
        An index folder built with another bundle than `bundle`.
    """
    from index.build import compute_boxes, manifest_items
    from index.retrieval import STORE_FILE, CaseIndex

    folder = Path(folder)
    if (folder / STORE_FILE).exists():
        index = CaseIndex.open(folder)
        index.check(bundle.digest)
        return BoxSet(index.store.centers, index.store.radii)
    c, r = compute_boxes(bundle, manifest_items(folder), cache_dir, desc=f"boxes {folder.name}")
    return BoxSet(c, r)


def rank_folders(target: Path, sources: list[Path], bundle_dir: Path, cache_dir: Path | None = None) -> list[SourceScore]:
    """What `medsam2-cxr sources rank` does: sources named by their folder names."""
    from models.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    names = [Path(s).name or str(s) for s in sources]
    if len(set(names)) != len(names):
        names = [str(s) for s in sources]
    return rank_sources(boxes_of(target, bundle, cache_dir),
                        {n: boxes_of(s, bundle, cache_dir) for n, s in zip(names, sources)})
