"""The local validation's data: each job whose study's report has arrived, joined with its stored
prediction and the report's labels (model_training.local_validation computes the figures).

The join reads what the node keeps already: the job table (calling AE, keyed patient hash, when
received), the prediction the worker saved in the spool (worker.pipeline.load_prediction, as the
second reader loads it), the report store's labels, and the device from the header of the
received instance in the spool (Manufacturer, Manufacturer's Model Name: no patient identifier).
Only a bundle's own results are taken: a result of another bundle (an earlier version) is counted
and left out, since its probabilities are not the ones being validated.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from dicom_node.jobstore import JobState, JobStore
from dicom_node.spool import Spool
from model_training.local_validation import Cases
from models.labels import LABELS
from ris.reportstore import ReportStore
from worker.pipeline import PREDICTION, load_prediction

FINAL_REPORTS = ("F", "C")  # final and corrected reports; preliminary ones are no reference
UNKNOWN_DEVICE = "unknown device"
_PAGE = 1000


class NothingToValidate(ValueError):
    """No job in the time asked for has both a result of the bundle and a final report."""


@dataclass
class Gathered:
    cases: Cases
    skipped: Counter = field(default_factory=Counter)  # reason -> jobs left out
    jobs: list[str] = field(default_factory=list)  # job ids of the cases, in their order

    def summary(self) -> dict:
        """What the local data were, for metrics.json and a model card: counts, dates, AEs, devices."""
        c = self.cases
        span = [float(c.received_at.min()), float(c.received_at.max())] if len(c) else None
        return {"images": len(c), "patients_or_studies": int(len(np.unique(c.cluster))) if len(c) else 0,
                "received": span, "calling_aets": dict(Counter(c.calling_aet.tolist())),
                "devices": dict(Counter(c.device.tolist())), "left_out": dict(self.skipped)}


def device_of(path: Path) -> str:
    """"Manufacturer / Manufacturer's Model Name" from a received instance's header, UNKNOWN_DEVICE
    when the file is gone or says neither (read without the pixels)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Manufacturer", "ManufacturerModelName"])
    except (OSError, pydicom.errors.InvalidDicomError):
        return UNKNOWN_DEVICE
    parts = [str(ds.get(k, "") or "").strip() for k in ("Manufacturer", "ManufacturerModelName")]
    return " / ".join(p for p in parts if p) or UNKNOWN_DEVICE


def _all_jobs(jobs: JobStore, since: float, until: float | None):
    offset = 0
    while True:
        page = jobs.search(since=since, until=until, limit=_PAGE, offset=offset)
        yield from page
        if len(page) < _PAGE:
            return
        offset += _PAGE


def gather(jobs: JobStore, reports: ReportStore, spool: Spool, bundle_digest: str, since: float,
           until: float | None = None, calling_aets: Sequence[str] = ()) -> Gathered:
    """The cases of jobs received in [since, until) (from ``calling_aets`` only, when given) with a
    saved prediction of the bundle ``bundle_digest`` and a final report of their study (the latest
    one, when corrected)."""
    skipped: Counter = Counter()
    rows: list[dict] = []
    ids: list[str] = []
    for job in sorted(_all_jobs(jobs, since, until), key=lambda j: j.created_at):
        if calling_aets and job.calling_aet not in calling_aets:
            continue
        if job.state == JobState.SKIPPED:
            skipped["skipped job (a duplicate or not a frontal chest image)"] += 1
            continue
        folder = spool.result_dir(job.id)
        if not (folder / PREDICTION).exists():
            skipped["no prediction"] += 1
            continue
        final = [r for r in reports.for_study(job.study_instance_uid, job.accession_hash) if r.status in FINAL_REPORTS]
        if not final:
            skipped["no final report yet"] += 1
            continue
        prediction, model = load_prediction(folder)
        if model.digest != bundle_digest:
            skipped[f"result of another bundle ({model.name} {model.version}, {model.short_digest})"] += 1
            continue
        labels = final[-1].report_labels
        by_label = {f.label: f for f in prediction.findings}
        rows.append({"p": [by_label[k].probability for k in LABELS], "y": [labels.truth(k) for k in LABELS],
                     "t": [by_label[k].threshold for k in LABELS], "ood": prediction.out_of_distribution,
                     "cluster": job.patient_hash or f"study:{job.study_instance_uid}", "aet": job.calling_aet,
                     "device": device_of(spool.root / job.path), "at": job.created_at,
                     "center": prediction.center, "radius": prediction.radius})
        ids.append(job.id)
    L = len(LABELS)
    arr = lambda key, dtype=np.float64, shape=(0, L): (  # noqa: E731
        np.array([r[key] for r in rows], dtype=dtype) if rows else np.zeros(shape, dtype=dtype))
    cases = Cases(p=arr("p"), y=arr("y"), thresholds=arr("t"), ood=arr("ood", bool, (0,)),
                  cluster=np.array([r["cluster"] for r in rows], dtype=object),
                  calling_aet=np.array([r["aet"] for r in rows], dtype=object),
                  device=np.array([r["device"] for r in rows], dtype=object),
                  received_at=arr("at", np.float64, (0,)),
                  center=np.stack([r["center"] for r in rows]) if rows else None,
                  radius=np.stack([r["radius"] for r in rows]) if rows else None)
    return Gathered(cases, skipped, ids)


# ---------------------------------------------------------------- the two commands, as functions

def _bundle_json(card: dict) -> dict:
    return {"name": card["name"], "version": card["version"], "digest": card["digest"]}


def _write_json(path: Path, body: dict) -> None:
    import json

    path.write_text(json.dumps(body, indent=1, sort_keys=True, default=float) + "\n")


def run_validation(jobs: JobStore, reports: ReportStore, spool: Spool, bundle_root: Path, out: Path, since: float,
                   until: float | None = None, n_boot: int = 500, seed: int = 0,
                   calling_aets: Sequence[str] = ()) -> dict:
    """`medsam2-cxr validate`: metrics.json, report.html and the plots in ``out``; returns metrics.json."""
    from model_training import plots
    from model_training.local_validation import validate
    from model_training.validation_report import validation_html
    from models.bundle import read_card

    card = read_card(bundle_root)
    gathered = gather(jobs, reports, spool, card["digest"], since, until, calling_aets)
    c = gathered.cases
    if not len(c):
        left = ", ".join(f"{k}: {v}" for k, v in gathered.skipped.items()) or "no job received in that time"
        raise NothingToValidate(f"no study of bundle {card['version']} ({card['digest'][:12]}) with a final report "
                                f"in that time ({left})")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"bundle": _bundle_json(card), "data": gathered.summary(),
              **validate(c, card, n_boot=n_boot, seed=seed)}
    figs: dict[str, Path] = {}
    figs["reliability"] = plots.reliability_diagram(c.y, {"local": c.p}, out / "reliability.png")
    figs["roc per label"] = plots.roc_per_label(c.y, {"local": c.p}, out / "roc_per_label.png",
                                                title="ROC per label (local studies, reports as reference)")
    devices = sorted(set(c.device.tolist()))
    if len(devices) > 1:  # one y for every curve: each device's own cells, masked elsewhere
        y_all = {d: np.where((c.device == d)[:, None], c.y, np.nan) for d in devices}
        figs["reliability by device"] = _reliability_by_group(y_all, c.p, out / "reliability_by_device.png")
    _write_json(out / "metrics.json", result)
    (out / "report.html").write_text(validation_html(result, result["data"], result["bundle"], figs))
    return result


def _reliability_by_group(ys: dict[str, np.ndarray], p: np.ndarray, path: Path) -> Path:
    """One reliability curve per group (plots.reliability_diagram draws one y against many p; here
    each group's y masks the others' rows)."""
    import matplotlib.pyplot as plt

    from model_training import metrics
    from model_training.plots import _save

    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    for name, y in ys.items():
        bins = [b for b in metrics.reliability(y, p) if b["count"]]
        ax.plot([b["confidence"] for b in bins], [b["observed"] for b in bins], marker="o", lw=1.2,
                label=f"{name} (ECE {metrics.ece(y, p):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title("Reliability per device")
    ax.legend(fontsize=7)
    return _save(fig, path)


def run_recalibration(jobs: JobStore, reports: ReportStore, spool: Spool, bundle_root: Path, out: Path, since: float,
                      until: float | None = None, version: str | None = None, new_bundle: Path | None = None,
                      seed: int = 0, held_fraction: float = 0.5, calling_aets: Sequence[str] = (), now=None) -> dict:
    """`medsam2-cxr recalibrate`: the new bundle (``new_bundle``, default out/bundle) and
    recalibration.json, recalibration.html and the before/after plot in ``out``."""
    import datetime as dt

    from model_training import plots
    from model_training.recalibrate import recalibrate
    from model_training.validation_report import recalibration_html
    from models.bundle import load_bundle

    bundle = load_bundle(bundle_root)
    gathered = gather(jobs, reports, spool, bundle.digest, since, until, calling_aets)
    now = now or dt.datetime.now(dt.UTC)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = Path(new_bundle) if new_bundle is not None else out / "bundle"
    version = version or f"{bundle.card['version']}+local.{now:%Y%m%d}"
    summary = gathered.summary()
    result = recalibrate(bundle, gathered.cases, target, version=version, data=summary, seed=seed,
                         held_fraction=held_fraction, now=now)
    held = result.pop("_held")
    figs = {"reliability, held-back part": plots.reliability_diagram(
        held["y"], {f"before ({bundle.card['version']})": held["before"], f"after ({version})": held["after"]},
        out / "recalibration_reliability.png")}
    result["data"] = summary
    result["use"] = (f"the node does not switch bundles by itself: set [model] bundle = \"{target.resolve()}\" in the "
                     "node's configuration (or MEDSAM2_CXR_MODEL__BUNDLE) and restart the GPU workers; every result "
                     "names the bundle version and digest it came from")
    _write_json(out / "recalibration.json", result)
    (out / "recalibration.html").write_text(recalibration_html(result, summary, figs))
    return result
