"""How the two report labelers agree with each other and with MeSH, measured on real Open-i reports.

Figures (``metrics.json`` and ``table.md`` from :func:`write`):

- Agreement, over every (report, label) cell of the reports that have FINDINGS or IMPRESSION text,
  all 14 labels: Cohen's kappa on the 4 classes (positive / negative / uncertain / not
  mentioned: ``kappa_4class``); on "positive or uncertain" vs the rest (``kappa_binary``); on
  "mentioned" vs "not mentioned" (``kappa_mention``); the same without the derived No Finding
  column (``*_13``); per-label 4-class kappa, and raw agreement. The paper reports 0.702 for its
  two extractors without saying over which cells; ``kappa_4class`` is the closest reading.
- Against labels derived from the major MeSH tags (:func:`model_training.openi.mesh_labels`, reports
  tagged "No Indexing" left out): per label precision, recall, F1 and support, with an
  uncertain extraction counted as positive (``u_ones``, the headline) and as negative
  (``u_zeros``); "not mentioned" and negative are negative. Micro F1 pools all cells of the 14
  labels; macro F1 averages the labels that have at least one MeSH positive.
- Throughput: reports per second of each extractor over all reports, best of ``repeats`` runs
  (one process, one core), the clock passed in.

Caveat: both vocabularies were corrected after reading the two extractors' disagreements and
their differences from MeSH on the 2,637 development reports, so figures on those reports are
optimistic; the 1,318 reports kept aside (``../shared/data/README.md``) are the fair test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import cohen_kappa_score, precision_recall_fscore_support

from index.labelers import Extractor, get_extractor
from index.labelers.common import Labels, binarize
from model_training.openi import OpenIReport, mesh_labels
from models.labels import LABELS

PAPER_KAPPA = 0.702
_CODE = {1: 1, 0: 0, -1: 2, None: 3}  # 4 classes


def _codes(rows: Sequence[Labels], labels: Sequence[str] = LABELS) -> np.ndarray:
    return np.array([[_CODE[r[k]] for k in labels] for r in rows], dtype=np.int8)


def _kappa(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    if len(np.unique(np.concatenate([a, b]))) < 2:
        return float("nan")
    return float(cohen_kappa_score(a, b))


def agreement(rows_a: Sequence[Labels], rows_b: Sequence[Labels]) -> dict:
    """Cohen's kappa between two extractors' outputs for the same reports (see the module docstring)."""
    a, b = _codes(rows_a), _codes(rows_b)
    nf = LABELS.index("No Finding")
    keep = [i for i in range(len(LABELS)) if i != nf]
    pos_a, pos_b = np.isin(a, (1, 2)).astype(int), np.isin(b, (1, 2)).astype(int)
    men_a, men_b = (a != 3).astype(int), (b != 3).astype(int)
    return {
        "cells": int(a.size),
        "reports": int(a.shape[0]),
        "kappa_4class": _kappa(a, b),
        "kappa_binary": _kappa(pos_a, pos_b),
        "kappa_mention": _kappa(men_a, men_b),
        "kappa_4class_13": _kappa(a[:, keep], b[:, keep]),
        "kappa_binary_13": _kappa(pos_a[:, keep], pos_b[:, keep]),
        "raw_agreement_4class": float((a == b).mean()),
        "per_label_kappa_4class": {k: _kappa(a[:, i], b[:, i]) for i, k in enumerate(LABELS)},
        "per_label_agreement_4class": {k: float((a[:, i] == b[:, i]).mean()) for i, k in enumerate(LABELS)},
    }


def against_reference(rows: Sequence[Labels], reference: Sequence[dict[str, int]], uncertain_as: int = 1) -> dict:
    """Per-label precision / recall / F1 of extracted labels against 1/0 reference labels."""
    y = np.array([[int(r[k]) for k in LABELS] for r in reference], dtype=int)
    p = np.array([[binarize(r[k], uncertain_as) for k in LABELS] for r in rows], dtype=int)
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, average=None, zero_division=0,
                                                         labels=list(range(len(LABELS))))
    per = {k: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(sup[i]),
               "predicted": int(p[:, i].sum())} for i, k in enumerate(LABELS)}
    mp, mr, mf, _ = precision_recall_fscore_support(y, p, average="micro", zero_division=0)
    with_support = [k for k in LABELS if per[k]["support"] > 0]
    return {"per_label": per, "micro": {"precision": float(mp), "recall": float(mr), "f1": float(mf)},
            "macro_f1": float(np.mean([per[k]["f1"] for k in with_support])) if with_support else float("nan"),
            "labels_in_macro": len(with_support)}


def throughput(fn: Callable[[str], Labels], texts: Sequence[str], repeats: int = 3,
               clock: Callable[[], float] = time.perf_counter) -> dict:
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = clock()
        for t in texts:
            fn(t)
        best = min(best, clock() - t0)
    return {"reports": len(texts), "seconds": best, "reports_per_second": len(texts) / best if best > 0 else float("inf"),
            "repeats": repeats}


def evaluate(reports: Sequence[OpenIReport], extractors: Sequence[str] = ("lexicon", "grammar"), repeats: int = 3,
             clock: Callable[[], float] = time.perf_counter) -> dict:
    """All figures of the module docstring, for the first two ``extractors`` (agreement) and each one."""
    with_text = [r for r in reports if r.findings or r.impression]
    texts = [r.text for r in with_text]
    names = [Extractor(e).value for e in extractors]
    outputs = {e: [get_extractor(e)(t) for t in texts] for e in names}
    ref_idx = [i for i, r in enumerate(with_text) if mesh_labels(r) is not None]
    reference = [ref for i in ref_idx if (ref := mesh_labels(with_text[i])) is not None]
    out: dict = {
        "data": {"reports": len(reports), "reports_with_text": len(with_text),
                 "reports_with_mesh_labels": len(ref_idx),
                 "text": "FINDINGS + IMPRESSION (INDICATION and COMPARISON are not read)"},
        "paper_kappa": PAPER_KAPPA,
        "extractors": {},
    }
    if len(names) >= 2:
        out["agreement"] = {"between": names[:2], **agreement(outputs[names[0]], outputs[names[1]])}
    for e in names:
        rows = [outputs[e][i] for i in ref_idx]
        out["extractors"][e] = {
            "vs_mesh_u_ones": against_reference(rows, reference, uncertain_as=1),
            "vs_mesh_u_zeros": against_reference(rows, reference, uncertain_as=0),
            "throughput": throughput(get_extractor(e), texts, repeats=repeats, clock=clock),
            "value_counts": {str(v): int(sum(r[k] == v for r in outputs[e] for k in LABELS)) for v in (1, 0, -1, None)},
        }
    mesh_pos = np.array([[r[k] for k in LABELS] for r in reference]).sum(0) if reference else np.zeros(len(LABELS))
    out["mesh_positives"] = {k: int(v) for k, v in zip(LABELS, mesh_pos)}
    return out


def _f(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


def table(m: dict) -> str:
    names = list(m["extractors"])
    lines = [f"# Report labelers on Open-i ({m['data']['reports_with_text']} reports with text, "
             f"{m['data']['reports_with_mesh_labels']} with MeSH labels)", ""]
    if "agreement" in m:
        a = m["agreement"]
        lines += [f"Cohen's kappa, {a['between'][0]} vs {a['between'][1]}, over {a['cells']} (report, label) cells: "
                  f"4-class {_f(a['kappa_4class'])} (paper: {m['paper_kappa']}), positive-or-uncertain vs rest "
                  f"{_f(a['kappa_binary'])}, mentioned vs not {_f(a['kappa_mention'])}; without No Finding: "
                  f"4-class {_f(a['kappa_4class_13'])}, binary {_f(a['kappa_binary_13'])}.", ""]
    head = "| Label | MeSH positives |"
    sep = "| --- | ---: |"
    for e in names:
        head += f" {e} P | {e} R | {e} F1 |"
        sep += " ---: | ---: | ---: |"
    if "agreement" in m:
        head += " kappa (4-class) |"
        sep += " ---: |"
    lines += ["Against MeSH-derived labels (uncertain counted as positive):", "", head, sep]
    for k in LABELS:
        row = f"| {k} | {m['mesh_positives'][k]} |"
        for e in names:
            s = m["extractors"][e]["vs_mesh_u_ones"]["per_label"][k]
            row += f" {_f(s['precision'])} | {_f(s['recall'])} | {_f(s['f1'])} |"
        if "agreement" in m:
            row += f" {_f(m['agreement']['per_label_kappa_4class'][k])} |"
        lines.append(row)
    lines.append("")
    for e in names:
        x = m["extractors"][e]
        lines.append(f"- {e}: micro F1 {_f(x['vs_mesh_u_ones']['micro']['f1'])}, macro F1 "
                     f"{_f(x['vs_mesh_u_ones']['macro_f1'])} over {x['vs_mesh_u_ones']['labels_in_macro']} labels "
                     f"(uncertain as negative: micro {_f(x['vs_mesh_u_zeros']['micro']['f1'])}, macro "
                     f"{_f(x['vs_mesh_u_zeros']['macro_f1'])}); {x['throughput']['reports_per_second']:.0f} reports/s.")
    return "\n".join(lines) + "\n"


def write(m: dict, out: Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mj, tm = out / "metrics.json", out / "table.md"
    mj.write_text(json.dumps(m, indent=1, allow_nan=True) + "\n")
    tm.write_text(table(m))
    return mj, tm
