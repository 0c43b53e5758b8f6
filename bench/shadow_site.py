"""bench shadow_site: a new site whose device the bundle never saw, run in shadow mode, validated
against its first readers' reports and recalibrated; the drift figures before and after the
device changes.

Two phases on one node in shadow mode ([node] mode = "shadow": results are encoded and kept in
the spool, nothing is sent). First a baseline day from the main PACS (``MAIN_PACS``) on the
devices the bundle was trained on (phantoms.DEVICES, no shift). Then ``n`` studies from an island
site (``ISLAND_PACS``) whose one device, "Gale Portable" (Manufacturer "Phantom Devices Gale
Portable"), is a device the generator never trained on: Corvus Mobile's physics extrapolated to
device shift ``shift`` (1 = the strongest shift in training), at ``per_day`` studies a day.

Every image goes the node's way: accepted as the listener accepts an instance
(dicom_node.listener.accept_instance: the spool, the job row with its keyed hashes), inferred by
worker.pipeline.infer_jobs (prediction in the spool, audit, drift, the second read's hook), and
delivered in shadow mode (worker.pipeline.deliver_job: encoded, kept, job done "shadow"). Each
study's phantom report goes to the node as HL7 ORU^R01 over real MLLP (bench.second_read.oru),
half matched by Study Instance UID, half by accession number alone. Then worker.validation runs
`validate` over both sites and `recalibrate` over the island's studies, and models.drift gives
each day's figures against the bundle's validation range.

    python -m bench.shadow_site --bundle BUNDLE --n 500 --baseline 100 --seed 2031 --shift 1.75 --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

MAIN_AE, SITE_AE = "MAIN_PACS", "ISLAND_PACS"
SITE_DEVICE_NAME = "Gale Portable"
START = dt.datetime(2026, 11, 2, 7, 0, tzinfo=dt.UTC)
DAY_S = 86400.0


def site_device(shift: float):
    """The island's device: Corvus Mobile's physics at device shift ``shift``, under its own name
    (the bundle was trained on DEVICES at shifts up to 1)."""
    from phantoms.devices import DEVICES

    base = next(d for d in DEVICES if d.name == "Corvus Mobile")
    return dataclasses.replace(base.shifted(shift), name=SITE_DEVICE_NAME, text="GALE AP")


def _phase(ctx, intake, node, listener_port: int, predictor, clock, cases, devices, ae: str, shift: float,
           seed: int, uid_seed: str, per_day: int, day0: int, batch: int, scratch: Path, timings: dict) -> int:
    """Accept, infer, deliver (shadow) and report ``cases``; returns the days used."""
    import phantoms
    from bench.second_read import oru
    from dicom_node.listener import accept_instance
    from ris import mllp
    from worker import pipeline

    days = 0
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        t = time.perf_counter()
        jobs, datasets = [], []
        for i, case in enumerate(chunk, start):
            day = day0 + i // per_day
            days = max(days, day - day0 + 1)
            clock.t = START.timestamp() + day * DAY_S + (i % per_day) * 60.0
            px, meta = phantoms.render(case, seed=seed * 1000003 + i, shift=shift, size=512, devices=devices)
            ds = phantoms.to_dicom(px, meta, case, uid_seed=uid_seed)
            f = scratch / f"in-{i}.dcm"
            ds.save_as(f, enforce_file_format=True)
            accepted = accept_instance(intake, f, ae, "127.0.0.1:0", None)
            f.unlink()
            if accepted.job is None:
                raise RuntimeError(f"the node did not accept phantom {i}: {accepted.status}")
            jobs.append(accepted.job.id)
            datasets.append(ds)
        timings["render_and_accept"] += time.perf_counter() - t
        t = time.perf_counter()
        pipeline.infer_jobs(jobs, ctx, predictor, enqueue_send=lambda _: None)
        timings["infer"] += time.perf_counter() - t
        t = time.perf_counter()
        for job_id in jobs:
            pipeline.deliver_job(job_id, ctx, node.destination_for, node.send)
        timings["deliver_shadow"] += time.perf_counter() - t
        t = time.perf_counter()
        for i, (case, ds) in enumerate(zip(chunk, datasets), start):
            control = f"{uid_seed}-{i}"
            message = oru(control, case.report, str(ds.StudyInstanceUID) if i % 2 == 0 else "",
                          str(ds.AccessionNumber), clock.now())
            ack = mllp.send("127.0.0.1", listener_port, message, control, timeout=30)
            if ack != "AA":
                raise RuntimeError(f"report {control}: the node answered {ack}")
        timings["reports"] += time.perf_counter() - t
    return days


def _drift(node, card: dict) -> dict:
    """Each (site, day)'s figures from the audit's "inferred" records, against the card's range."""
    from models import drift

    records = [{"time": r["time"], "site": r.get("calling_aet"), "present": r.get("present"),
                "out_of_distribution": r.get("out_of_distribution"), "mean_radius": r.get("mean_radius")}
               for r in node.audit.read() if r["event"] == "inferred"]
    days = drift.daily(records)
    ref = drift.card_reference(card)
    out_of_range = drift.excursions(days, ref)
    per_site: dict[str, dict] = {}
    for d in days:
        s = per_site.setdefault(d.site, {"days": 0, "images": 0, "ood_rate": [], "mean_radius": [],
                                         "excursions": 0, "statistics_out_of_range": {}})
        s["days"] += 1
        s["images"] += d.images
        s["ood_rate"].append(round(d.ood_rate, 4))
        s["mean_radius"].append(None if d.mean_radius is None else round(d.mean_radius, 4))
    for e in out_of_range:
        s = per_site[e.site]
        s["excursions"] += 1
        key = e.statistic + (f":{e.label}" if e.label else "")
        s["statistics_out_of_range"][key] = s["statistics_out_of_range"].get(key, 0) + 1
    return {"reference": {"ood_rate": ref["ood_rate"], "mean_radius": ref["mean_radius"],
                          "validation": {k: ref["validation"][k] for k in ("ood_rate", "mean_radius")}},
            "sites": per_site}


def run(bundle: Path, n: int = 500, baseline: int = 100, seed: int = 2031, shift: float = 1.75, per_day: int = 100,
        batch: int = 16, device: str | None = None, n_boot: int = 500, out: Path | None = None,
        work: Path | None = None) -> dict:
    """The measurement; returns its JSON-able result (the reports are written under ``out``)."""
    import phantoms
    from dicom_node.listener import Intake
    from models.bundle import load_bundle
    from models.predictor import Predictor
    from phantoms.devices import DEVICES
    from worker import pipeline, validation
    from worker.clock import ManualClock
    from worker.node import Node
    from worker.settings import Settings

    if not 1.0 < shift <= 3.0:
        raise ValueError(f"shift {shift}: a device the bundle never saw lies beyond 1 (give 1.5 to 2)")
    t0 = time.perf_counter()
    scratch = tempfile.TemporaryDirectory(prefix="bench-shadow-site-") if work is None else None
    root = Path(scratch.name if scratch is not None else work)  # type: ignore[arg-type]
    out = Path(out) if out is not None else root / "out"
    from bench.second_read import _free_port

    port = _free_port()
    settings = Settings.model_validate({"paths": {"spool": root / "spool"}, "node": {"mode": "shadow"},
                                        "model": {"bundle": str(bundle)},
                                        "second_read": {"enabled": True,
                                                        "inbound": {"host": "127.0.0.1", "port": port}}})
    clock = ManualClock(START)
    node = Node(settings, clock=clock)
    reader = node.second_reader()
    listener = node.report_listener(reader) if reader is not None else None
    assert reader is not None and listener is not None  # enabled with a port just above
    predictor = Predictor(load_bundle(Path(bundle)), device=device)
    card = predictor.bundle.card
    ctx = pipeline.Context(spool=node.spool, jobs=node.jobs, audit=node.audit, clock=clock,
                           second_read=reader.job_inferred, shadow=True, site_label=node.site_labels())
    counter = iter(range(10**9))
    intake = Intake(node.listener_config(), node.spool, node.jobs, node.audit, enqueue=lambda _: None,
                    new_id=lambda: f"job{next(counter):06d}", lookup_key=node.secret("lookup"))
    timings = dict.fromkeys(("render_and_accept", "infer", "deliver_shadow", "reports"), 0.0)
    work_dir = root / "incoming-files"
    work_dir.mkdir(parents=True, exist_ok=True)
    gale = site_device(shift)
    with listener:
        base_days = _phase(ctx, intake, node, port, predictor, clock, phantoms.sample_cases(baseline, seed + 1),
                           DEVICES, MAIN_AE, 0.0, seed + 1, f"bench-shadow-main:{seed}", max(baseline, 1), 0,
                           batch, work_dir, timings) if baseline else 0
        site_cases = phantoms.sample_cases(n, seed, devices=(gale,))
        _phase(ctx, intake, node, port, predictor, clock, site_cases, (gale,), SITE_AE, 0.0, seed,
               f"bench-shadow-site:{seed}", per_day, base_days, batch, work_dir, timings)
        end = time.monotonic() + 120
        while node.reports.counts()["reports"] < n + baseline and time.monotonic() < end:
            time.sleep(0.2)
    states: dict[str, int] = node.jobs.counts()
    t = time.perf_counter()
    since = START.timestamp() - DAY_S
    val = validation.run_validation(node.jobs, node.reports, node.spool, Path(bundle), out / "validation", since,
                                    n_boot=n_boot, seed=seed)
    timings["validate"] = time.perf_counter() - t
    t = time.perf_counter()
    rec = validation.run_recalibration(node.jobs, node.reports, node.spool, Path(bundle), out / "recalibration",
                                       since, calling_aets=(SITE_AE,), seed=seed, now=clock.now())
    timings["recalibrate"] = time.perf_counter() - t
    drift_figures = _drift(node, card)

    def headline(g: dict) -> dict:
        return {"images": g["n_images"], **{k: v.get("value") for k, v in g.get("overall", {}).items()},
                "ece_ci": (g.get("overall", {}).get("ece") or {}).get("ci")}

    result = {
        "benchmark": "shadow_site",
        "bundle": val["bundle"],
        "site": {"device": f"Phantom Devices {SITE_DEVICE_NAME} / {SITE_DEVICE_NAME}", "shift": shift, "studies": n,
                 "per_day": per_day, "baseline_studies": baseline, "seed": seed},
        "jobs": states,
        "reports": node.reports.counts(),
        "validation": {"overall": headline(val["overall"]),
                       "by_calling_aet": {k: headline(g) for k, g in val["by_calling_aet"].items()},
                       "card": val["card"]["overall"],
                       "disagreements": val["disagreements"].get("overall", []),
                       "labels_with_a_figure": sum(r.get("too_few") is None for r in val["overall"]["labels"].values()),
                       "report": str(out / "validation" / "report.html")},
        "recalibration": {"fit_images": rec["fit"]["images"], "held_images": rec["held"]["images"],
                          "before": {k: rec["held"]["before"][k] for k in ("ece", "brier", "macro_auroc")},
                          "after": {k: rec["held"]["after"][k] for k in ("ece", "brier", "macro_auroc")},
                          "new_bundle": rec["to"], "report": str(out / "recalibration" / "recalibration.html")},
        "drift": drift_figures,
        "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(time.perf_counter() - t0, 1)},
    }
    if scratch is not None and out.is_relative_to(root):
        result["note"] = "the reports were in the temporary work folder, removed; give --out to keep them"
    if scratch is not None:
        scratch.cleanup()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.shadow_site", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--n", type=int, default=500, help="studies from the new site")
    parser.add_argument("--baseline", type=int, default=100, help="studies from the main PACS first (one day)")
    parser.add_argument("--seed", type=int, default=2031)
    parser.add_argument("--shift", type=float, default=1.75, help="device shift of the new device (1.5 to 2)")
    parser.add_argument("--per-day", type=int, default=100)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for the validation and recalibration reports")
    parser.add_argument("--work", type=Path, default=None)
    a = parser.parse_args(argv)
    from worker.logs import configure

    configure("WARNING")  # the node's JSON logs on stderr: stdout is the one JSON result
    print(json.dumps(run(a.bundle, a.n, a.baseline, a.seed, a.shift, a.per_day, device=a.device, n_boot=a.bootstrap,
                         out=a.out, work=a.work), default=float))


if __name__ == "__main__":
    main()
