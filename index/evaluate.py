"""The measured figures of issue 4, on phantoms: `medsam2-cxr index evaluate --out DIR`.

1. Report label-F1 of drafts against the phantom reference reports (test split, patient-disjoint
   from the index): the same report labeler reads both, labels are binarised with "uncertain"
   (-1) counted as positive (CheXpert's U-Ones; U-Zeros is reported beside it), micro F1 over all
   (report, label) cells and macro F1 over the labels that have a positive reference. Drafters:
   box-latent RAG (box rerank), RAG with center-only retrieval, the findings-only drafter (no
   retrieval), and the Bootstrapping-style baseline (templates -> rank -> refine on center-only
   probabilities; no box, no retrieval; index/draft.py says exactly what it does).
2. Precision@5: share of the 5 retrieved cases that share at least one of the query's true
   positive findings (No Finding counts as a finding for normal queries), box rerank vs center.
3. Latency of one retrieval + draft at each index size; sizes past the phantom index are filled
   with synthetic cases: copies of the phantom cases with jittered boxes (center + N(0, (0.25
   sd)^2) per axis, radius x exp(N(0, 0.1^2))), which keeps the geometry and the report text real.
4. Recall@k of HNSW and IVF against exact search on those indexes.
5. Source selection (function A): one phantom site per device (phantoms.DEVICES); each site
   in turn is the target, the other four the candidate sources; sources are ranked by box coverage
   of the target's (unlabelled) images, a B4 head is trained on each source's cached features
   (3 seeds) and its macro-AUROC measured on the target. Reported: top-ranked vs a random source
   (the mean over sources), the best source, and Spearman's rho of coverage against AUROC; the
   primary score is coverage (index/sources.py), the symmetric overlap is reported beside it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from scipy.stats import spearmanr
from tqdm import tqdm

from index.build import Item, build_index, phantom_items
from index.draft import Draft, Drafter, bootstrap_draft
from index.labelers.common import binarize as binarize_value
from index.retrieval import CaseIndex, Retriever, Similar
from index.sources import BoxSet, default_beta, rank_sources
from index.store import new_case
from index.vectors import VectorConfig, VectorIndex, recall_at_k
from models.calibration import calibrated
from models.labels import LABELS
from models.prediction import Prediction

log = structlog.get_logger()


@dataclass(frozen=True)
class EvalConfig:
    n_bundle: int = 400  # phantoms the default tiny bundle is trained on, when no bundle is given
    n_index: int = 1000
    n_test: int = 200
    n_site: int = 160  # phantoms per device site, source selection
    render_size: int = 256
    k: int = 5
    candidates: int = 64
    latency_sizes: tuple[int, ...] = (1000, 10000, 100000)
    latency_queries: int = 50
    recall_ks: tuple[int, ...] = (5, 64)
    head_seeds: int = 3
    extractor: str = "lexicon"
    seed: int = 0
    drafters: tuple[str, ...] = field(default=("rag_box", "rag_center", "findings_only", "bootstrap"))


# ---------------------------------------------------------------- metrics

def binarize(labels: dict, uncertain_as: int) -> np.ndarray:
    """The 14 labels of a dict as 1 / 0 (index.labelers.common.binarize per label)."""
    return np.array([binarize_value(labels.get(k), uncertain_as) for k in LABELS])


def label_f1(ref: np.ndarray, hyp: np.ndarray) -> dict:
    """Micro F1 over all cells; macro F1 over labels with at least one positive reference."""
    tp = ((ref == 1) & (hyp == 1)).sum(0)
    fp = ((ref == 0) & (hyp == 1)).sum(0)
    fn = ((ref == 1) & (hyp == 0)).sum(0)
    micro = float(2 * tp.sum() / max(2 * tp.sum() + fp.sum() + fn.sum(), 1))
    per: dict[str, float | None] = {}
    for j, k in enumerate(LABELS):
        if ref[:, j].sum() == 0:
            per[k] = None
            continue
        per[k] = float(2 * tp[j] / max(2 * tp[j] + fp[j] + fn[j], 1))
    scored = [v for v in per.values() if v is not None]
    return {"micro_f1": micro, "macro_f1": float(np.mean(scored)) if scored else float("nan"),
            "labels_scored": len(scored), "per_label": per}


def positive_set(labels: Mapping[str, int | None]) -> set[str]:
    pos = {k for k in LABELS if k != "No Finding" and labels.get(k) in (1, -1)}
    return pos or {"No Finding"}


def precision_at_k(queries: list[dict], retrieved: list[list[Similar]]) -> dict:
    share = [float(np.mean([bool(positive_set(s.case.labels) & positive_set(q)) for s in r])) if r else 0.0
             for q, r in zip(queries, retrieved)]
    exact = [float(np.mean([positive_set(s.case.labels) == positive_set(q) for s in r])) if r else 0.0
             for q, r in zip(queries, retrieved)]
    return {"shares_a_positive_finding": float(np.mean(share)), "same_finding_set": float(np.mean(exact))}


# ---------------------------------------------------------------- steps

def _bundle(out: Path, cfg: EvalConfig, bundle_dir: Path | None, cache_dir: Path | None):
    from model_training.default_bundle import build_default_bundle
    from models.bundle import load_bundle

    if bundle_dir is None:
        bundle_dir = out / "bundle"
        if not (bundle_dir / "model_card.json").exists():
            build_default_bundle(bundle_dir, n=cfg.n_bundle, seed=cfg.seed, spec="tiny", render_size=cfg.render_size,
                                 cache_dir=cache_dir, device="cpu")
    return load_bundle(bundle_dir)


def predict(bundle, items: list[Item], batch: int = 16) -> list[Prediction]:
    """Full predictions (BL-TTA, calibration, tiers, OOD) as the node makes them; no saliency."""
    from models.predictor import Predictor

    predictor = Predictor(bundle, device="cpu")
    out: list[Prediction] = []
    for s in tqdm(range(0, len(items), batch), desc="test predictions", unit="batch", mininterval=2.0):
        out += predictor.predict([it.load() for it in items[s:s + batch]], saliency_top=0)
    return out


def point_probabilities(bundle, pred: Prediction) -> dict[str, float]:
    """Center-only (no box) probabilities for the Bootstrapping-style baseline."""
    with torch.no_grad():
        logits = calibrated(bundle.head.logits(torch.as_tensor(pred.center[None], dtype=torch.float32)),
                            bundle.temperature, bundle.bias)
    p = torch.sigmoid(logits)[0].numpy()
    return dict(zip(LABELS, map(float, p)))


def synthetic_cases(index: CaseIndex, n: int, seed: int) -> list:
    """n jittered copies of the index's cases (see the module docstring)."""
    rng = np.random.default_rng(seed)
    base = index.store.get(list(range(len(index))))
    sd = index.store.centers.std(0) * 0.25
    out = []
    for i in range(n):
        c = base[i % len(base)]
        center = c.center + rng.normal(0, 1, c.center.shape).astype(np.float32) * sd
        radius = c.radius * np.exp(rng.normal(0, 0.1, c.radius.shape)).astype(np.float32)
        out.append(new_case(c.report, c.labels, center, radius, "synthetic"))
    return out


def latency_and_recall(index: CaseIndex, preds: list[Prediction], drafter: Drafter, digest: str,
                       cfg: EvalConfig, work: Path) -> tuple[list[dict], list[dict]]:
    """Per size: retrieval + draft latency (auto vector index) and ANN recall against exact."""
    lat, rec = [], []
    queries = preds[: cfg.latency_queries]
    centers = np.stack([p.center for p in preds]).astype(np.float32)
    for size in cfg.latency_sizes:
        folder = work / f"latency-{size}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(index.root, folder)
        big = CaseIndex.open(folder, VectorConfig(exact_below=10**12))  # exact while filling
        extra = max(0, size - len(big))
        t0 = time.perf_counter()
        for s in range(0, extra, 20000):
            big.store.add(synthetic_cases(index, min(20000, extra - s), seed=cfg.seed + size + s))
        fill_s = time.perf_counter() - t0
        n = len(big.store)
        exact = VectorIndex.build(big.store.centers, kind="flat")
        kinds = {"flat": exact}
        t0 = time.perf_counter()
        kinds["hnsw"] = VectorIndex.build(big.store.centers, kind="hnsw")
        build_s = {"hnsw": time.perf_counter() - t0}
        if n >= 64:
            t0 = time.perf_counter()
            kinds["ivf"] = VectorIndex.build(big.store.centers, kind="ivf")
            build_s["ivf"] = time.perf_counter() - t0
        auto = VectorConfig().resolve(n)
        row = {"cases": n, "synthetic_cases": extra, "vector_index": auto, "fill_s": round(fill_s, 1)}
        for kind, vec in kinds.items():
            big.vectors = vec
            retriever = Retriever(big, mode="box", candidates=cfg.candidates)
            for p in queries[:5]:  # warm-up: sentence labels cached, pages in memory
                drafter.draft(p, retriever.search(p.center, p.radius, digest, k=cfg.k))
            times, search_times = [], []
            for p in queries:
                t0 = time.perf_counter()
                sim = retriever.search(p.center, p.radius, digest, k=cfg.k)
                t1 = time.perf_counter()
                drafter.draft(p, sim)
                times.append(time.perf_counter() - t0)
                search_times.append(t1 - t0)
            row[kind] = {"median_ms": round(1e3 * float(np.median(times)), 2),
                         "p95_ms": round(1e3 * float(np.percentile(times, 95)), 2),
                         "retrieval_median_ms": round(1e3 * float(np.median(search_times)), 2)}
        lat.append(row)
        for k in cfg.recall_ks:
            _, truth = exact.search(centers, k)
            r: dict[str, Any] = {"cases": n, "k": k}
            for kind in ("hnsw", "ivf"):
                if kind in kinds:
                    r[kind] = round(recall_at_k(kinds[kind].search(centers, k)[1], truth), 4)
            r["build_s"] = {kk: round(v, 1) for kk, v in build_s.items()}
            rec.append(r)
        big.store.close()
        shutil.rmtree(folder, ignore_errors=True)
    return lat, rec


def source_selection(bundle, cfg: EvalConfig, cache_dir: Path | None) -> dict:
    import phantoms
    from model_training.measure import score
    from model_training.metrics import macro_auroc
    from model_training.train import VARIANTS, FeatureSet, fit_head
    from models.features import FeatureExtractor

    sites: dict[str, dict[str, Any]] = {}
    extract = FeatureExtractor(bundle.encoder, bundle.image_size, bundle.card["encoder"]["checkpoint_digest"], cache_dir)
    for j, dev in enumerate(phantoms.DEVICES):
        cases = phantoms.sample_cases(cfg.n_site, 3000 + 10 * cfg.seed + j, devices=(dev,))
        items = list(phantom_items(cases, seed=3000 + 10 * cfg.seed + j, size=cfg.render_size, source=dev.name))
        x = extract(((it.key, it.load) for it in items), len(items), f"site {dev.name}")
        y = np.array([[np.nan if c.manifest_labels()[k] == -1 else float(c.manifest_labels()[k]) for k in LABELS]
                      for c in cases])
        with torch.no_grad():
            c_, r_ = bundle.head(torch.as_tensor(x))
        sites[dev.name] = {"x": x, "y": y, "boxes": BoxSet(c_.numpy(), r_.numpy()),
                           "patients": np.array([c.patient_id for c in cases])}
    heads = {name: [fit_head(FeatureSet(s["x"], s["y"], s["patients"]), VARIANTS["B4"], seed)
                    for seed in range(cfg.head_seeds)] for name, s in sites.items()}
    beta = default_beta(*(s["boxes"] for s in sites.values()))
    auroc: dict[str, dict[str, float]] = {}
    for target, t in sites.items():
        auroc[target] = {name: float(np.mean([macro_auroc(t["y"], score(h, t["x"], 8).probabilities(np.ones(len(LABELS)), np.zeros(len(LABELS))))[0]
                                              for h in heads[name]])) for name in sites if name != target}
    out = {"sites": {n: int(len(s["x"])) for n, s in sites.items()},
           "head": f"B4 box head, {cfg.head_seeds} seeds averaged, trained on all of a source site's images",
           "radius_median_by_site": {n: round(float(np.median(s["boxes"].radii)), 4) for n, s in sites.items()}}
    for method in ("coverage", "overlap"):  # coverage is the primary score; overlap is reported beside it
        per_target: list[dict[str, Any]] = []
        for target, t in sites.items():
            others = {n: s["boxes"] for n, s in sites.items() if n != target}
            ranked = rank_sources(t["boxes"], others, beta=beta, score=method)
            a = auroc[target]
            cov = {s.name: s.coverage for s in ranked}
            rho = spearmanr([cov[n] for n in others], [a[n] for n in others]).statistic
            top = ranked[0].name
            per_target.append({
                "target": target, "ranking": [{"source": s.name, "score": round(s.coverage, 4),
                                               "auroc": round(a[s.name], 4)} for s in ranked],
                "top_ranked": top, "top_ranked_auroc": round(a[top], 4),
                "random_source_auroc": round(float(np.mean(list(a.values()))), 4),
                "best_source": max(a, key=a.__getitem__), "best_auroc": round(max(a.values()), 4),
                "spearman_rho": round(float(rho), 3),
            })
        gains = [p["top_ranked_auroc"] - p["random_source_auroc"] for p in per_target]
        out[method] = {
            "per_target": per_target,
            "mean_gain_top_vs_random": round(float(np.mean(gains)), 4),
            "targets_where_top_beats_random": int(sum(g > 0 for g in gains)),
            "targets_where_top_is_best": int(sum(p["top_ranked"] == p["best_source"] for p in per_target)),
            "mean_spearman_rho": round(float(np.mean([p["spearman_rho"] for p in per_target])), 3),
            "targets": len(per_target),
        }
    return out


def _example(cases, drafts: dict[str, list[Draft]], cfg: EvalConfig, bundle, retriever: Retriever,
             drafter: Drafter) -> dict:
    """One drafted report for a phantom with pleural effusion and cardiomegaly, whole."""
    import phantoms

    def both(c) -> bool:
        return c.labels["Pleural Effusion"] == 1 and c.labels["Cardiomegaly"] == 1

    idx = [i for i, c in enumerate(cases) if both(c)]
    if idx:
        i = max(idx, key=lambda j: sum(drafts["rag_box"][j].status.get(k) in ("present", "probable", "possible")
                                       for k in ("Pleural Effusion", "Cardiomegaly")))
        return {"source": "test split", "reference": cases[i].report, "draft": drafts["rag_box"][i].text(),
                "study": i}
    extra = [c for c in phantoms.sample_cases(2000, 4000 + cfg.seed) if both(c)][:1]
    if not extra:
        return {"error": "no phantom with both findings among 2,000 samples"}
    item = next(phantom_items(extra, seed=4000 + cfg.seed, size=cfg.render_size))
    pred = predict(bundle, [item])[0]
    draft = drafter.draft(pred, retriever.search(pred.center, pred.radius, bundle.digest, k=cfg.k))
    return {"source": "extra phantom (seed 4000)", "reference": extra[0].report, "draft": draft.text()}


def run_evaluation(out: Path, cfg: EvalConfig = EvalConfig(), bundle_dir: Path | None = None,
                   cache_dir: Path | None = None) -> dict:
    """Everything above; writes out/metrics.json, out/table.md and out/example_report.txt."""
    import phantoms
    from index.labelers import get_extractor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = cache_dir or out / "cache"
    t_start = time.perf_counter()
    timing: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timing[name] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    bundle = _bundle(out, cfg, bundle_dir, cache_dir)
    lap("bundle_s", t0)

    t0 = time.perf_counter()
    index_dir = out / "index"
    shutil.rmtree(index_dir, ignore_errors=True)
    index_cases = phantoms.sample_cases(cfg.n_index, 1000 + cfg.seed)
    labeler = get_extractor(cfg.extractor)
    build_index(index_dir, bundle, list(phantom_items(index_cases, seed=1000 + cfg.seed, size=cfg.render_size)),
                cache_dir=cache_dir)
    index = CaseIndex.open(index_dir)
    lap("index_build_s", t0)

    t0 = time.perf_counter()
    test_cases = phantoms.sample_cases(cfg.n_test, 2000 + cfg.seed)
    test_items = list(phantom_items(test_cases, seed=2000 + cfg.seed, size=cfg.render_size))
    preds = predict(bundle, test_items)
    lap("test_predictions_s", t0)

    t0 = time.perf_counter()
    drafter = Drafter(labeler)
    box = Retriever(index, mode="box", candidates=cfg.candidates)
    center = Retriever(index, mode="center")
    sim_box = [box.search(p.center, p.radius, bundle.digest, k=cfg.k) for p in preds]
    sim_center = [center.search(p.center, p.radius, bundle.digest, k=cfg.k) for p in preds]
    thresholds = dict(zip(LABELS, map(float, bundle.thresholds)))
    drafts = {
        "rag_box": [drafter.draft(p, s) for p, s in zip(preds, sim_box)],
        "rag_center": [drafter.draft(p, s) for p, s in zip(preds, sim_center)],
        "findings_only": [drafter.draft(p, None) for p in preds],
        "bootstrap": [bootstrap_draft(point_probabilities(bundle, p), thresholds) for p in preds],
    }
    f1: dict = {}
    ref_labels = {}
    for name in ("lexicon", "grammar"):
        lab = get_extractor(name)
        refs = ref_labels[name] = [lab(c.report) for c in test_cases]
        f1[name] = {}
        for drafter_name, ds in drafts.items():
            hyps = [lab(d.report()) for d in ds]
            f1[name][drafter_name] = {
                "uncertain_as_positive": label_f1(np.stack([binarize(r, 1) for r in refs]), np.stack([binarize(h, 1) for h in hyps])),
                "uncertain_as_negative": label_f1(np.stack([binarize(r, 0) for r in refs]), np.stack([binarize(h, 0) for h in hyps])),
            }
    agree = float(np.mean([a[k] == b[k] for a, b in zip(ref_labels["lexicon"], ref_labels["grammar"]) for k in LABELS]))
    truth = [c.manifest_labels() for c in test_cases]
    ref_vs_truth = label_f1(np.stack([binarize(t, 1) for t in truth]),
                            np.stack([binarize(r, 1) for r in ref_labels[cfg.extractor]]))
    p_at_k = {"box": precision_at_k(truth, sim_box), "center": precision_at_k(truth, sim_center)}
    sim_cond = [Retriever(index, mode="box", score="conditional", candidates=cfg.candidates)
                .search(p.center, p.radius, bundle.digest, k=cfg.k) for p in preds]
    p_at_k["box_conditional"] = precision_at_k(truth, sim_cond)
    retrieved_sentences = sum(s.origin.startswith("case") for d in drafts["rag_box"] for s in d.statements)
    lap("drafts_and_f1_s", t0)

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out) as work:
        latency, recall = latency_and_recall(index, preds, drafter, bundle.digest, cfg, Path(work))
    lap("latency_and_recall_s", t0)

    t0 = time.perf_counter()
    sources = source_selection(bundle, cfg, cache_dir)
    lap("source_selection_s", t0)

    example = _example(test_cases, drafts, cfg, bundle, box, drafter)
    timing["total_s"] = round(time.perf_counter() - t_start, 1)
    metrics = {
        "config": asdict(cfg),
        "bundle": {"digest": bundle.digest, "encoder": bundle.card["encoder"].get("spec"),
                   "training_data": bundle.card.get("training_data")},
        "index": {"cases": len(index), "vector_index": index.vectors.kind, "sources": index.store.sources(),
                  "beta": box.beta},
        "test": {"cases": len(test_cases), "out_of_distribution": int(sum(p.out_of_distribution for p in preds))},
        "label_f1": f1,
        "labelers_agree_on_reference_cells": agree,
        "reference_labels_vs_phantom_truth": {"micro_f1": ref_vs_truth["micro_f1"], "macro_f1": ref_vs_truth["macro_f1"]},
        "uncertain": "counted as positive (U-Ones) in the headline figures; uncertain_as_negative beside them",
        "retrieved_sentences_in_rag_drafts": int(retrieved_sentences),
        "precision_at_5": p_at_k,
        "latency": latency,
        "latency_note": "one retrieval (box rerank of 64 center candidates) + one draft, single query, warm caches; "
                        "cases beyond the phantom index are synthetic (jittered copies)",
        "ann_recall": recall,
        "source_selection": sources,
        "example": example,
        "timing": timing,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    (out / "table.md").write_text(table(metrics))
    (out / "example_report.txt").write_text(f"REFERENCE REPORT:\n{example.get('reference', '')}\n\nDRAFT:\n{example.get('draft', '')}\n")
    return metrics


def table(m: dict) -> str:
    """The figures as Markdown tables."""
    lines = ["# Similar cases and draft reports on phantoms", "",
             f"Index: {m['index']['cases']} phantom cases ({m['index']['vector_index']}), test split: "
             f"{m['test']['cases']} phantoms (other patients), bundle {m['bundle']['digest'][:12]} "
             f"({m['bundle']['encoder']} encoder).", "",
             "## Report label-F1 (drafts vs reference reports; uncertain = positive)", "",
             f"The two labelers agree on {100 * m['labelers_agree_on_reference_cells']:.1f}% of the reference cells; "
             f"the {m['config']['extractor']} labels of the references against the phantom truth: micro F1 "
             f"{m['reference_labels_vs_phantom_truth']['micro_f1']:.3f}.", "",
             "| drafter | micro F1 (lexicon) | macro F1 (lexicon) | micro F1 (grammar) | macro F1 (grammar) | micro F1, uncertain = negative (lexicon) |",
             "| --- | --- | --- | --- | --- | --- |"]
    names = {"rag_box": "box-latent RAG (box rerank)", "rag_center": "RAG, center-only retrieval",
             "findings_only": "findings only (no retrieval)", "bootstrap": "Bootstrapping-style baseline"}
    for key, label in names.items():
        lx, gr = m["label_f1"]["lexicon"][key], m["label_f1"]["grammar"][key]
        lines.append(f"| {label} | {lx['uncertain_as_positive']['micro_f1']:.3f} | {lx['uncertain_as_positive']['macro_f1']:.3f} "
                     f"({lx['uncertain_as_positive']['labels_scored']} labels) | {gr['uncertain_as_positive']['micro_f1']:.3f} | "
                     f"{gr['uncertain_as_positive']['macro_f1']:.3f} | {lx['uncertain_as_negative']['micro_f1']:.3f} |")
    pk = m["precision_at_5"]
    lines += ["", "## Retrieval precision@5", "", "| retrieval | shares a positive finding | same finding set |",
              "| --- | --- | --- |"]
    for key, label in (("box", "box rerank (overlap)"), ("box_conditional", "box rerank (P(query | case))"),
                       ("center", "center only")):
        lines.append(f"| {label} | {pk[key]['shares_a_positive_finding']:.3f} | {pk[key]['same_finding_set']:.3f} |")
    lines += ["", "## Latency of one retrieval + draft (ms; synthetic cases past the phantom index)", "",
              "| cases | auto index | auto median | auto p95 | flat median | hnsw median | ivf median | retrieval only (auto) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in m["latency"]:
        auto = r[r["vector_index"]]
        lines.append(f"| {r['cases']} | {r['vector_index']} | {auto['median_ms']} | {auto['p95_ms']} | "
                     f"{r['flat']['median_ms']} | {r['hnsw']['median_ms']} | {r.get('ivf', {}).get('median_ms', '-')} | "
                     f"{auto['retrieval_median_ms']} |")
    lines += ["", "## Approximate search recall@k against exact", "", "| cases | k | HNSW | IVF | build s |",
              "| --- | --- | --- | --- | --- |"]
    for r in m["ann_recall"]:
        lines.append(f"| {r['cases']} | {r['k']} | {r.get('hnsw', '-')} | {r.get('ivf', '-')} | {r['build_s']} |")
    for method, title in (("coverage", "coverage Vol(t ∧ s)/Vol(t), primary"), ("overlap", "symmetric overlap, secondary")):
        s = m["source_selection"][method]
        lines += ["", f"## Source selection, one phantom site per device ({title})", "",
                  "| target | top-ranked source | its AUROC | random source (mean) | best source | best AUROC | Spearman rho |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for p in s["per_target"]:
            lines.append(f"| {p['target']} | {p['top_ranked']} | {p['top_ranked_auroc']:.3f} | {p['random_source_auroc']:.3f} | "
                         f"{p['best_source']} | {p['best_auroc']:.3f} | {p['spearman_rho']:.2f} |")
        lines += ["", f"Top-ranked beats a random source on {s['targets_where_top_beats_random']} of {s['targets']} targets "
                  f"(mean gain {s['mean_gain_top_vs_random']:+.4f} macro-AUROC); top-ranked is the best source on "
                  f"{s['targets_where_top_is_best']}; mean Spearman rho {s['mean_spearman_rho']:+.3f}."]
    lines += ["", f"Total time {m['timing']['total_s']:.0f} s ({m['timing']})."]
    return "\n".join(lines) + "\n"
