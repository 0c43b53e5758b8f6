"""bench second_read: the recall and precision of the second read's discrepancy flag per finding, on
phantoms whose reports leave true findings out on purpose, sent to the node as HL7 over MLLP.

Each phantom (phantoms.sample_cases, a seed of its own) is rendered, read back as the node reads
an image, and predicted by the bundle (CPU by default). Its report is written again with some of
its true findings left out (each positive finding with probability ``omit``; the report is silent
on them: no positive sentence and no negation, phantoms.reports.write_report ``left_out``). The
reports go as ORU^R01 over real MLLP to the node's report listener (ris/inbound.py, built by
worker.node.Node from [second_read]); half of them before their image is "inferred" (its job and
prediction are written after the ACK, and the pipeline's hook, SecondReader.job_inferred, matches
them), half after; half are matched by Study Instance UID, half by accession number alone.

Truth of a discrepancy (per case and finding): the finding is present in the phantom, the model
calls it (present, at one of the configured tiers, the image not out of distribution) and the
report leaves it out. The flag: a "model_positive" discrepancy the node recorded. Precision
counts as false every flag outside the truth: a finding the model calls that the phantom does not
have (the model's false positive, which a reader of the list sees just the same), or one the
report does name that the labelers missed. ``omissions_caught`` is the share of all left-out
findings the node flags, whether or not the model had called them.

    python -m bench.second_read --bundle BUNDLE --n 200 --seed 2027 [--omit 0.5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.labels import LABELS, OPACITY_CHILDREN
from models.prediction import ALL_TIERS, NOT_VALIDATED

EXCLUDED = ("No Finding",)


def left_out(labels: dict[str, int], r: np.random.Generator, omit: float) -> frozenset[str]:
    """The true findings a report leaves out: each positive one with probability ``omit``; "Lung
    Opacity" too when every positive opacity child is left out (it is named through them)."""
    children = [c for c in OPACITY_CHILDREN if labels[c]]
    candidates = [k for k in LABELS if labels[k] and k not in EXCLUDED and not (k == "Lung Opacity" and children)]
    out = {k for k in candidates if r.random() < omit}
    if children and all(c in out for c in children) and labels["Lung Opacity"]:
        out.add("Lung Opacity")
    return frozenset(out)


def oru(control: str, text: str, study_uid: str, accession: str, now: dt.datetime) -> bytes:
    """A RIS's final report as ER7 (UTF-8): accession in OBR-18, the study (if given) as OBX 113014."""
    from ris.hl7v2 import escape

    ts = now.strftime("%Y%m%d%H%M%S")
    segs = [f"MSH|^~\\&|RIS|CHECKUP|MEDSAM2CXR|CHECKUP|{ts}||ORU^R01^ORU_R01|{control}|P|2.5.1|||AL|NE||UNICODE UTF-8",
            "|".join(["OBR", "1", "", escape(accession), "36643-5^XR Chest 2V^LN"] + [""] * 13 + [escape(accession)]
                     + [""] * 3 + [ts, "", "RAD", "F"])]
    n = 1
    if study_uid:
        segs.append(f"OBX|{n}|HD|113014^DICOM Study^DCM||{study_uid}||||||F")
        n += 1
    for line in text.splitlines():
        segs.append(f"OBX|{n}|TX|59776-5^Findings^LN||{escape(line)}||||||F")
        n += 1
    return ("\r".join(segs) + "\r").encode("utf-8")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _inferred(node, reader, key: bytes, job_id: str, ds, prediction, model) -> None:
    """What the node does once an image is inferred: the job row, prediction.json, and the second
    read's hook (worker.pipeline.infer_jobs calls SecondReader.job_inferred)."""
    from dicom_node.jobstore import JobState
    from dicom_node.lookup import keyed_hash
    from worker import pipeline

    node.jobs.add(job_id=job_id, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                  study_instance_uid=str(ds.StudyInstanceUID), calling_aet="PACS", path=f"incoming/{job_id}.dcm",
                  state=JobState.INFERRED, accession_hash=keyed_hash(key, ds.AccessionNumber))
    pipeline.save_prediction(node.spool, node.spool.result_dir(job_id), prediction, model)
    job = node.jobs.get(job_id)
    assert job is not None
    reader.job_inferred(job)


def _rate(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def run(bundle: Path, n: int = 200, seed: int = 2027, omit: float = 0.5, render_size: int = 512, batch: int = 16,
        device: str | None = None, tiers: tuple[str, ...] = ("medium", "high", NOT_VALIDATED),
        work: Path | None = None) -> dict:
    """The measurement; returns its JSON-able result."""
    import phantoms
    from models.bundle import load_bundle
    from models.predictor import Predictor
    from models.preprocess import read_image
    from phantoms.reports import write_report
    from ris import mllp
    from worker.clock import SYSTEM
    from worker.node import Node
    from worker.settings import Settings

    bad = [t for t in tiers if t not in ALL_TIERS]
    if bad:
        raise ValueError(f"tiers {bad}: choose from {list(ALL_TIERS)}")
    t0 = time.perf_counter()
    scratch = tempfile.TemporaryDirectory(prefix="bench-second-read-") if work is None else None
    root = Path(scratch.name if scratch is not None else work)  # type: ignore[arg-type]
    port = _free_port()
    settings = Settings.model_validate({"paths": {"spool": root / "spool"},
                                        "second_read": {"enabled": True, "tiers": list(tiers),
                                                        "inbound": {"host": "127.0.0.1", "port": port}}})
    node = Node(settings, clock=SYSTEM)
    reader = node.second_reader()
    listener = node.report_listener(reader) if reader is not None else None
    assert reader is not None and listener is not None  # enabled with a port just above
    key = node.secret("lookup", settings.node.lookup_secret)

    predictor = Predictor(load_bundle(Path(bundle)), device=device)
    model = predictor.bundle.identity()
    cases = phantoms.sample_cases(n, seed)
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    predict_s = 0.0
    with listener:
        for start in range(0, n, batch):
            chunk = cases[start:start + batch]
            datasets = []
            for i, case in enumerate(chunk, start):
                px, meta = phantoms.render(case, seed=seed * 1000003 + i, size=render_size)
                datasets.append(phantoms.to_dicom(px, meta, case, uid_seed=f"bench-second-read:{seed}"))
            t1 = time.perf_counter()
            predictions = predictor.predict([read_image(ds) for ds in datasets])
            predict_s += time.perf_counter() - t1
            for i, (case, ds, pred) in enumerate(zip(chunk, datasets, predictions), start):
                omitted = left_out(case.labels, rng, omit)
                text = write_report(case.labels, case.uncertain, case.findings, np.random.default_rng([seed, i]),
                                    left_out=omitted)
                job_id = f"case{i:05d}"
                study = str(ds.StudyInstanceUID)
                by_uid, report_first = i % 2 == 0, (i // 2) % 2 == 0
                message = oru(f"BENCH{seed}-{i}", text, study if by_uid else "", str(ds.AccessionNumber),
                              dt.datetime.now(dt.UTC))

                if not report_first:
                    _inferred(node, reader, key, job_id, ds, pred, model)
                ack = mllp.send("127.0.0.1", port, message, f"BENCH{seed}-{i}", timeout=30)
                if report_first:
                    _inferred(node, reader, key, job_id, ds, pred, model)
                called = {f.label for f in pred.findings
                          if f.present and f.tier in tiers and not pred.out_of_distribution}
                rows.append({"job": job_id, "labels": case.labels, "left_out": omitted, "called": called,
                             "ack": ack, "ood": pred.out_of_distribution})
        # the comparisons of the reports sent after their image run after the ACK, on the listener's thread
        end = time.monotonic() + 60
        while node.reports.counts()["comparisons"] < n and time.monotonic() < end:
            time.sleep(0.2)
    counts = node.reports.counts()
    flags: dict[str, set[str]] = {}
    for d in node.reports.discrepancies(limit=100 * n):
        if d.direction == "model_positive":
            flags.setdefault(d.job_id, set()).add(d.label)
    per_label: dict[str, dict[str, Any]] = {}
    totals = {"tp": 0, "fp": 0, "fn": 0, "left_out": 0, "caught": 0}
    for label in LABELS:
        if label in EXCLUDED:
            continue
        tp = fp = fn = lo = caught = fp_absent = 0
        for r in rows:
            flagged = label in flags.get(r["job"], set())
            truth = bool(r["labels"][label]) and label in r["called"] and label in r["left_out"]
            tp += flagged and truth
            fp += flagged and not truth
            fp_absent += flagged and not r["labels"][label]
            fn += truth and not flagged
            lo += label in r["left_out"]
            caught += flagged and label in r["left_out"]
        per_label[label] = {"true": tp + fn, "flagged": tp + fp, "recall": _rate(tp, tp + fn),
                            "precision": _rate(tp, tp + fp), "false_flags_finding_absent": fp_absent,
                            "false_flags_finding_reported": fp - fp_absent, "left_out": lo, "omissions_caught": _rate(caught, lo)}
        for k, v in (("tp", tp), ("fp", fp), ("fn", fn), ("left_out", lo), ("caught", caught)):
            totals[k] += v
    if scratch is not None:
        scratch.cleanup()
    return {
        "benchmark": "second_read",
        "truth": "present in the phantom, called by the model (tiers, not OOD), left out of the report",
        "bundle": {"name": model.name, "digest": model.short_digest, "synthetic_training": model.synthetic_training},
        "phantoms": {"n": n, "seed": seed, "render_size": render_size, "omit": omit},
        "tiers": list(tiers),
        "reports": {"sent": len(rows), "acked_AA": sum(r["ack"] == "AA" for r in rows), **counts},
        "out_of_distribution": sum(r["ood"] for r in rows),
        "micro": {"recall": _rate(totals["tp"], totals["tp"] + totals["fn"]),
                  "precision": _rate(totals["tp"], totals["tp"] + totals["fp"]),
                  "true": totals["tp"] + totals["fn"], "flagged": totals["tp"] + totals["fp"],
                  "left_out": totals["left_out"], "omissions_caught": _rate(totals["caught"], totals["left_out"])},
        "per_label": per_label,
        "predict_seconds": round(predict_s, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.second_read", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--seed", type=int, default=2027)
    parser.add_argument("--omit", type=float, default=0.5, help="probability a true finding is left out")
    parser.add_argument("--render-size", type=int, default=512)
    parser.add_argument("--tiers", default=f"medium,high,{NOT_VALIDATED}", help="comma-separated")
    parser.add_argument("--device", default=None)
    parser.add_argument("--work", type=Path, default=None)
    a = parser.parse_args(argv)
    from worker.logs import configure

    configure("WARNING")  # the node's JSON logs on stderr: stdout is the one JSON result
    tiers = tuple(t.strip() for t in a.tiers.split(",") if t.strip())
    print(json.dumps(run(a.bundle, a.n, a.seed, a.omit, a.render_size, device=a.device, tiers=tiers, work=a.work)))


if __name__ == "__main__":
    main()
