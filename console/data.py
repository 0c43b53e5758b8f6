"""What the console shows, read from the spool, the job table, the audit trail and the bundle.

Plain functions of a pipeline Context (worker.pipeline.Context) and the settings; no web here.
Nothing returned carries a patient identifier except :func:`identifiers`, which only the router's
admin-only, audited route calls.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.jobstore import Job
from dicom_node.spool import REASON_FILE
from worker.pipeline import PREDICTION, SC_FILE, TEXT_FILE, Context

DAY_S = 86400.0
SECRET_KEY = re.compile(r"pass|secret|key|token|hash|credential", re.I)
REDACTED = "[redacted]"


def job_json(job: Job) -> dict:
    """A job as the console shows it: UIDs, ids, states and times, no identifier nor its hash."""
    return {"id": job.id, "state": job.state.value, "reason": job.reason, "calling_aet": job.calling_aet,
            "sop_instance_uid": job.sop_instance_uid, "sop_class_uid": job.sop_class_uid,
            "study_instance_uid": job.study_instance_uid, "attempts": job.attempts,
            "received": iso(job.created_at), "updated": iso(job.updated_at)}


def discrepancy_json(d) -> dict:
    """A second read's discrepancy (ris.reportstore.StoredDiscrepancy) as the console lists it: ids,
    the study's UID, the finding, the model's call and the report's reading; no report text."""
    return {"id": d.id, "report": d.report_id, "job": d.job_id, "study_instance_uid": d.study_instance_uid,
            "label": d.label, "direction": d.direction, "tier": d.tier, "probability": round(d.probability, 4),
            "report_state": d.report_state, "found": iso(d.created_at), "notified": d.notified}


def iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- today

def audit_since(ctx: Context, since: float, events: set[str] | None = None) -> list[dict]:
    return [r for r in ctx.audit.read() if r.get("time", 0) >= since and (events is None or r["event"] in events)]


def today(ctx: Context, card: dict | None, now: float, destinations: list[dict]) -> dict:
    """The last 24 hours: counts per state (all time and received today), throughput and latency
    per hour, OOD rate, each label's positive rate against the model card's test figure."""
    since = now - DAY_S
    rows = ctx.jobs.finished_since(since)
    hours = [0] * 24
    latencies: list[list[float]] = [[] for _ in range(24)]
    today_counts: dict[str, int] = {}
    for state, created, updated in rows:
        today_counts[state] = today_counts.get(state, 0) + 1
        if state == "done":
            h = min(23, max(0, int((updated - since) // 3600)))
            hours[h] += 1
            latencies[h].append(updated - created)
    inferred = audit_since(ctx, since, {"inferred"})
    n = len(inferred)
    ood = sum(bool(r.get("out_of_distribution")) for r in inferred)
    present: dict[str, int] = {}
    for r in inferred:
        for label in r.get("present") or []:
            present[label] = present.get(label, 0) + 1
    card_rates = ((card or {}).get("metrics", {}).get("test", {}) or {}).get("positive_rate") or {}
    labels = list((card or {}).get("labels") or sorted(set(present) | set(card_rates)))
    done = [x for h in latencies for x in h]
    return {
        "since": iso(since), "now": iso(now),
        "counts": ctx.jobs.counts(), "received_today": today_counts,
        "throughput_per_hour": hours,
        "latency_s": {"p50": _pct(done, 50), "p95": _pct(done, 95), "n": len(done),
                      "per_hour_p50": [_pct(h, 50) for h in latencies], "per_hour_p95": [_pct(h, 95) for h in latencies]},
        "inferred": n, "ood_rate": (ood / n) if n else None,
        "positive_rates": [{"label": k, "today": (present.get(k, 0) / n) if n else None,
                            "model_card": card_rates.get(k)} for k in labels],
        "destinations": destinations,
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def plots(summary: dict) -> dict[str, str]:
    """Inline SVG: completed jobs per hour, and their latency (p50, p95) per hour."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    out = {}
    x = np.arange(-23, 1)
    fig = Figure(figsize=(6, 2.2))
    ax = fig.add_subplot()
    ax.bar(x, summary["throughput_per_hour"], color="#3b6ea5")
    ax.set_xlabel("hours ago")
    ax.set_ylabel("jobs done")
    ax.set_title("throughput, last 24 h", fontsize=10)
    ax.set_xlim(-23.6, 0.6)
    out["throughput"] = _svg(fig)
    fig = Figure(figsize=(6, 2.2))
    ax = fig.add_subplot()
    lat = summary["latency_s"]
    for key, style in (("per_hour_p50", "o-"), ("per_hour_p95", "s--")):
        ys = [np.nan if v is None else v for v in lat[key]]
        ax.plot(x, ys, style, label=key.rsplit("_", 1)[1], markersize=3)
    ax.set_xlabel("hours ago")
    ax.set_ylabel("seconds, received to done")
    ax.set_title("latency, last 24 h", fontsize=10)
    ax.set_xlim(-23.6, 0.6)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    out["latency"] = _svg(fig)
    return out


def _svg(fig) -> str:
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg"):]


# ---------------------------------------------------------------- destinations

def destinations(settings) -> list[tuple[str, str, Any]]:
    """(target, name, settings Destination): the default ("default") and every route (its
    calling AE title)."""
    d = settings.destination
    out = [("default", "default", d.for_caller("\0none"))]
    out += [(caller, f"route {caller}", route) for caller, route in sorted(d.routes.items())]
    return out


def destination(settings, target: str):
    """The settings Destination a target names, or None."""
    return next((d for t, _, d in destinations(settings) if t == target), None)


def c_echo(dest, timeout: float, calling_ae: str) -> tuple[bool, str]:
    """Probe a destination (settings Destination) as the sender would reach it: C-ECHO, or an HTTP
    request for a DICOMweb one (dicom_node's own probe). (up, what happened)."""
    from worker.node import destination

    t0 = time.perf_counter()
    try:
        why = destination(dest).probe(calling_ae=calling_ae, timeout=timeout)
    except (OSError, ValueError) as exc:  # a TLS file that cannot be read, a bad address
        return False, f"{type(exc).__name__}: {exc}"
    answered = "DICOMweb answered" if dest.type == "dicomweb" else "C-ECHO success"
    return why is None, why or f"{answered} in {1000 * (time.perf_counter() - t0):.0f} ms"


class EchoCache:
    """C-ECHO of every destination, at most once per ``ttl_s``, all at once in threads."""

    def __init__(self, settings, echo: Callable | None = None, ttl_s: float = 15.0) -> None:
        self.settings, self.ttl_s = settings, ttl_s
        self._echo = echo or (lambda d: c_echo(d, settings.console.destination_timeout_s, settings.node.ae_title))
        self._at = 0.0
        self._value: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self) -> list[dict]:
        with self._lock:
            if time.monotonic() - self._at < self.ttl_s:
                return self._value
            dests = destinations(self.settings)
            with ThreadPoolExecutor(max(1, min(8, len(dests)))) as pool:
                answers = list(pool.map(lambda nd: self._echo(nd[2]), dests))
            self._value = [{"target": target, "name": name, "ae_title": d.ae_title, "host": d.host, "port": d.port,
                            "tls": bool(d.tls.ca), "up": up, "detail": detail}
                           for (target, name, d), (up, detail) in zip(dests, answers)]
            self._at = time.monotonic()
            return self._value

    def forget(self) -> None:
        with self._lock:
            self._at = 0.0


# ---------------------------------------------------------------- one job

def timeline(ctx: Context, job_id: str) -> list[dict]:
    """The job's audit records, oldest first (the listener names it job_id, the pipeline job)."""
    return [{**r, "at": iso(r.get("time"))} for r in ctx.audit.read() if job_id in (r.get("job"), r.get("job_id"))]


def _fetched(ctx: Context, path: Path) -> Path | None:
    """A results/ or incoming/ file of this host's spool, fetched from the object store when it is
    remote ([objects] url); None when it is not there (or the store cannot be reached now)."""
    try:
        return ctx.store.fetch(ctx.key(path))
    except OSError:  # FileNotFoundError, ObjectsUnavailable
        return None


def result_file(ctx: Context, job_id: str, name: str) -> Path | None:
    """A result file of the job: in results/ (owed or sent) or dead-letter/ (given up on, this host's)."""
    found = _fetched(ctx, ctx.spool.results / job_id / name)
    if found is not None:
        return found
    dead = ctx.spool.dead / job_id / name
    return dead if dead.is_file() else None


def findings(ctx: Context, job_id: str) -> dict | None:
    path = _fetched(ctx, ctx.spool.results / job_id / PREDICTION)
    if path is None:
        return None
    body = json.loads(path.read_text())
    return {"findings": body.get("findings", []), "ood_score": body.get("ood_score"),
            "ood_threshold": body.get("ood_threshold"), "out_of_distribution": body.get("out_of_distribution"),
            "model": body.get("model", {})}


def draft(ctx: Context, job_id: str) -> list[dict] | None:
    """The text SR's content items in document order: heading (concept name) and text."""
    path = result_file(ctx, job_id, TEXT_FILE)
    if path is None:
        return None
    import pydicom

    ds = pydicom.dcmread(path)
    out: list[dict] = []

    def walk(items: Iterable, depth: int) -> None:
        for item in items:
            name = ""
            if item.get("ConceptNameCodeSequence"):
                name = str(item.ConceptNameCodeSequence[0].get("CodeMeaning", ""))
            if item.get("ValueType") == "TEXT":
                out.append({"heading": name, "text": str(item.get("TextValue", "")), "depth": depth})
            elif item.get("ValueType") == "CONTAINER" and name:
                out.append({"heading": name, "text": "", "depth": depth})
            walk(item.get("ContentSequence", []), depth + 1)

    walk([ds], 0)
    return out


def sc_png(ctx: Context, job_id: str, max_side: int = 1024) -> bytes | None:
    """The SC (saliency picture) as PNG, from the spool's copy, at most ``max_side`` pixels."""
    path = result_file(ctx, job_id, SC_FILE)
    if path is None:
        return None
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    if arr.ndim == 2 and arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo or 1) * 255).astype(np.uint8)
    if arr.ndim == 3 and str(ds.get("PhotometricInterpretation", "RGB")).startswith("YBR"):
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, str(ds.PhotometricInterpretation), "RGB")
    img = Image.fromarray(arr)
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def dead_letter_reason(ctx: Context, job_id: str) -> str | None:
    path = ctx.spool.dead / job_id / REASON_FILE
    try:
        return json.loads(path.read_text()).get("reason")
    except (OSError, ValueError):
        return None


def identifiers(ctx: Context, job: Job) -> dict:
    """Patient identifiers from the job's source header in the spool (incoming or quarantine)."""
    import pydicom

    for path in (_fetched(ctx, ctx.spool.root / job.path), ctx.spool.quarantine_dir / f"{job.id}.dcm"):
        if path is not None and path.is_file():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return {k: str(ds.get(k, "") or "") for k in
                    ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate", "StudyID")}
    raise FileNotFoundError(f"the source of job {job.id} is no longer in the spool")


# ---------------------------------------------------------------- sites, configuration

def sites(ctx: Context, settings) -> list[dict]:
    seen = {aet: (n, last) for aet, n, last in ctx.jobs.callers()}
    routes = settings.destination.routes
    names = sorted(set(seen) | set(routes) | set(settings.node.allowed_calling_aets))
    default = settings.destination
    out = []
    for aet in names:
        route = routes.get(aet)
        d = route or default
        out.append({"calling_aet": aet, "jobs": seen.get(aet, (0, None))[0], "last_seen": iso(seen.get(aet, (0, None))[1]),
                    "route": f"{d.ae_title}@{d.host}:{d.port}" + (" (TLS)" if d.tls.ca else ""),
                    "routed": route is not None,
                    "allowed": (not settings.node.allowed_calling_aets) or aet in settings.node.allowed_calling_aets})
    return sorted(out, key=lambda s: s["last_seen"] or "", reverse=True)


def redacted(value: object, key: str = "") -> object:
    """The configuration with every password, key, secret, token and hash replaced; a URL's
    password too."""
    if isinstance(value, dict):
        return {k: redacted(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    if SECRET_KEY.search(key) and value not in ("", None):
        return REDACTED
    if isinstance(value, str):
        return re.sub(r"(?<=://)([^:/@]*):[^@/]*@", r"\1:" + REDACTED + "@", value)
    return value


# ---------------------------------------------------------------- drift

def drift_summary(ctx: Context, card: dict | None, now: float, overridden: Iterable[str] = (), days: int = 14) -> dict:
    """Each site's figures per UTC day over the last ``days`` days (models.drift.daily, from the
    audit's "inferred" records), the card's validation range and the days that leave it. A card
    without the range (a bundle built before it was recorded) gives the figures and says so."""
    from models.drift import DriftReferenceMissing, card_reference, daily, excursions

    since = (dt.datetime.fromtimestamp(now, dt.UTC).date() - dt.timedelta(days=days - 1))
    start = dt.datetime.combine(since, dt.time(), dt.UTC).timestamp()
    records = audit_since(ctx, start, {"inferred"})
    sites: dict[str, str] = {}
    for r in records:  # records written before they named their calling AE: the job table does
        if not r.get("calling_aet") and r.get("job") not in sites:
            job = ctx.jobs.get(str(r.get("job")))
            sites[str(r.get("job"))] = job.calling_aet if job else "unknown"
    figures = daily({"time": r["time"], "site": r.get("calling_aet") or sites.get(str(r.get("job"))),
                     "present": r.get("present"), "out_of_distribution": r.get("out_of_distribution"),
                     "mean_radius": r.get("mean_radius")} for r in records)
    ref: dict | None
    try:
        ref = card_reference(card or {}, overridden) if card is not None else None
        missing = None if card is not None else "no readable model card"
    except DriftReferenceMissing as exc:
        ref, missing = None, str(exc)
    return {"since": since.isoformat(), "days": [dataclasses.asdict(d) for d in figures],
            "reference": ref, "reference_missing": missing,
            "excursions": [dataclasses.asdict(e) for e in excursions(figures, ref)] if ref else []}


def drift_plots(summary: dict) -> dict[str, str]:
    """Inline SVG per figure: each site's daily value, the validation range shaded, out-of-range days ringed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    ref = summary["reference"]
    sites = sorted({d["site"] for d in summary["days"]})
    out = {}
    panels: list[tuple[str, str, str]] = [("ood_rate", "", "OOD rate"), ("mean_radius", "", "mean box radius")]
    labels = list((ref or {}).get("positive_rate") or sorted({k for d in summary["days"] for k in d["positive_rate"]}))
    panels += [("positive_rate", k, k) for k in labels]
    ringed = {(e["site"], e["day"], e["statistic"], e["label"]) for e in summary["excursions"]}
    for statistic, label, title in panels:
        fig = Figure(figsize=(4, 2.0))
        ax = fig.add_subplot()
        for site in sites:
            rows = [d for d in summary["days"] if d["site"] == site]
            xs = np.array([np.datetime64(d["day"]) for d in rows])
            ys = [np.nan if (v := (d[statistic] if not label else d[statistic].get(label))) is None else v for d in rows]
            ax.plot(xs, ys, "o-", markersize=3, label=site)
            bad = [(x, y) for x, y, d in zip(xs, ys, rows) if (site, d["day"], statistic, label) in ringed]
            if bad:
                ax.plot(*zip(*bad), "o", markersize=9, markerfacecolor="none", markeredgecolor="#c0392b")
        rng = (ref or {}).get(statistic)
        rng = rng.get(label) if isinstance(rng, dict) else rng
        if rng:
            ax.axhspan(rng[0], rng[1], color="#3b6ea5", alpha=0.15, label="validation range")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        fig.autofmt_xdate()
        if sites:
            ax.legend(fontsize=6)
        out[f"{statistic}:{label}" if label else statistic] = _svg(fig)
    return out
