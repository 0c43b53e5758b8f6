"""The `medsam2-cxr evaluate` engine: every variant, every seed, every figure of the paper's table.

One patient-level split (by --split-seed) is shared by all variants and seeds; a seed changes the
head's initialisation, minibatch order and in-box samples. Encoder features are extracted once
(cached on disk) for: all images, one device-shifted copy of the training images (B5), the test
images at each shift intensity, and each OOD set. Heads then train in seconds each.

Writes metrics.json (one entry per variant), table.md (laid out like the paper's Table 2) and
PNG plots into the output folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from tqdm import tqdm

from imagedata.item import Item
from model_training import metrics, plots
from model_training.data import TRAIN_SHIFT_RANGE, Dataset
from model_training.measure import measure, public
from model_training.train import (
    VARIANTS,
    FeatureSet,
    build_description,
    calibrate,
    fit_head,
    out_of_fold,
    text_features,
)
from models import operating_points
from models.features import FeatureExtractor
from models.labels import LABELS

log = structlog.get_logger()

SHIFT_OOD = "device_shift_2x"
NAMES = {
    "B0": "B0 linear probe",
    "B1": "B1 Merlin-style",
    "B2": "B2 Bootstrapping-style",
    "B3": "B3 box, center only",
    "B4": "B4 box + BL-TTA",
    "B5": "B5 full (box + BL-TTA + invariance + calibration)",
}
PAPER = {  # ../shared/docs/method.md: Open-i, 2,954 pairs, 5 seeds
    "macro_auroc": ("0.626 mean, 0.639 best", "Merlin-style 0.624"),
    "elementwise_accuracy": ("0.753", "Merlin-style 0.681"),
    "brier": ("0.061", ""),
    "ood_auroc": ("0.595", ""),
    "shift_drop_at_2": ("0.014", ""),
}


@dataclass
class EvalConfig:
    seeds: int = 5
    variants: tuple[str, ...] = ("B0", "B1", "B3", "B4", "B5")
    shifts: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    tta_ns: tuple[int, ...] = (1, 8, 64)
    split_seed: int = 0
    shift_pair_fraction: float = 1.0  # share of training images that get a shifted copy for B5
    epochs: int = 60

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if 0.0 not in self.shifts:
            raise ValueError("the shift intensities must include 0 (the unshifted test set)")


@dataclass
class _Features:
    x: np.ndarray
    y: np.ndarray
    patients: np.ndarray
    masks: tuple[np.ndarray, np.ndarray, np.ndarray]
    x_shift_train: np.ndarray
    test_shifted: dict[float, np.ndarray]
    ood: dict[str, np.ndarray]
    ood_descriptions: dict[str, str]
    text: np.ndarray | None
    report_ids: np.ndarray | None
    timing: dict = field(default_factory=dict)


def _extract(extract: FeatureExtractor, items: list[Item], desc: str) -> np.ndarray:
    return extract(((it.key, it.load) for it in items), len(items), desc)


def extract_all(dataset: Dataset, extract: FeatureExtractor, cfg: EvalConfig, clock: Callable[[], float]) -> _Features:
    """Every feature the evaluation needs, through the on-disk cache.

    One item-major pass: each image, then its shifted copies (B5's training copy, the test copies
    at every intensity), so a phantom's attenuation map is computed once for all of them.
    """
    items = dataset.items
    y, patients = dataset.labels(), dataset.patients()
    tr, va, te = dataset.split_masks(cfg.split_seed)
    timing = {}
    # B5's shifted copies: a fixed subset of training images, intensity uniform in TRAIN_SHIFT_RANGE.
    tr_idx = np.flatnonzero(tr)
    rng = np.random.default_rng([cfg.split_seed, 17])
    n_pairs = int(round(cfg.shift_pair_fraction * len(tr_idx)))
    paired = set(tr_idx[rng.choice(len(tr_idx), size=n_pairs, replace=False)].tolist()) if n_pairs else set()
    lo, hi = TRAIN_SHIFT_RANGE
    shifts = [float(s) for s in cfg.shifts if s > 0]
    seq: list[tuple[tuple, Item]] = []
    for i, it in enumerate(items):
        seq.append((("x", i), it))
        if i in paired:
            s = float(np.random.default_rng([cfg.split_seed, i, 7]).uniform(lo, hi))
            seq.append((("pair", i), it.shifted(s, salt=i + 1)))
        if te[i]:
            seq += [(("test", s, i), it.shifted(s, salt=0)) for s in shifts]
    t = clock()
    feats = _extract(extract, [it for _, it in seq], "features: images and their shifted copies")
    timing["features_images_and_copies_s"] = clock() - t
    rows = {tag: k for k, (tag, _) in enumerate(seq)}
    x = feats[[rows[("x", i)] for i in range(len(items))]]
    x_shift = np.full((len(tr_idx), x.shape[1]), np.nan, np.float32)
    for j, i in enumerate(map(int, tr_idx)):
        if i in paired:
            x_shift[j] = feats[rows[("pair", i)]]
    te_idx = np.flatnonzero(te)
    test_shifted = {s: feats[[rows[("test", s, i)] for i in te_idx]] for s in shifts}

    t = clock()
    ood = {name: _extract(extract, o.items, f"features: OOD {name}") for name, o in dataset.ood.items() if o.items}
    desc = {name: o.description for name, o in dataset.ood.items() if o.items}
    if 2.0 in test_shifted:
        ood[SHIFT_OOD] = test_shifted[2.0]
        desc[SHIFT_OOD] = "the test images at device-shift intensity 2 (twice the strongest training shift)"
    timing["features_ood_s"] = clock() - t

    text = rid = None
    reports = [it.report for it, m in zip(items, tr) if m]
    if any(r.strip() for r in reports):
        text, rid = text_features(reports)
    return _Features(x, y, patients, (tr, va, te), x_shift, test_shifted, ood, desc, text, rid, timing)


def _summ(runs: list[dict], key: str, higher_is_better: bool = True) -> dict:
    return metrics.summarize([r.get(key, float("nan")) for r in runs], higher_is_better)


def _operating_points(runs: list[dict]) -> dict:
    """Per label: the criterion, and threshold, sensitivity, specificity and PPV on the test split
    over seeds (mean, sd, best), with the confusion counts summed over seeds."""
    out = {}
    for k in LABELS:
        per = [r["operating_points"][k] for r in runs]
        out[k] = {"criterion": per[0]["criterion"],
                  **{m: metrics.summarize([x[m] for x in per]) for m in ("threshold", "sensitivity", "specificity", "ppv")},
                  "counts_over_seeds": {c: int(sum(x[c] for x in per)) for c in ("tp", "fp", "tn", "fn")}}
    return out


def criteria_summary(criteria: dict[str, str]) -> str:
    """One line for a table: the most common criterion, then the labels that have another."""
    names = list(criteria.values())
    main = max(dict.fromkeys(names), key=names.count)
    others: dict[str, list[str]] = {}
    for k, c in criteria.items():
        if c != main:
            others.setdefault(c, []).append(k)
    return "; ".join([main] + [f"{c} for {', '.join(ks)}" for c, ks in others.items()])


def aggregate(runs: list[dict], name: str, cfg: EvalConfig, shift_method: str) -> dict:
    """One variant's entry of metrics.json: mean, sd and best over seeds for every figure."""
    r0 = runs[0]
    out: dict = {
        "name": NAMES.get(name, name),
        "description": VARIANTS[name].description,
        "build": build_description(VARIANTS[name], seed=-1, split_seed=cfg.split_seed, epochs=cfg.epochs,
                                   shift_method=shift_method),
        "macro_auroc": {**_summ(runs, "macro_auroc"), "labels_scored": r0["labels_scored"]},
        "per_label_auroc": {k: metrics.summarize([r["per_label_auroc"][k] for r in runs])["mean"] for k in LABELS},
        "elementwise_accuracy": _summ(runs, "elementwise_accuracy"),
        "elementwise_accuracy_at_0.5": _summ(runs, "elementwise_accuracy_at_0.5"),
        "elementwise_accuracy_urgent": _summ(runs, "elementwise_accuracy_urgent"),
        "elementwise_accuracy_other": _summ(runs, "elementwise_accuracy_other"),
        "operating_points": _operating_points(runs),
        "criteria": criteria_summary({k: v["criterion"] for k, v in r0["operating_points"].items()}),
        # labels whose criterion's rate target the held-out images could not estimate (the default instead)
        "not_estimable": r0.get("not_estimable", {}),
        "brier": _summ(runs, "brier", False),
        "ece": _summ(runs, "ece", False),
        "ood_score": r0["ood_score"],
        "ood_auroc": {
            o: {"auroc": metrics.summarize([r["ood"][o]["auroc"] for r in runs]),
                "fpr_at_95_tpr": metrics.summarize([r["ood"][o]["fpr_at_95_tpr"] for r in runs], False),
                "positive_class": r0["ood"][o]["positive_class"], "n_in": r0["ood"][o]["n_in"],
                "n_out": r0["ood"][o]["n_out"]}
            for o in r0.get("ood", {})
        },
        "shift_auroc": {s: metrics.summarize([r["shift_auroc"][s] for r in runs]) for s in r0.get("shift_auroc", {})},
    }
    out["build"].pop("seed")
    if "shift_drop_at_2" in r0:
        out["shift_drop_at_2"] = _summ(runs, "shift_drop_at_2", False)
    if "mean_log_radius" in r0:
        out["mean_log_radius"] = _summ(runs, "mean_log_radius")
    if "bl_tta" in r0:
        out["bl_tta"] = {
            n: {"macro_auroc": metrics.summarize([r["bl_tta"][n]["macro_auroc"] for r in runs]),
                "brier": metrics.summarize([r["bl_tta"][n]["brier"] for r in runs], False),
                "gap_to_closed_form": metrics.summarize([r["bl_tta"][n]["gap_to_closed_form"] for r in runs], False),
                "gap_to_reference": metrics.summarize([r["bl_tta"][n]["gap_to_reference"] for r in runs], False)}
            for n in r0["bl_tta"]
        }
    out["seeds"] = [public(r) for r in runs]
    return out


def run_evaluation(dataset: Dataset, extract: FeatureExtractor, out: Path, encoder_info: dict,
                   cfg: EvalConfig | None = None, clock: Callable[[], float] = time.monotonic,
                   now: dt.datetime | None = None) -> dict:
    """Extract features, train and measure every variant over cfg.seeds seeds, write the report."""
    cfg = cfg or EvalConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = clock()
    load0 = os.getloadavg()
    cpu0 = _cpu_seconds()
    f = extract_all(dataset, extract, cfg, clock)
    t_feat = clock() - t0
    tr, va, te = f.masks
    log.info("evaluate.features", images=len(f.x), train=int(tr.sum()), val=int(va.sum()), test=int(te.sum()),
             encoded=extract.encoded, seconds=round(t_feat, 1))
    train = FeatureSet(f.x[tr], f.y[tr], f.patients[tr], f.x_shift_train, f.text, f.report_ids)
    val = FeatureSet(f.x[va], f.y[va], f.patients[va])
    y_te, x_te = f.y[te], f.x[te]
    seeds = list(range(cfg.seeds))
    variants = [v for v in cfg.variants if not (VARIANTS[v].contrastive and f.text is None)]
    skipped = {v: "no report text in the training data" for v in cfg.variants if v not in variants}
    results: dict[str, dict] = {}
    plot_runs: dict[str, dict] = {}
    t1 = clock()
    with tqdm(total=len(variants) * len(seeds), desc="heads: variants x seeds", unit="head") as bar:
        for name in variants:
            v = VARIANTS[name]
            runs = []
            for seed in seeds:
                head = fit_head(train, v, seed, epochs=cfg.epochs)
                cal = calibrate(head, v, val, held_out=out_of_fold(train, v, seed, epochs=cfg.epochs))
                r = measure(head, v, cal, y_te, x_te, f.test_shifted, f.ood, cfg.tta_ns)
                r["seed"] = seed
                r["temperatures_mean"] = float(np.mean(list(cal["temperatures"].values())))
                r["not_estimable"] = cal["operating_points"].get("not_estimable", {})
                runs.append(r)
                bar.update(1)
            plot_runs[name] = runs[0]
            results[name] = aggregate(runs, name, cfg, dataset.shift_method)
    t_heads = clock() - t1
    t2 = clock()
    written = _plots(out, y_te, plot_runs, results)
    t_plots = clock() - t2
    report: dict[str, Any] = {
        "created": (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
        "data": {"name": dataset.name, "description": dataset.description, "synthetic": dataset.synthetic,
                 "n_images": int(len(f.x)), "n_train": int(tr.sum()), "n_val": int(va.sum()), "n_test": int(te.sum()),
                 "n_patients": int(len(np.unique(f.patients))),
                 "split": ("the source's own patient-level split column" if dataset.split is not None else
                           f"patient-level 80/10/10, seed {cfg.split_seed}") + ", the same for every variant and seed",
                 "test_prevalence": {k: (float(np.nanmean(y_te[:, i])) if (~np.isnan(y_te[:, i])).any() else None)
                                     for i, k in enumerate(LABELS)},
                 "b5_shifted_pairs": int((~np.isnan(f.x_shift_train).any(1)).sum())},
        "encoder": encoder_info,
        "protocol": {
            "seeds": seeds,
            "seed_controls": "head initialisation, minibatch order, in-box training samples",
            "shift_intensities": list(cfg.shifts),
            "shift_method": dataset.shift_method,
            "train_shift_range": list(TRAIN_SHIFT_RANGE),
            "ood_sets": f.ood_descriptions,
            "ood_positive_class": "out-of-distribution (higher score = more foreign)",
            "thresholds": ("elementwise_accuracy and operating_points (per-label sensitivity, specificity, PPV) use "
                           "each model's per-label thresholds, fitted on its calibrated held-out probabilities (the "
                           "validation split and the training split's out-of-fold scores) by "
                           "the criterion its bundle would use (models.operating_points; each variant's `criteria` "
                           "names them); elementwise_accuracy_at_0.5 uses 0.5"),
            "ece": f"{metrics.ECE_BINS} equal-width bins over all known (image, label) cells",
            "brier": "mean (p - y)^2 per label over known images, averaged over labels",
            "macro_auroc": "per label over known images, labels with both classes only; labels_scored says how many",
            "summary": "mean, sample sd (ddof 1) and best over seeds (best = max, or min for Brier, ECE, FPR, drop)",
            "uncertain_labels": "hedged (-1) and unknown labels are masked in training and every metric",
            "bl_tta_n": list(cfg.tta_ns),
            "epochs": cfg.epochs,
        },
        "variants": results,
        "not_measured": {"B2": "Bootstrapping-style report baseline: a report generator (generate -> rank -> refine) "
                               "measured by report label-F1 in the report-drafting work; it has no classifier here",
                         **skipped},
        "timing": {
            **{k: round(v, 1) for k, v in f.timing.items()},
            "features_s": round(t_feat, 1), "heads_s": round(t_heads, 1), "plots_s": round(t_plots, 1),
            "total_s": round(clock() - t0, 1), "images_encoded": extract.encoded,
            "process_cpu_s": round(_cpu_seconds() - cpu0, 1),
            "heads_trained": len(variants) * len(seeds),
            "cpu_count": os.cpu_count(), "load_average_start": [round(x, 2) for x in load0],
            "load_average_end": [round(x, 2) for x in os.getloadavg()], "machine": platform.machine(),
            "torch_threads": _torch_threads(), "device": str(extract.device),
        },
        "config": asdict(cfg),
        "plots": [p.name for p in written],
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=1, sort_keys=False, default=_json_default) + "\n")
    (out / "table.md").write_text(render_table(report))
    log.info("evaluate.done", out=str(out), total_s=report["timing"]["total_s"])
    return report


def _cpu_seconds() -> float:
    """CPU time of this process (user + system): with other jobs on the machine, wall time alone misleads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _plots(out: Path, y: np.ndarray, runs: dict[str, dict], results: dict[str, dict]) -> list[Path]:
    paths = []
    shown: dict[str, np.ndarray] = ({k: runs[k]["_p"] for k in ("B0", "B1", "B5") if k in runs}
                                    or {k: r["_p"] for k, r in runs.items()})
    paths.append(plots.roc_per_label(y, shown, out / "roc_per_label.png",
                                     title=f"ROC per label, test split, seed {next(iter(runs.values()))['seed']}"))
    rel: dict[str, np.ndarray] = {k: runs[k]["_p"] for k in ("B4", "B5") if k in runs} or shown
    rel = {("B4 (uncalibrated)" if k == "B4" else "B5 (temperature-calibrated)" if k == "B5" else k): v for k, v in rel.items()}
    paths.append(plots.reliability_diagram(y, rel, out / "reliability.png"))
    curves = {NAMES.get(k, k): {float(s): (v["mean"], v["sd"]) for s, v in r["shift_auroc"].items()}
              for k, r in results.items() if r.get("shift_auroc")}
    if curves:
        paths.append(plots.auroc_vs_shift(curves, out / "auroc_vs_shift.png"))
    box = next((k for k in ("B5", "B4", "B3") if k in runs and "_ood_in" in runs[k]), None)
    if box:
        r = runs[box]
        outs = {k[len("_ood_"):]: v for k, v in r.items() if k.startswith("_ood_") and k != "_ood_in"}
        paths.append(plots.radius_distribution(r["_ood_in"], outs, out / "radius_in_vs_out.png",
                                               xlabel=f"{box} OOD score: mean log radius of the box",
                                               aurocs={k: v["auroc"] for k, v in r["ood"].items()}))
    return paths


def _fmt(s: dict | None, digits: int = 3, sd: bool = True) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}" if sd else f"{s['mean']:.{digits}f}"


def _operating_point_table(res: dict, order: list[str]) -> list[str]:
    """Sensitivity / specificity per label at each variant's bundle thresholds (test split)."""
    shown = [k for k in order if k in res and "operating_points" in res[k]]
    if not shown:
        return []

    def cell(o: dict) -> str:
        se, sp = o["sensitivity"]["mean"], o["specificity"]["mean"]
        return ("n/a" if se is None else f"{se:.2f}") + " / " + ("n/a" if sp is None else f"{sp:.2f}")

    L = ["## Sensitivity / specificity per label at the bundle's thresholds (test split, mean over seeds)", "",
         "| Label | " + " | ".join(k for k in shown) + " | criterion (" + shown[-1] + ") | test positives |",
         "|" + " --- |" * (len(shown) + 3)]
    for lab in LABELS:
        o_last = res[shown[-1]]["operating_points"][lab]
        c = o_last["counts_over_seeds"]
        n_seeds = max(1, o_last["threshold"]["n"])
        L.append(f"| {lab} | " + " | ".join(cell(res[k]["operating_points"][lab]) for k in shown)
                 + f" | {o_last['criterion']} | {(c['tp'] + c['fn']) // n_seeds} |")
    L += ["", "n/a: no positive (sensitivity) or no negative (specificity) test image for the label."]
    gave_way = res[shown[-1]].get("not_estimable", {})
    if gave_way:
        L += ["", f"Criteria that gave way to the default ({shown[-1]}, first seed):", ""]
        L += [f"- {lab}: {why}" for lab, why in gave_way.items()]
    return L


def render_table(report: dict) -> str:
    """table.md: the paper's Table 2 layout, then shift, BL-TTA and OOD detail, then the paper's figures."""
    res = report["variants"]
    any_v: dict[str, Any] = next(iter(res.values()), {})
    ood_names = list(any_v.get("ood_auroc", {}))
    t = report["timing"]
    d = report["data"]
    L = [
        "# Box-latent ablations: test figures over "
        f"{len(report['protocol']['seeds'])} seeds (mean ± sd)",
        "",
        f"Data: {d['description']}. Split: {d['split']}: {d['n_train']} train, {d['n_val']} validation, "
        f"{d['n_test']} test images ({d['n_patients']} patients).",
        f"Encoder: {report['encoder'].get('spec')} graph at {report['encoder'].get('image_size')} px; weights: "
        f"{report['encoder'].get('weights')}.",
        f"Time: {t['total_s'] / 60:.1f} min in all ({t['features_s'] / 60:.1f} min features, {t['images_encoded']} "
        f"images through the encoder; {t['heads_s'] / 60:.1f} min for {t['heads_trained']} heads) on "
        f"{t['cpu_count']} CPU cores ({t['device']}), load average {t['load_average_start'][0]} at start, "
        f"{t['load_average_end'][0]} at the end; {t.get('process_cpu_s', 0) / 60:.1f} CPU-min used by this process.",
        "",
        "## Table 2 layout",
        "",
        "| Model | macro-AUROC | best seed | labels scored | elementwise acc. | thresholds by | elementwise acc. at 0.5 "
        "| acc. urgent labels | acc. other labels "
        "| Brier | ECE | " + " | ".join(f"OOD AUROC {o}" for o in ood_names) + " | AUROC drop at 2x shift |",
        "|" + " --- |" * (12 + len(ood_names)),
    ]
    order = ["B0", "B1", "B2", "B3", "B4", "B5"]
    for k in order:
        if k == "B2" or k not in res:
            why = report.get("not_measured", {}).get(k)
            if why:
                L.append(f"| {NAMES.get(k, k)} | not measured here: {why} |" + " |" * (11 + len(ood_names)))
            continue
        r = res[k]
        name = f"**{r['name']}**" if k == "B5" else r["name"]
        oods = [_fmt(r["ood_auroc"][o]["auroc"]) for o in ood_names]
        L.append(f"| {name} | {_fmt(r['macro_auroc'])} | {r['macro_auroc']['best']:.3f} | "
                 f"{r['macro_auroc']['labels_scored']}/14 | {_fmt(r['elementwise_accuracy'])} | "
                 f"{r.get('criteria', 'n/a')} | {_fmt(r['elementwise_accuracy_at_0.5'])} | "
                 f"{_fmt(r.get('elementwise_accuracy_urgent'))} | {_fmt(r.get('elementwise_accuracy_other'))} | {_fmt(r['brier'])} | "
                 f"{_fmt(r['ece'])} | " + " | ".join(oods) + f" | {_fmt(r.get('shift_drop_at_2'))} |")
    L += ["", "Elementwise accuracy: at each model's per-label thresholds, fitted on its calibrated held-out "
          "probabilities (the validation split and the training split's out-of-fold scores) by the criterion its "
          "bundle uses (\"thresholds by\": accuracy = best held-out accuracy, ties towards 0.5; expected_accuracy = "
          "calibrated p >= 0.5; sensitivity:X = the highest threshold with held-out sensitivity >= X, used only where "
          f"the held-out images have at least {operating_points.MIN_CLASS_COUNT} positives of the label and the scores "
          "rank them above chance, else expected_accuracy), and at 0.5; "
          "\"acc. urgent labels\" is the same over the urgent findings' columns only (their high-sensitivity "
          "points), \"acc. other labels\" over the rest. "
          "OOD score: mean log radius of the box for B3-B5; the point-embedding baselines "
          "(B0, B1) have no radius, so their OOD column uses the mean predictive entropy instead. OOD images are the "
          "positive class.",
          ""]
    L += _operating_point_table(res, order)
    L += ["", "## Macro-AUROC under device shift", ""]
    shifts = list(any_v.get("shift_auroc", {}))
    if shifts:
        L += ["| Model | " + " | ".join(f"shift {float(s):g}" for s in shifts) + " | drop at 2 |",
              "|" + " --- |" * (len(shifts) + 2)]
        for k in order:
            if k in res:
                r = res[k]
                L.append(f"| {r['name']} | " + " | ".join(_fmt(r["shift_auroc"][s]) for s in shifts)
                         + f" | {_fmt(r.get('shift_drop_at_2'))} |")
        L += ["", f"Shift: {report['protocol']['shift_method']}; training shifts (B5) drawn in "
              f"{report['protocol']['train_shift_range']}."]
    L += ["", "## BL-TTA: N = 1, 8, 64 against its limit", "",
          "| Model | N | macro-AUROC | Brier | mean abs gap to closed form | mean abs gap to N=4096 |",
          "| --- | --- | --- | --- | --- | --- |"]
    for k in order:
        if k in res and "bl_tta" in res[k]:
            for n, b in res[k]["bl_tta"].items():
                L.append(f"| {res[k]['name']} | {n} | {_fmt(b['macro_auroc'])} | {_fmt(b['brier'])} | "
                         f"{_fmt(b['gap_to_closed_form'], 4)} | {_fmt(b['gap_to_reference'], 4)} |")
    L += ["", "N = 1 is the box center. Closed form: sigmoid(mu / sqrt(1 + pi s^2 / 8)) for the linear classifier "
          "(probit approximation, itself good to about 0.01).", "", "## OOD detail (FPR at 95% TPR; lower is better)", ""]
    if ood_names:
        L += ["| Model | score | " + " | ".join(ood_names) + " |", "|" + " --- |" * (len(ood_names) + 2)]
        for k in order:
            if k in res:
                r = res[k]
                L.append(f"| {r['name']} | {r['ood_score']} | "
                         + " | ".join(_fmt(r["ood_auroc"][o]["fpr_at_95_tpr"]) for o in ood_names) + " |")
        L += [""] + [f"- {o}: {desc}" for o, desc in report["protocol"]["ood_sets"].items()]
    L += ["", "## The paper's figures, for orientation only",
          "", "Open-i, 2,954 image-report pairs, pretrained MedSAM2 weights: not comparable with the figures above.", "",
          "| metric | B5 (full) | strongest same-backbone baseline |", "| --- | --- | --- |"]
    for m, (a, b) in PAPER.items():
        L.append(f"| {m} | {a} | {b} |")
    L += ["", "Plots: " + ", ".join(report["plots"]), ""]
    return "\n".join(L)
